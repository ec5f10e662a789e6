"""Cross-attention maps: which pixels each token of the prompt was attended to from, over a whole run.

Every cross-attention layer of the UNet computes, for each latent position, a softmax over the text tokens. Summed
over heads, layers and sampler steps, a token's column of those probabilities is a picture of where the token acted
(Tang et al. 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention"; Hertz et al. 2022).

Notation (Vaswani et al. 2017; as minidiff.attention):
    probs      -> P = softmax(Q K^T / sqrt(d)) of one cross-attention layer, (B, heads, h * w, L): latent position
                  by text token, each row summing to 1; h x w is that layer's feature map (the latent / 2^k)
    token map  -> sum over heads, layers (each bilinearly upsampled to the latent H x W) and steps of P[..., j],
                  divided by its maximum: (H, W) in [0, 1] for token j ("normalised per token")

`record_attention(unet, ...)` is the hook: while it is active, each cross-attention module's kernel is wrapped so
that it also hands Q and K to a recorder (the attention output is the wrapped kernel's own, unchanged); on exit
the kernels are put back, so that a UNet without the hook runs exactly as before, at the same speed. It works with
every kernel minidiff.speed puts in place (the CPU defaults included); a compiled UNet or CUDA graphs (optimize's
compile / cuda_graphs) never call Python inside the UNet, and are refused.
Pipeline(..., attention_maps=True) records a run and returns a TokenMaps per image.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minidiff.checks import literal
from minidiff.errors import InputError
from minidiff.prompts import prompt_chunks
from minidiff.tokenizer import MAX_LENGTH
from minidiff.unet import BasicTransformerBlock


def upsampled_sum(probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One layer's (B, heads, h * w, L) probabilities -> (B, L, height, width): summed over the heads, the h x w map
    of every token bilinearly upsampled to the latent size (h and w from the aspect ratio height : width)."""
    batch, _, positions, tokens = probs.shape
    factor = round(math.sqrt(height * width / positions))  # the layer's downsampling: 1, 2, 4, ...
    h, w = height // factor, width // factor
    # (B, heads, h * w, L) -> (B, L, h, w)
    maps = probs.sum(dim=1).transpose(1, 2).reshape(batch, tokens, h, w)
    return F.interpolate(maps.float(), size=(height, width), mode="bilinear", align_corners=False)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) maps, each divided by its own maximum (a map that is all zero stays zero)."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def token_maps(layer_probs: list, height: int, width: int) -> torch.Tensor:
    """The DAAM aggregation: cross-attention probabilities of several layers (and steps), each (B, heads, h * w, L)
    -> (B, L, height, width) maps, summed over heads, layers and steps at the latent size, normalised per token."""
    return normalised(sum(upsampled_sum(probs, height, width) for probs in layer_probs))


@dataclass
class TokenMaps:
    """The attention maps of one generated image: one (H, W) map in [0, 1] per token of its prompt."""

    tokens: list  # the prompt's tokens as text, in order: no <|startoftext|>, <|endoftext|> or weight syntax
    maps: torch.Tensor  # (len(tokens), H, W) at the latent size, float32 on the CPU

    def __getitem__(self, word: str) -> torch.Tensor:
        """The map of `word` (case-insensitive): the sum of the maps of the tokens it is made of ("cyan" is "cy" +
        "an"), over every place it occurs, normalised."""
        wanted = self.positions(word)
        if not wanted:
            raise InputError(f"{literal(word)} is not a word of the prompt, whose tokens are "
                             f"{', '.join(map(repr, self.tokens))}: give one of them (or several that make a word)")
        return normalised(self.maps[wanted].sum(dim=0))

    def positions(self, word: str) -> list:
        """The indices of the tokens that spell `word`, wherever a run of consecutive tokens does."""
        word, found = str(word).lower().replace(" ", ""), []
        for start in range(len(self.tokens)):
            spelt = ""
            for end in range(start, len(self.tokens)):
                spelt += self.tokens[end].lower()
                if spelt == word:
                    found += range(start, end + 1)
                if not word.startswith(spelt):
                    break
        return sorted(set(found))


class AttentionRecorder:
    """Sums the cross-attention probabilities of the conditional half of every UNet call, at the latent size."""

    def __init__(self, images: int, height: int, width: int):
        self.images, self.height, self.width = images, height, width
        self.total = None  # (images, L, height, width)
        self.calls = 0  # cross-attention layer calls recorded

    def add(self, q, k, mask=None):
        """Record one layer's scores from its (B, heads, L, d) queries and keys (the last `images` rows: with
        guidance the batch is [uncond, cond], and only the prompt's half says where the prompt acted)."""
        q, k = q[-self.images:].float(), k[-self.images:].float()
        scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
        if mask is not None:  # additive float or bool (True = attend), as minidiff.attention.apply_mask_
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        maps = upsampled_sum(scores.softmax(dim=-1), self.height, self.width)
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def maps(self, tokenizer, prompts: list, prompt_weights: bool = True) -> list:
        """A TokenMaps per image (prompts: one per image), each token's map normalised. The tokens are those the
        text encoder saw (minidiff.prompts.prompt_chunks): "a (red:1.3) circle" gives a, red, circle; a prompt past
        75 tokens is in chunks of 77 positions side by side, and its k-th chunk's i-th token is at 77 k + 1 + i."""
        if self.total is None:
            raise InputError("no cross-attention was recorded: the UNet has no cross-attention layers, or no step ran")
        results = []
        for prompt, total in zip(prompts, self.total.cpu()):
            positions, tokens = [], []
            for chunk, (ids, _) in enumerate(prompt_chunks(tokenizer, prompt, prompt_weights)):
                positions += [chunk * MAX_LENGTH + 1 + i for i in range(len(ids))]  # after the chunk's START
                tokens += [tokenizer.decode([i]) for i in ids]
            results.append(TokenMaps(tokens, normalised(total[positions])))
        return results


def cross_attention_modules(unet) -> list:
    """The cross-attention modules (attn2 of every transformer block) of a UNet; refuses a compiled or graphed one."""
    plain = getattr(unet, "unet", unet)  # a FastUNet holds the UNet itself
    if plain is not unet and (getattr(unet, "run", None) != plain.forward or getattr(unet, "graphed", None)):
        raise InputError("attention maps need the UNet's Python modules to run, but this one is compiled or replayed "
                         "from CUDA graphs: load the pipeline without compile / cuda_graphs to record them")
    return [block.attn2 for block in plain.modules() if isinstance(block, BasicTransformerBlock)]


@contextmanager
def attention_hook(unet, add):
    """Within the block, every cross-attention module's kernel first calls add(q, k, mask) with its (B, heads, L, d)
    queries and keys (and gradients, where they are tracked), then returns its own output; on exit the very same
    kernels are put back."""
    modules = cross_attention_modules(unet)
    kernels = [module.kernel for module in modules]

    def hooked(kernel):
        kernel = kernel or F.scaled_dot_product_attention

        def run(q, k, v, mask=None):
            add(q, k, mask)
            return kernel(q, k, v, mask)

        return run

    try:
        for module, kernel in zip(modules, kernels):
            module.kernel = hooked(kernel)
        yield
    finally:
        for module, kernel in zip(modules, kernels):
            module.kernel = kernel


@contextmanager
def record_attention(unet, images: int, height: int, width: int):
    """Within the block, every call of `unet` adds its cross-attention probabilities to the AttentionRecorder it
    yields (images: the batch of pictures; height, width: the latent size); the kernels are restored on exit."""
    recorder = AttentionRecorder(images, height, width)
    with attention_hook(unet, lambda q, k, mask=None: recorder.add(q, k, mask)):  # recorder.add looked up per call
        yield recorder
