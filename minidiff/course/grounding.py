"""Grounding the words of a caption in the picture: a training loss that asks the cross-attention map of the
colour word and of the shape word to fall on the drawn shape (the token loss of TokenCompose, Wang et al. 2024).

Why the shapes model needs it. Trained on the noise loss alone, the colour word's map (minidiff.attention_maps)
peaked inside the shape less often than chance: the text encoder, trained jointly from scratch and causal, carried
the colour on to <|endoftext|> and the padding after it (which see the whole caption), and the UNet read it from
there (benchmarks/attention_peaks.py measures both; the README quotes both models' runs). Stable Diffusion's frozen
CLIP, trained on 400 M captions, keeps a word's meaning at the word; a 2-layer encoder trained on 20 000 pictures
need not. The token loss adds what the shapes data set knows for free, where the shape is, and costs nothing at
inference: the model is the same network, run the same way. The mean is over the grounded tokens of the batch.

Notation (TokenCompose's L_token; minidiff.attention_maps for P):
    P        -> (B, heads, h * w, L) cross-attention probabilities of one layer (softmax over the L text tokens)
    M        -> (B, h * w) the cells of that layer's h x w map that hold pixels of the shape
    j        -> a grounded token: one of the caption's colour word or shape word tokens
    inside   -> sum_u M[u] P[u, j] / sum_u P[u, j]: the share of token j's attention that falls on the shape
    loss     -> mean over layers, heads and grounded tokens of (1 - inside)^2
"""

import re
from contextlib import contextmanager

import torch

from minidiff.attention_maps import attention_hook
from minidiff.course import shapes
from minidiff.tokenizer import MAX_LENGTH


def shape_cells(pixels: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """uint8 (n, 3, 64, 64) rendered pictures -> (n, 64 / cell, 64 / cell) bool: the cells (latent cells for
    cell = 8) that hold a pixel of the shape, one farther than the checker's FOREGROUND_DISTANCE from the background
    (a rendered picture has nothing else on it)."""
    background = torch.tensor(shapes.BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    on_shape = (pixels.float() - background).norm(dim=1) > shapes.FOREGROUND_DISTANCE  # (n, 64, 64)
    n, height, width = on_shape.shape
    return on_shape.view(n, height // cell, cell, width // cell, cell).any(dim=4).any(dim=2)


def word_positions(tokenizer, caption: str, spec) -> list:
    """The context positions (after <|startoftext|>) of the caption's colour word and shape word tokens."""
    ids, found = tokenizer.encode(caption), []
    for words in (shapes.COLOUR_WORDS[spec.colour], shapes.SHAPE_WORDS[spec.shape]):
        word = next(word for word in words if re.search(rf"\b{word}\b", caption))
        wanted = tokenizer.encode(word)
        start = next(i for i in range(len(ids)) if ids[i : i + len(wanted)] == wanted)
        found += [1 + i for i in range(start, start + len(wanted))]
    return found


def grounded_tokens(tokenizer, captions: list, specs: list) -> torch.Tensor:
    """(B, 77) bool: the positions of each caption's colour and shape words ("" grounds nothing)."""
    tokens = torch.zeros(len(captions), MAX_LENGTH, dtype=torch.bool)
    for row, (caption, spec) in enumerate(zip(captions, specs)):
        if caption:
            tokens[row, word_positions(tokenizer, caption, spec)] = True
    return tokens


@contextmanager
def recorded_probabilities(unet):
    """Within the block, every cross-attention layer of `unet` appends its probabilities P (with their gradient)
    to the list it yields (minidiff.attention_maps.attention_hook: the outputs and, on exit, the kernels as before)."""
    probs = []

    def add(q, k, mask=None):  # cross-attention has no mask
        probs.append(((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1))

    with attention_hook(unet, add):
        yield probs


def grounding_loss(probs: list, tokens: torch.Tensor, cells: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """TokenCompose's token loss over the layers' probabilities P (B, heads, h * w, L), for the grounded `tokens`
    (B, L) bool and the shape's latent `cells` (B, H, W) bool: the mean over `count` grounded tokens (default: those
    in `tokens`; under torchrun the whole batch's count over the number of processes, so that the processes'
    average gradient is the whole batch's); zero when there is none."""
    count = float(tokens.sum()) if count is None else count
    if count == 0:
        return probs[0].new_zeros(())
    batch, height, width = cells.shape
    total = 0
    for p in probs:
        factor = round((height * width / p.shape[2]) ** 0.5)  # the layer's downsampling of the latent
        mask = cells.view(batch, height // factor, factor, width // factor, factor).any(dim=4).any(dim=2)
        mask = mask.flatten(1).to(p.dtype)  # (B, h * w)
        inside = torch.einsum("bhul,bu->bhl", p, mask) / p.sum(dim=2).clamp_min(1e-12)  # (B, heads, L)
        total = total + ((1 - inside) ** 2 * tokens[:, None, :]).sum() / (count * p.shape[1])
    return total / len(probs)


def with_grounding(noise_loss, unet, weight: float):
    """noise_loss(*batch) -> the loss of (*batch, tokens, cells, count): noise_loss plus `weight` times the grounding
    loss of the cross-attention of `unet` in that call (tokens (B, L) and cells (B, H, W) bool, count a number or
    None, as grounding_loss)."""

    def loss(*batch):
        *batch, tokens, cells, count = batch
        with recorded_probabilities(unet) as probs:
            noise_part = noise_loss(*batch)
        return noise_part + weight * grounding_loss(probs, tokens, cells, count)

    return loss
