"""The samplers side by side on the bundled shapes model, as `minidiff sampler-table` prints them, written to a JSON
that benchmarks/quoted.py quotes in the README and lesson 09 (the table's numbers are checked, not pasted).

    python -m benchmarks.sampler_table [--prompts 200] [--json benchmarks/results/sampler_table.json]
                                       [--grid course/images/sampler_table.png]

The same held-out prompts and initial noise for every row (minidiff.course.evaluate.sampler_table): adherence read
back by the shapes checker, the mean absolute pixel difference to DDIM 50, and the wall time per image with
classifier-free guidance, in batches of 50 on the machine's CPU threads.
"""

import argparse
import platform
import time
from pathlib import Path

import torch

from benchmarks.records import save_json, writable
from minidiff.course.evaluate import format_table, held_out_prompts, sampler_table, save_grid
from minidiff.files import atomic_save
from minidiff.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampler_table", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sampler_table.json"))
    parser.add_argument("--grid", default=str(ROOT / "course" / "images" / "sampler_table.png"))
    args = parser.parse_args(argv)
    if not writable("sampler_table", args.json, args.grid):  # before the table: the record's file and the grid's
        return 2
    pipe = load_pipeline("shapes", device="cpu")
    results, images = sampler_table(pipe, args.prompts, args.guidance, args.seed)
    print(format_table(results, args.prompts))
    record = {"prompts": args.prompts, "guidance_scale": args.guidance, "seed": args.seed, "batch": 50,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "rows": results}
    save_json(args.json, record)
    atomic_save(args.grid, lambda temporary: save_grid(images, held_out_prompts(args.prompts, args.seed), temporary))
    print(f"wrote {args.json}, {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
