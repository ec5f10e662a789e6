"""What the +int8 rung (minidiff.speed.int8) costs in pictures, on the bundled shapes model: the held-out prompts
drawn with the plain UNet and with its int8 copy from the same noise, each judged by shapes.check, and the pixels
compared. The text encoder and the VAE stay as loaded; only the UNet is quantized (as in the rung).

    python -m benchmarks.int8_quality [--prompts 256] [--dtype float32|bfloat16]

Writes benchmarks/results/int8_quality.json (quoted in the README).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from minidiff.course.evaluate import evaluate
from minidiff.errors import MinidiffError
from minidiff.files import atomic_save, check_writable
from minidiff.pipeline import load_pipeline
from minidiff.speed.int8 import Int8Module, quantize_int8

RESULTS = Path(__file__).resolve().parent / "results" / "int8_quality.json"


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in images])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_quality")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)
    try:  # before the pictures: the record's file
        check_writable(args.json)
    except MinidiffError as e:
        print(f"int8_quality: error: {e}", file=sys.stderr)
        return 2
    pipe = load_pipeline("shapes", device="cpu", dtype=args.dtype)
    plain_scores, plain_images = evaluate(pipe, args.prompts)
    layers = sum(isinstance(m, Int8Module) for m in quantize_int8(pipe.unet).modules())
    int8_scores, int8_images = evaluate(pipe, args.prompts)
    difference = np.abs(pixels(plain_images) - pixels(int8_images))
    same = [a.tobytes() == b.tobytes() for a, b in zip(plain_images, int8_images)]
    record = {"prompts": args.prompts, "dtype": args.dtype, "int8_layers": layers, "plain": plain_scores,
              "int8": int8_scores, "mean_abs_pixel_difference": float(difference.mean()),
              "max_abs_pixel_difference": float(difference.max()), "identical_pictures": int(sum(same)),
              "torch": torch.__version__}
    atomic_save(args.json, lambda temporary: Path(temporary).write_text(json.dumps(record, indent=1) + "\n"))
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
