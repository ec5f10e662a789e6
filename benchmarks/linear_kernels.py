"""F.linear against OneDNNLinear (minidiff.speed.kernels) in float32 on SD 1.5's linear layers at 256 px, CFG
batch 2: the shapes (tokens, in, out) of the attention projections and the feed-forward at the three levels.

    python -m benchmarks.linear_kernels [--threads 1] [--repeats 9] [--json benchmarks/results/linear_kernels.json]

Each product is timed in turns (F.linear, then oneDNN, then F.linear ...), median ms, and GFLOP/s = 2 * tokens *
in * out / time. The numbers agree to float32 rounding (the largest difference relative to the output is printed).
"""

import argparse
import platform
import statistics
import time

import torch

from benchmarks.records import save_json, writable
from minidiff.measure import CallTimer
from minidiff.speed.kernels import OneDNNLinear

# (tokens of the CFG batch, in features, out features): q/k/v/out and the feed-forward's two layers per level
SHAPES = [(2048, 320, 320), (2048, 320, 2560), (2048, 1280, 320),
          (512, 640, 640), (512, 640, 5120), (512, 2560, 640),
          (128, 1280, 1280), (128, 1280, 10240), (128, 5120, 1280)]


def time_in_turns(calls: dict, repeats: int) -> dict:
    """{name: median ms} of the calls (measure.CallTimer), taken in turns after one warm-up call each."""
    timers = {name: CallTimer(call, "cpu") for name, call in calls.items()}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for timer in timers.values():
            timer()
    return {name: statistics.median(timer.milliseconds()) for name, timer in timers.items()}


def measure(repeats: int = 9) -> list:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for tokens, features_in, features_out in SHAPES:
        plain = torch.nn.Linear(features_in, features_out)
        fast = OneDNNLinear.from_plain(plain)
        x = torch.randn(2, tokens // 2, features_in, generator=generator)
        with torch.no_grad():
            calls = {"F.linear": lambda plain=plain, x=x: plain(x), "oneDNN": lambda fast=fast, x=x: fast(x)}
            ms = time_in_turns(calls, repeats)
            reference = plain(x)
            deviation = ((fast(x) - reference).abs().max() / reference.abs().max()).item()
        gflop = 2 * tokens * features_in * features_out / 1e9
        rows.append({"shape": [tokens, features_in, features_out], "linear_ms": ms["F.linear"],
                     "onednn_ms": ms["oneDNN"], "linear_gflops": gflop / ms["F.linear"] * 1000,
                     "onednn_gflops": gflop / ms["oneDNN"] * 1000, "max_dev": deviation})
        print(f"{tokens:5d} x {features_in:5d} -> {features_out:5d}: F.linear {ms['F.linear']:7.2f} ms "
              f"({rows[-1]['linear_gflops']:4.0f} GFLOP/s), oneDNN {ms['oneDNN']:7.2f} ms "
              f"({rows[-1]['onednn_gflops']:4.0f} GFLOP/s), max dev {deviation:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not writable("linear_kernels", args.json):  # before the timings: the rows' file, if any
        return 2
    torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    total = {name: sum(row[f"{name}_ms"] for row in rows) for name in ("linear", "onednn")}
    print(f"all nine: F.linear {total['linear']:.1f} ms, oneDNN {total['onednn']:.1f} ms "
          f"({total['linear'] / total['onednn']:.2f}x)")
    if args.json:
        run = {"threads": args.threads, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "rows": rows, "linear_total_ms": total["linear"], "onednn_total_ms": total["onednn"]}
        save_json(args.json, run, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
