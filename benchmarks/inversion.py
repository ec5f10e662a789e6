"""DDIM inversion, measured: the round trip's order on the exact Gaussian model, and invert-then-generate on the
bundled shapes model (PSNR, checker agreement), written to benchmarks/results/inversion.json (quoted in the README
and lesson 14 through benchmarks/quoted.py) and the picture course/images/inversion.png.

    python -m benchmarks.inversion [--pictures 24] [--steps 50]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.records import save_json
from minidiff.course.evaluate import inversion_study
from minidiff.course.gaussian import convergence_order, inversion_round_trip
from minidiff.course.viz import image_grid, latents_to_pil
from minidiff.files import atomic_save
from minidiff.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "inversion.json"
PICTURE = ROOT / "course" / "images" / "inversion.png"
GAUSSIAN_STEPS = (10, 20, 40, 80, 160)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    gaussian = {spacing: inversion_round_trip(GAUSSIAN_STEPS, spacing) for spacing in ("leading", "trailing")}
    pipe = load_pipeline("shapes", device="cpu")
    start = time.perf_counter()
    with torch.no_grad():
        study = inversion_study(pipe, n=args.pictures, steps=args.steps)
    seconds = time.perf_counter() - start
    results = {
        "gaussian": {"steps": list(GAUSSIAN_STEPS), "max_error": gaussian,
                     "order": {spacing: convergence_order(GAUSSIAN_STEPS, errors)
                               for spacing, errors in gaussian.items()}},
        "shapes": {key: study[key] for key in ("n", "steps", "guidance_scale", "psnr", "psnr_min", "psnr_vae",
                                               "agreement", "agreement_vae", "adherence", "adherence_originals",
                                               "per_picture")}
        | {"seconds": seconds, "machine": platform.processor() or platform.machine()},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    save_json(RESULTS, results)

    # the picture: four held-out pictures; rows: the picture, its inverted noise (3 of 4 channels), the round trip
    chosen = study["pictures"][:4]
    noises = [latents_to_pil(pipe.invert(original, prompt, args.steps))[0].resize((64, 64), 0)
              for (original, _), (prompt, _) in zip(chosen, study["prompts"][:4])]
    labels = (["the picture"] * 4 + ["its noise (ch. 0-2)"] * 4
              + [f"DDIM {args.steps} back: {value:.1f} dB" for value in study["per_picture"][:4]])
    grid = image_grid([o for o, _ in chosen] + noises + [a for _, a in chosen], columns=4, scale=2, labels=labels)
    atomic_save(PICTURE, grid.save)
    print(json.dumps({k: v for k, v in results["shapes"].items() if k != "per_picture"}, indent=1))
    print(json.dumps(results["gaussian"]["order"]))


if __name__ == "__main__":
    main()
