"""What the +int8 rung (minidiff.speed.int8) costs in pictures, on the bundled shapes model: the held-out prompts
drawn with the plain UNet and with its int8 copy from the same noise, each judged by shapes.check, and the pixels
compared; the int8 copy with its activation scales taken at every call, then calibrated (calibrate_int8, as the rung
does: its sampling of 16 training prompts from other noise). The text encoder and the VAE stay as loaded; only the
UNet is quantized (as in the rung).

    python -m benchmarks.int8_quality [--prompts 256] [--dtype float32|bfloat16]

Writes benchmarks/results/int8_quality.json (quoted in the README).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.records import save_json, writable
from minidiff.course import shapes
from minidiff.course.evaluate import evaluate, generate
from minidiff.pipeline import load_pipeline
from minidiff.speed.int8 import Int8Module, calibrate_int8, quantize_int8

RESULTS = Path(__file__).resolve().parent / "results" / "int8_quality.json"


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in images])


def compared(plain_images, int8_images) -> dict:
    difference = np.abs(pixels(plain_images) - pixels(int8_images))
    same = [a.tobytes() == b.tobytes() for a, b in zip(plain_images, int8_images)]
    return {"mean_abs_pixel_difference": float(difference.mean()), "max_abs_pixel_difference": float(difference.max()),
            "identical_pictures": int(sum(same))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_quality")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not writable("int8_quality", args.json):  # before the pictures: the record's file
        return 2
    pipe = load_pipeline("shapes", device="cpu", dtype=args.dtype)
    plain_scores, plain_images = evaluate(pipe, args.prompts)
    layers = sum(isinstance(m, Int8Module) for m in quantize_int8(pipe.unet).modules())
    int8_scores, int8_images = evaluate(pipe, args.prompts)
    rng = np.random.default_rng(1)
    calibration = [shapes.caption(spec, rng) for spec in shapes.random_specs(16, rng)]  # training prompts
    calibrate_int8(pipe.unet, lambda unet: generate(pipe, calibration, seed=10_000, sampler="dpmpp_2m", steps=20,
                                                    guidance_scale=5.0))
    static_scores, static_images = evaluate(pipe, args.prompts)
    record = {"prompts": args.prompts, "dtype": args.dtype, "int8_layers": layers, "plain": plain_scores,
              "int8": int8_scores, **compared(plain_images, int8_images), "int8_calibrated": static_scores,
              "calibrated": compared(plain_images, static_images), "torch": torch.__version__}
    save_json(args.json, record)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
