"""Where do the words of a prompt act? The peak of each word's cross-attention map against the drawn shape, and which
positions of the text encoder's output carry the colour.

For held-out prompts (minidiff.course.evaluate.held_out_prompts) drawn right by the shapes model, the map of the
colour word and of the shape word (minidiff.attention_maps, aggregated over layers, heads and steps) "peaks inside
the shape" when its largest latent cell (8 x 8 pixels of the 64 x 64 picture: the maps' own resolution) holds
pixels of the shape (minidiff.course.shapes' foreground, its largest region). Chance is the mean fraction of the
cells that hold shape pixels: where a map that ignored the picture would peak inside as often.

peak_shares also reads the maps with the text tokens alone (`words_only`: each position's probabilities over the
prompt's words, without <|startoftext|>, <|endoftext|> and the padding, renormalised to sum to 1, as Attend-and-Excite
(Chefer et al. 2023) does before reading a token's map), and per resolution of the UNet's feature maps.

colour_routes asks which context positions the colour is read from. The prompt's colour word is swapped for another
colour's ("red" -> "orange", the same number of tokens, so that every position keeps its place), and the picture is
drawn from the prompt's hidden states with one group of positions taken from the swapped prompt's: the colour
word's own, or <|endoftext|> and the padding after it (the causal text encoder lets those see the whole prompt). The
share of pictures drawn in the swapped colour says how much of the colour comes through each group.
"""

import re
from contextlib import contextmanager

import numpy as np
import torch

from minidiff.attention_maps import AttentionRecorder, normalised, record_attention, upsampled_sum
from minidiff.course import shapes
from minidiff.course.evaluate import held_out_prompts
from minidiff.tokenizer import MAX_LENGTH


def shape_cells(image, cell: int = 8) -> torch.Tensor:
    """(64 / cell, 64 / cell) bool: the latent cells that hold pixels of the drawn shape."""
    pixels = shapes.to_pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    mask = shapes.largest_component(distance > shapes.FOREGROUND_DISTANCE)
    side = shapes.IMAGE_SIZE // cell
    return torch.from_numpy(mask.reshape(side, cell, side, cell).any(axis=(1, 3)))


def prompt_word(prompt: str, words: list) -> str:
    """The first of `words` ("red", or "circle" / "disc" / "round dot") that the prompt holds as a word."""
    return next(word for word in words if re.search(rf"\b{word}\b", prompt))


class ReadingsRecorder(AttentionRecorder):
    """An AttentionRecorder that also sums, per reading, the maps of some of the layers or of the words alone."""

    def __init__(self, images: int, height: int, width: int, prompt_lengths: list):
        super().__init__(images, height, width)
        self.words = torch.zeros(images, MAX_LENGTH, dtype=torch.bool)  # the positions of each prompt's words
        for row, length in enumerate(prompt_lengths):
            self.words[row, 1 : 1 + length] = True
        self.readings = {}  # name -> (images, L, height, width)

    def add(self, q, k, mask=None):
        q, k = q[-self.images:].float(), k[-self.images:].float()
        probs = ((q / q.shape[-1] ** 0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, h * w, L)
        words = probs * self.words[:, None, None, :].to(probs.device)
        side = round((probs.shape[2] * self.width / self.height) ** 0.5)
        for name, p in (("all layers", probs), (f"{side}-wide layers", probs),
                        ("words only", words / words.sum(dim=-1, keepdim=True).clamp_min(1e-12))):
            maps = upsampled_sum(p, self.height, self.width)
            self.readings[name] = maps + self.readings.get(name, 0)
        super().add(q, k, mask)


def peak_shares(pipe, n: int = 64, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0) -> dict:
    """{"colour", "shape", "chance": shares, "n": pictures drawn right, "readings": {name: {"colour", "shape"}},
    "others": the share of the prompt's other tokens ("a", "small", "at", "top", ...) whose own map peaks inside,
    "colour_border": share of the colour word's peaks on the picture's edge cells, "border": the edge cells' share}
    over n held-out prompts (one batch). The top-level shares are those of the library's maps ("all layers")."""
    pairs = held_out_prompts(n, seed)
    prompts = [prompt for prompt, _ in pairs]
    height = width = shapes.IMAGE_SIZE // 8
    recorder = ReadingsRecorder(n, height, width, [len(pipe.tokenizer.encode(p)) for p in prompts])
    with record_attention(pipe.unet, n, height, width) as outer:  # the hook, with our recorder's add in its place
        outer.add = recorder.add
        result = pipe(prompts, steps=steps, guidance_scale=guidance_scale, seed=seed, progress=False)
    library = recorder.maps(pipe.tokenizer, prompts)
    hits, edge = {}, torch.ones(height, width, dtype=torch.bool)
    edge[1:-1, 1:-1] = False
    for row, ((prompt, spec), image) in enumerate(zip(pairs, result.images)):
        if shapes.check(image).combination() != spec.combination():
            continue  # a picture that is wrong says nothing about where its words acted
        cells = shape_cells(image).flatten()
        hits.setdefault("chance", []).append(float(cells.float().mean()))
        grounded = []
        for kind, words in (("colour", shapes.COLOUR_WORDS[spec.colour]), ("shape", shapes.SHAPE_WORDS[spec.shape])):
            positions = [1 + i for i in library[row].positions(prompt_word(prompt, words))]
            grounded += positions
            for name, maps in recorder.readings.items():
                peak = normalised(maps[row, positions].sum(dim=0)).flatten().argmax()
                hits.setdefault((name, kind), []).append(bool(cells[peak]))
                if name == "all layers" and kind == "colour":
                    hits.setdefault("colour_border", []).append(bool(edge.flatten()[peak]))
        for position in set(range(1, 1 + len(library[row].tokens))) - set(grounded):  # every other token, alone
            peak = normalised(recorder.readings["all layers"][row, position]).flatten().argmax()
            hits.setdefault("others", []).append(bool(cells[peak]))
    share = {key: float(np.mean(values)) for key, values in hits.items()}
    readings = {name: {kind: share[(name, kind)] for kind in ("colour", "shape")} for name in recorder.readings}
    return {**readings["all layers"], "chance": share["chance"], "n": len(hits["chance"]), "readings": readings,
            "others": share["others"], "colour_border": share["colour_border"], "border": float(edge.float().mean())}


def swapped_colour(tokenizer, prompt: str, spec) -> tuple | None:
    """(the prompt with its colour word replaced by a word of another colour that takes as many tokens, that colour);
    None when there is none, as for "cyan", two tokens where every other colour's words are one."""
    word = prompt_word(prompt, shapes.COLOUR_WORDS[spec.colour])
    start = shapes.COLOURS.index(spec.colour) + 1
    for colour in shapes.COLOURS[start:] + shapes.COLOURS[:start]:
        for other in shapes.COLOUR_WORDS[colour] if colour != spec.colour else []:
            swapped = re.sub(rf"\b{word}\b", other, prompt, count=1)
            if len(tokenizer.encode(swapped)) == len(tokenizer.encode(prompt)):
                return swapped, colour
    return None


@contextmanager
def given_context(pipe, prompts: list, context: torch.Tensor):
    """Within the block, the pipeline conditions `prompts` on `context` (its other encodings, the negative prompts',
    are its own)."""
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda texts, *args: context if list(texts) == list(prompts) else encode(texts, *args)
    try:
        yield pipe
    finally:
        del pipe.encode_prompt  # the class's method again


def colour_routes(pipe, n: int = 64, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0) -> dict:
    """{route: share of pictures drawn in the swapped prompt's colour, "n": prompts} over the held-out prompts that
    have a swap, for the routes "colour word" (its own positions), "words after it" (the prompt's later words) and
    "<|endoftext|> + padding" (every position after the prompt's last word)."""
    pairs = [(prompt, swapped_colour(pipe.tokenizer, prompt, spec)) for prompt, spec in held_out_prompts(n, seed)]
    prompts, swaps = zip(*[(prompt, swap) for prompt, swap in pairs if swap is not None])
    with torch.no_grad():  # (n, 77, width) each
        own, other = pipe.encode_prompt(list(prompts)), pipe.encode_prompt([text for text, _ in swaps])
    routes = {"colour word": [], "words after it": [], "<|endoftext|> + padding": []}  # positions, per prompt
    for prompt, (swapped, _) in zip(prompts, swaps):
        a, b = pipe.tokenizer.encode(prompt), pipe.tokenizer.encode(swapped)
        changed = [1 + i for i, (x, y) in enumerate(zip(a, b)) if x != y]  # after <|startoftext|>
        routes["colour word"].append(changed)
        routes["words after it"].append(list(range(changed[-1] + 1, 1 + len(a))))
        routes["<|endoftext|> + padding"].append(list(range(1 + len(a), MAX_LENGTH)))
    shares = {}
    for route, positions in routes.items():
        context = own.clone()
        for row, taken in enumerate(positions):
            context[row, taken] = other[row, taken]
        with given_context(pipe, prompts, context):
            images = pipe(list(prompts), steps=steps, guidance_scale=guidance_scale, seed=seed, progress=False).images
        drawn = [shapes.check(image).colour == colour for image, (_, colour) in zip(images, swaps)]
        shares[route] = float(np.mean(drawn))
    return shares | {"n": len(prompts)}
