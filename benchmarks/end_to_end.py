"""End to end on the bundled shapes model: `minidiff generate` from process start to the PNG (a fresh process each
time: imports, loading, the image, the file), and the image alone in a warm process, with its breakdown: the text
encoder, the UNet steps (calls on the guidance batch), the decoder, and the rest (sampler, tokenizer, to PIL).
Wall-clock and CPU time both: on a shared machine the wall clock grows with the load, the CPU time much less.

    python -m benchmarks.end_to_end [--steps 20] [--repeats 5] [--threads 2] [--json out.json]

The target (issue 20): the warm image under 1 s on 2 cores at 20 steps.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.records import writable
from minidiff.files import atomic_write_text
from minidiff.pipeline import load_pipeline

PROMPT = "a small red circle in the top left"
ROOT = Path(__file__).resolve().parent.parent


class Stopwatch:
    """Wraps a function: the wall-clock and CPU seconds (process_time: all threads) of its calls."""

    def __init__(self, function):
        self.function, self.wall, self.cpu, self.calls = function, 0.0, 0.0, 0

    def __call__(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu
            self.calls += 1


def cold_generate(steps: int, threads: int) -> dict:
    """`python -m minidiff generate` in a fresh process: wall-clock and CPU seconds (the child's user + system)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "minidiff", "generate", PROMPT, "--steps", str(steps),
                   "--out", str(Path(folder) / "image.png")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert (Path(folder) / "image.png").stat().st_size > 0
    return {"wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def warm_image(pipe, steps: int) -> dict:
    """One image in a warm process, with the time of each part (wall and CPU seconds)."""
    parts = {"text encoder": Stopwatch(pipe.text_encoder.forward), "UNet steps": Stopwatch(pipe.unet.forward),
             "decoder": Stopwatch(pipe.vae.decode)}
    pipe.text_encoder.forward, pipe.unet.forward, pipe.vae.decode = parts.values()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        pipe(PROMPT, steps=steps, seed=0, progress=False).images[0]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        for module, attribute in ((pipe.text_encoder, "forward"), (pipe.unet, "forward"), (pipe.vae, "decode")):
            delattr(module, attribute)  # the class's method again
    row = {"image wall_s": wall, "image cpu_s": cpu, "UNet calls": parts["UNet steps"].calls}
    for name, part in parts.items():
        row |= {f"{name} wall_s": part.wall, f"{name} cpu_s": part.cpu}
    row |= {"rest wall_s": wall - sum(p.wall for p in parts.values()),
            "rest cpu_s": cpu - sum(p.cpu for p in parts.values())}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="warm images (and cold runs: at most 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and OMP_NUM_THREADS of the cold runs)")
    parser.add_argument("--json", help="also write the medians as JSON")
    args = parser.parse_args(argv)
    if not writable("end_to_end", args.json or None):  # before the cold runs: the medians' file, if any
        return 2
    torch.set_num_threads(args.threads)

    cold = [cold_generate(args.steps, args.threads) for _ in range(min(3, args.repeats))]
    pipe = load_pipeline("shapes", device="cpu")
    pipe(PROMPT, steps=args.steps, seed=0, progress=False)  # warm-up
    warm = [warm_image(pipe, args.steps) for _ in range(args.repeats)]
    medians = {"cold " + key: statistics.median(run[key] for run in cold) for key in cold[0]}
    medians |= {key: statistics.median(run[key] for run in warm) for key in warm[0]}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"shapes model, {args.steps} steps ({pipe.unet.config.sample_size * 8} px), {args.threads} threads, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs; medians of {len(cold)} cold runs, {len(warm)} warm "
          f"images")
    print(f"{'':32s} {'wall s':>8s} {'CPU s':>8s}")
    print(f"{'minidiff generate (cold, to PNG)':32s} {medians['cold wall_s']:8.3f} {medians['cold cpu_s']:8.3f}")
    print(f"{'warm image':32s} {medians['image wall_s']:8.3f} {medians['image cpu_s']:8.3f}")
    for part in ("text encoder", "UNet steps", "decoder", "rest"):
        label = f"  {part}" + (f" ({medians['UNet calls']:.0f} calls)" if part == "UNet steps" else "")
        print(f"{label:32s} {medians[part + ' wall_s']:8.3f} {medians[part + ' cpu_s']:8.3f}")
    if args.json:
        record = {"steps": args.steps, "threads": args.threads, "load": load, **medians}
        atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
