"""Data-parallel training of the bundled model's own networks: one process against torchrun's two, same batches.

    python -m benchmarks.distributed [--steps 20] [--out benchmarks/distributed.json]

Trains the shapes model's VAE and then its UNet + text encoder (`TrainConfig.shapes()`: batches of 32 windows and
128 latents) for --steps steps each on a pool of 1,024 pictures, first as one process with 2 CPU threads, then
under `torchrun --standalone --nproc_per_node 2` with one thread per process (each half of every batch, gradients
averaged by DistributedDataParallel). It writes both loss curves, their largest relative difference and the
seconds per step of each phase to --out, which benchmarks/quoted.py quotes in the README.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.records import save_json, writable
from minidiff.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
POOL = 1024


def worker(steps: int, out: str) -> None:
    """One process's share of the run (all of it without torchrun); rank 0 writes the losses and timings."""
    import torch

    from minidiff import distributed
    from minidiff.course import train

    distributed.setup("cpu")
    config = train.TrainConfig.shapes()
    config.pool_size, config.vae_steps, config.steps, config.vae_full_steps = POOL, steps, steps, steps // 2
    torch.manual_seed(config.seed)
    vae, unet = train.AutoencoderKL(config.vae), train.UNet(config.unet)
    text_encoder = train.CLIPTextModel(config.text_encoder)
    pixels, specs = train.render_pool(config.pool_size, config.seed)
    start = time.perf_counter()
    vae_losses = train.train_vae(vae, pixels, specs, config, progress=False)
    vae_seconds = time.perf_counter() - start
    vae.requires_grad_(False)
    z = train.encode_pool(vae, pixels)
    start = time.perf_counter()
    losses = train.train_diffusion(unet, text_encoder, train.CLIPTokenizer.default(), z / z.std(), specs,
                                   train.shape_cells(pixels), config, progress=False)
    unet_seconds = time.perf_counter() - start
    if distributed.is_main():  # rank 0 alone, into the folder the parent process made for it
        record = {
            "processes": distributed.world_size(), "threads": torch.get_num_threads(),
            "losses": {"vae": vae_losses, "diffusion": losses},
            "s_per_step": {"vae": vae_seconds / steps, "diffusion": unet_seconds / steps},
        }
        atomic_write_text(out, json.dumps(record))
    distributed.teardown()


def run(steps: int, processes: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # as a module, so that benchmarks/ is importable as a package
    worker_args = ["-m", "benchmarks.distributed", "--worker", "--steps", str(steps), "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *worker_args]
        env["OMP_NUM_THREADS"] = "2"
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *worker_args]
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(command, env=env, cwd=ROOT, check=True, timeout=3600)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of each phase (default 20)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "distributed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    if args.worker:
        worker(args.steps, args.out)
        return 0
    if not writable("distributed", args.out):  # before the two runs: the result's file
        return 2
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        one = run(args.steps, 1, Path(folder) / "one.json")
        two = run(args.steps, 2, Path(folder) / "two.json")
    difference = {phase: max(abs(a - b) / abs(a) for a, b in zip(one["losses"][phase], two["losses"][phase]))
                  for phase in ("vae", "diffusion")}
    result = {
        "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "pool": POOL, "cpus": os.cpu_count(),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before and after: a shared machine
        "max_relative_loss_difference": difference, "one_process": one, "two_processes": two,
    }
    save_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("steps", "load_average", "max_relative_loss_difference")}
                     | {"s_per_step": {"1 process": one["s_per_step"], "2 processes": two["s_per_step"]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
