"""Where do the words of a prompt act? The peak of each word's cross-attention map against the drawn shape.

For held-out prompts (minidiff.course.evaluate.held_out_prompts) drawn right by the shapes model, the map of the
colour word and of the shape word (minidiff.attention_maps, aggregated over layers, heads and steps) "peaks inside
the shape" when its largest latent cell (8 x 8 pixels of the 64 x 64 picture: the maps' own resolution) holds
pixels of the shape (minidiff.course.shapes' foreground, its largest region). Chance is the mean fraction of the
cells that hold shape pixels: where a map that ignored the picture would peak inside as often.
"""

import numpy as np
import torch

from minidiff.course import shapes
from minidiff.course.evaluate import held_out_prompts


def shape_cells(image, cell: int = 8) -> torch.Tensor:
    """(64 / cell, 64 / cell) bool: the latent cells that hold pixels of the drawn shape."""
    pixels = shapes.to_pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    mask = shapes.largest_component(distance > shapes.FOREGROUND_DISTANCE)
    side = shapes.IMAGE_SIZE // cell
    return torch.from_numpy(mask.reshape(side, cell, side, cell).any(axis=(1, 3)))


def peak_shares(pipe, n: int = 64, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0) -> dict:
    """{"colour", "shape", "chance": shares, "n": pictures drawn right} over n held-out prompts (one batch)."""
    pairs = held_out_prompts(n, seed)
    result = pipe([prompt for prompt, _ in pairs], steps=steps, guidance_scale=guidance_scale, seed=seed,
                  progress=False, attention_maps=True)
    hits = {"colour": [], "shape": [], "chance": []}
    for (prompt, spec), image, maps in zip(pairs, result.images, result.attention_maps):
        if shapes.check(image).combination() != spec.combination():
            continue  # a picture that is wrong says nothing about where its words acted
        cells = shape_cells(image)
        hits["chance"].append(float(cells.float().mean()))
        for kind, words in (("colour", shapes.COLOUR_WORDS[spec.colour]), ("shape", shapes.SHAPE_WORDS[spec.shape])):
            word = next(w for w in words if w in prompt)
            hits[kind].append(bool(cells.flatten()[maps[word].flatten().argmax()]))
    return {kind: float(np.mean(values)) for kind, values in hits.items()} | {"n": len(hits["chance"])}
