"""Where the colour and shape words act on the shapes model: their attention maps' peaks, and the colour's routes.

    python -m benchmarks.attention_peaks [--prompts 64] [--json benchmarks/results/attention_peaks.json]
                                         [--model shapes]

Held-out prompts, 20 dpmpp_2m steps, guidance 5, seed 0 (minidiff.course.attention_peaks): how often the map of the
shape word and of the colour word peaks inside the drawn shape, read as the library reads it and three other ways
(the words alone renormalised, the 8-wide and the 4-wide layers alone); then which context positions carry the
colour, swapping them for another colour's. benchmarks/quoted.py quotes the JSON in the README and lesson 14.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.records import save_json, writable
from minidiff.course.attention_peaks import colour_routes, peak_shares
from minidiff.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="shapes", help="a shapes model: the bundled one, or a folder")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "attention_peaks.json"))
    args = parser.parse_args(argv)
    if not writable("attention_peaks", args.json):  # before the prompts: the record's file
        return 2
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    start = time.perf_counter()
    peaks = peak_shares(pipe, n=args.prompts)
    print(json.dumps(peaks), flush=True)
    routes = colour_routes(pipe, n=args.prompts)
    print(json.dumps(routes), flush=True)
    record = {"command": "python -m benchmarks.attention_peaks " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "prompts": args.prompts, "steps": 20, "guidance_scale": 5.0, "sampler": "dpmpp_2m",
              "seed": 0,
              "peaks": peaks, "routes": routes, "seconds": time.perf_counter() - start}
    save_json(args.json, record)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
