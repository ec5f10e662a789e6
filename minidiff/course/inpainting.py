"""Inpainting on the shapes model, measured: repaint one place of a picture with a held-out prompt.

    python -m minidiff.course.inpainting [--n 32] [--steps 20] [--json course/images/inpaint_shapes.json]
                                         [--picture course/images/inpaint_shapes.png]

For each place on the 3x3 grid, a picture from the shapes renderer shows one large shape there, in a colour and
shape that none of the place's held-out prompts asks for; the mask covers that place (the latent cells around it,
a quarter of the picture); the held-out prompts for that place (minidiff.course.evaluate.held_out_prompts) repaint
it. Measured:
    inside   -> the share of pictures where the checker (shapes.check) reads the prompted colour, shape and place
    outside  -> PSNR of the kept pixels against the picture, beside the PSNR of the same pixels after a JPEG
                quality-90 round trip and after a VAE round trip (encode, decode: the floor of any edit made in
                latent space)
"""

import argparse
import io
import json
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from minidiff.course import evaluate, shapes
from minidiff.files import atomic_save, atomic_write_text
from minidiff.images import to_pil

MASK_SPANS = {0: (0, 32), 1: (16, 48), 2: (32, 64)}  # pixel span of each grid row / column, on the 8-px latent grid


def place_mask(position: str) -> Image.Image:
    """White over the latent cells around a place of the 3x3 grid, black elsewhere."""
    row, column = divmod(shapes.POSITIONS.index(position), 3)
    mask = np.zeros((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), np.uint8)
    (top, bottom), (left, right) = MASK_SPANS[row], MASK_SPANS[column]
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def source_picture(position: str, asked: list, seed: int) -> tuple:
    """A large shape at `position` (a training combination) whose colour and shape no prompt in `asked` names."""
    rng = np.random.default_rng(seed)
    taken_colours, taken_shapes = {c for c, _ in asked}, {s for _, s in asked}
    choices = [(c, s) for c, s, p in shapes.TRAIN if p == position and c not in taken_colours]
    choices = [(c, s) for c, s in choices if s not in taken_shapes] or choices
    colour, shape = choices[int(rng.integers(len(choices)))]
    spec = shapes.ShapeSpec(shape, colour, position, "large")
    return shapes.render(spec, rng), spec


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def jpeg_round_trip(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def measure(pipe, n: int = 32, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
            sampler: str = "dpmpp_2m") -> tuple:
    """Inside adherence and outside PSNR (see the module docstring); returns (results, examples for a picture)."""
    groups = defaultdict(list)
    for prompt, spec in evaluate.held_out_prompts(n, seed):
        groups[spec.position].append((prompt, spec))
    kept_psnr, jpeg_psnr, vae_psnr, images, specs, examples = [], [], [], [], [], []
    for k, (position, pairs) in enumerate(sorted(groups.items())):
        picture, source = source_picture(position, [(s.colour, s.shape) for _, s in pairs], seed + k)
        mask = place_mask(position)
        result = pipe([p for p, _ in pairs], image=picture, mask=mask, steps=steps, sampler=sampler,
                      guidance_scale=guidance_scale, seed=seed + k, progress=False)
        with torch.no_grad():
            latents = pipe.encode_image(picture, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, torch.Generator().manual_seed(0))
            vae_only = np.asarray(to_pil(pipe.decode(latents))[0])
        kept = np.asarray(mask) < 128
        original = np.asarray(picture.convert("RGB"))
        for image in result.images:
            kept_psnr.append(psnr(np.asarray(image)[kept], original[kept]))
        jpeg_psnr.append(psnr(np.asarray(jpeg_round_trip(picture))[kept], original[kept]))
        vae_psnr.append(psnr(vae_only[kept], original[kept]))
        images += result.images
        specs += [s for _, s in pairs]
        examples.append((picture, mask, result.images[0], source, pairs[0][1]))
    scores = shapes.adherence(images, specs)
    results = {
        "n": len(images), "steps": steps, "sampler": sampler, "guidance_scale": guidance_scale, "seed": seed,
        "inside_adherence": scores["all"], "inside_colour": scores["colour"], "inside_shape": scores["shape"],
        "inside_position": scores["position"],
        "outside_psnr_db": float(np.mean(kept_psnr)), "outside_psnr_min_db": float(np.min(kept_psnr)),
        "jpeg90_psnr_db": float(np.mean(jpeg_psnr)), "vae_round_trip_psnr_db": float(np.mean(vae_psnr)),
    }
    return results, examples


def example_grid(examples: list, scale: int = 2) -> Image.Image:
    """Rows of (picture, mask, inpainted), each `scale` times larger."""
    size = shapes.IMAGE_SIZE * scale
    grid = Image.new("RGB", (3 * size, len(examples) * size), "white")
    for row, (picture, mask, result, _, _) in enumerate(examples):
        for column, image in enumerate((picture, mask.convert("RGB"), result)):
            grid.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (column * size, row * size))
    return grid


def main(argv=None) -> int:
    from minidiff.pipeline import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="held-out prompts (they cycle through the 32 held-out "
                        "combinations, both sizes)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--picture", help="write a PNG of a few examples here (picture, mask, inpainted)")
    args = parser.parse_args(argv)
    pipe = load_pipeline("shapes")
    results, examples = measure(pipe, n=args.n, steps=args.steps)
    print(json.dumps(results, indent=1))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    if args.picture:
        atomic_save(args.picture, example_grid(examples[:4]).save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
