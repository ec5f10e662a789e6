"""Measure a shapes model: held-out adherence, and the samplers side by side on the same prompts and seeds.

    minidiff sampler-table [--model shapes] [--prompts 200] [--guidance 5] [--grid samplers.png]

Every picture is judged by minidiff.course.shapes.check (plain geometry, no network) against the prompt it was drawn
for. The prompts are compositions held out of training (shapes.HELD_OUT): colour x shape x position triples the
model never saw together. The sampler table runs every sampler from the same initial noise (one seed per batch),
so that "mean |diff| to DDIM 50" measures what the sampler changes, not what the seed does.

Notation:
    adherence   -> the fraction of pictures whose colour, shape and position all match the prompt
    |diff|      -> the mean absolute difference of the 8-bit RGB pixels to the DDIM-50 picture of the same prompt
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from minidiff.course import shapes
from minidiff.files import atomic_save
from minidiff.images import from_pil, psnr


def held_out_prompts(n: int, seed: int = 0) -> list:
    """n (prompt, spec) pairs that cycle through every held-out combination, both sizes, varied wording."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        colour, shape, position = shapes.HELD_OUT[i % len(shapes.HELD_OUT)]
        size = shapes.SIZES[(i // len(shapes.HELD_OUT)) % len(shapes.SIZES)]
        spec = shapes.ShapeSpec(shape, colour, position, size)
        pairs.append((shapes.caption(spec, rng), spec))
    return pairs


def generate(pipeline, prompts: list, seed: int = 0, batch: int = 64, **options) -> list:
    """PIL pictures for the prompts, `batch` at a time; batch k starts from the noise of seed + k * batch."""
    images = []
    for start in range(0, len(prompts), batch):
        result = pipeline(prompts[start : start + batch], seed=seed + start, progress=False, **options)
        images += result.images
    return images


def evaluate(pipeline, n: int = 256, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0,
             batch: int = 64, sampler: str = "dpmpp_2m") -> tuple:
    """Adherence of pictures generated for n held-out prompts; returns (scores, images)."""
    pairs = held_out_prompts(n, seed)
    images = generate(pipeline, [prompt for prompt, _ in pairs], seed, batch, steps=steps, sampler=sampler,
                      guidance_scale=guidance_scale)
    scores = shapes.adherence(images, [spec for _, spec in pairs])
    return scores | {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}, images


@dataclass
class Row:
    """One line of the sampler table: a sampler, its steps and options."""

    label: str
    sampler: str
    steps: int
    options: dict = field(default_factory=dict)


# DDPM visits all 1000 training timesteps (999 ... 0): steps_offset 0, or the leading grid would start at 1000
SAMPLER_ROWS = (
    Row("DDPM 1000", "ddpm", 1000, {"steps_offset": 0}),
    Row("DDIM 50", "ddim", 50),
    Row("DDIM 20", "ddim", 20),
    Row("DPM++ 2M 20", "dpmpp_2m", 20),
    Row("Euler 20", "euler", 20),
    Row("UniPC 10", "unipc", 10),
    Row("DDIM 50, exit at 70% (pred_x0)", "ddim", 50, {"early_exit": 0.7}),
)
REFERENCE = "DDIM 50"


def pixel_difference(images, references) -> float:
    """Mean |a - b| over every 8-bit RGB value of two equally long lists of pictures."""
    a = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    b = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in references])
    return float(np.abs(a - b).mean())


def sampler_table(pipeline, n: int = 200, guidance_scale: float = 5.0, seed: int = 0, batch: int = 50,
                  rows=SAMPLER_ROWS, progress: bool = True) -> tuple:
    """Every row's adherence, |diff| to DDIM 50 and wall time on the same n held-out prompts and seeds.

    Returns (results, images): results is a list of dicts, images maps each label to its pictures.
    """
    pairs = held_out_prompts(n, seed)
    prompts, specs = [prompt for prompt, _ in pairs], [spec for _, spec in pairs]
    images, results = {}, []
    for row in tqdm(rows, desc="samplers", disable=not progress):
        start = time.perf_counter()
        images[row.label] = generate(pipeline, prompts, seed, batch, sampler=row.sampler, steps=row.steps,
                                     guidance_scale=guidance_scale, **row.options)
        seconds = time.perf_counter() - start
        scores = shapes.adherence(images[row.label], specs)
        early = row.options.get("early_exit")
        results.append({"label": row.label, "sampler": row.sampler, "steps": row.steps,
                        "unet_steps": round(early * row.steps) if early else row.steps,
                        "adherence": scores["all"], "colour": scores["colour"], "shape": scores["shape"],
                        "position": scores["position"], "seconds": seconds, "ms_per_image": 1000 * seconds / n})
    if REFERENCE in images:
        for result in results:
            result["diff_to_ddim50"] = pixel_difference(images[result["label"]], images[REFERENCE])
    return results, images


def format_table(results: list, n: int) -> str:
    """The sampler table as Markdown."""
    lines = [f"| sampler | UNet steps | adherence ({n} held-out prompts) | colour / shape / position | "
             "mean abs diff to DDIM 50 (0-255) | ms per image |",
             "|---|---:|---:|---|---:|---:|"]
    for r in results:
        diff = f"{r['diff_to_ddim50']:.2f}" if "diff_to_ddim50" in r else "-"
        lines.append(f"| {r['label']} | {r['unet_steps']} | {100 * r['adherence']:.1f}% | "
                     f"{100 * r['colour']:.0f}% / {100 * r['shape']:.0f}% / {100 * r['position']:.0f}% | "
                     f"{diff} | {r['ms_per_image']:.0f} |")
    return "\n".join(lines)


def save_grid(images: dict, pairs: list, path, columns: int = 8) -> None:
    """A PNG: one row per sampler, the first `columns` prompts' pictures, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, columns = list(images), min(columns, len(pairs))
    figure, axes = plt.subplots(len(labels), columns, figsize=(1.3 * columns + 2, 1.4 * len(labels)), squeeze=False)
    for i, label in enumerate(labels):
        for j in range(columns):
            ax = axes[i][j]
            ax.imshow(images[label][j])
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0:
                ax.set_title(pairs[j][0], fontsize=6, wrap=True)
    figure.tight_layout()
    atomic_save(path, lambda tmp: figure.savefig(tmp, dpi=100))
    plt.close(figure)


def inversion_study(pipeline, n: int = 24, steps: int = 50, guidance_scale: float = 1.0, seed: int = 0) -> dict:
    """Invert-then-generate on n rendered pictures of held-out prompts: how well DDIM inversion gives them back.

    Each picture (shapes.render, jittered by `seed`) is inverted with its caption (pipeline.invert) and generated
    again from that noise by DDIM on the same grid. Reported: the mean PSNR of the round trip, the PSNR of the VAE
    alone (encode, decode: the ceiling), the checker's agreement (the reconstruction's checked colour, shape,
    position and size equal the original's; also for the VAE alone, with the (original, reconstruction) checks
    that disagree) and the reconstructions' adherence to the prompts.
    Returns a dict with those numbers, the per-picture PSNRs, the (original, reconstruction) pictures and the
    (prompt, spec) pairs.
    """
    rng = np.random.default_rng(seed)
    pairs = held_out_prompts(n, seed)
    originals = [shapes.render(spec, rng) for _, spec in pairs]
    again, vae_only = [], []
    for (prompt, _), picture in zip(pairs, originals):
        noise = pipeline.invert(picture, prompt, steps, guidance_scale)
        again += pipeline(prompt, sampler="ddim", steps=steps, guidance_scale=guidance_scale, latents=noise,
                          progress=False).images
        with torch.no_grad():  # the VAE alone: encode (posterior mean) and decode, the ceiling of the round trip
            latents = pipeline.vae.encode(from_pil(picture).to(pipeline.device, pipeline.dtype))
        vae_only += pipeline.finish(latents * pipeline.vae.scaling_factor, [], None).images
    round_trip = [psnr(a, b) for a, b in zip(again, originals)]
    checked = [(shapes.check(a), shapes.check(b)) for a, b in zip(again, originals)]
    checked_vae = [(shapes.check(a), shapes.check(b)) for a, b in zip(vae_only, originals)]
    return {"n": n, "steps": steps, "guidance_scale": guidance_scale, "psnr": float(np.mean(round_trip)),
            "psnr_min": float(np.min(round_trip)), "psnr_vae": float(np.mean([psnr(a, b) for a, b in
                                                                               zip(vae_only, originals)])),
            "agreement": float(np.mean([a == b for a, b in checked])),
            "agreement_vae": float(np.mean([a == b for a, b in checked_vae])),
            "disagreements": [(b, a) for a, b in checked if a != b],
            "adherence": shapes.adherence(again, [spec for _, spec in pairs])["all"],
            "adherence_originals": shapes.adherence(originals, [spec for _, spec in pairs])["all"],
            "per_picture": round_trip, "pictures": list(zip(originals, again)), "prompts": pairs}

