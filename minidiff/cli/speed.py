"""`minidiff bench | profile | export-onnx`: the speed ladder, one step's operators, and ONNX export."""

import os
import sys
from pathlib import Path

from minidiff.checks import check_device, check_int, check_text, shown
from minidiff.cli.options import MAX_SIDE, check_outputs, output_format, parse_size
from minidiff.errors import OutputError
from minidiff.files import atomic_save, check_writable


def add_commands(sub):
    """bench, profile, export-onnx (minidiff.bench, minidiff.export)."""
    b = sub.add_parser("bench", help="the speed ladder: ms per UNet step for each speed option and its accuracy "
                       "(python benchmarks/vs_diffusers.py: the same against diffusers)")
    add_bench_arguments(b)
    b.set_defaults(run=cmd_bench)
    p = sub.add_parser("profile", help="the top operators of one UNet step, and a chrome://tracing trace")
    add_unet_arguments(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rows", type=int, default=25, help="operators in the table")
    p.add_argument("--trace", default="unet_profile.json", help="the chrome://tracing file to write")
    p.set_defaults(run=cmd_profile)
    e = sub.add_parser("export-onnx", help="export the UNet and the VAE decoder to ONNX, checked with onnxruntime")
    e.add_argument("out_dir")
    e.add_argument("--model", default="shapes", help="a known name or a path (see `minidiff models`)")
    e.add_argument("--size", default="512", help="example image size, N or WIDTHxHEIGHT (the axes stay dynamic)")
    e.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    e.add_argument("--overwrite", action="store_true", help="replace unet.onnx / vae_decoder.onnx if they exist")
    e.set_defaults(run=cmd_export_onnx)


def add_unet_arguments(parser):
    """The UNet and its inputs, for bench and profile."""
    parser.add_argument("--config", default="sd15", help="UNetConfig preset (random weights): sd15, sd21, sdxl, "
                        "bk_sdm_small, tiny, sdxl_tiny, ...")
    parser.add_argument("--size", type=int, default=256, help="image size in px (latent = size / 8)")
    parser.add_argument("--images", type=int, default=1, help="images per batch (the UNet sees 2x: CFG)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")


def add_bench_arguments(parser):
    """The flags of `minidiff bench` (benchmarks/ takes the same)."""
    add_unet_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="Euler steps of the end-to-end run")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per rung (medians are reported)")
    parser.add_argument("--rungs", help="comma-separated subset: fp32,half,channels_last,compile,freeze,cuda_graphs,"
                        "reuse_memory,int8,autotune,taesd,bk_small,bk_tiny,fp32_fast")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' only traces: "
                        "a quick check of the compile path)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", help="also write the results as JSON")
    parser.add_argument("--csv", help="also write the results as CSV")


def check_speed_args(args):
    """bench and profile: the options they share."""
    check_device(args.device)
    check_text("--config", args.config)
    check_int("--size", args.size, 8, MAX_SIDE, "a size in px such as 256")  # the bench checks the UNet's multiple
    check_int("--images", args.images, 1, 1000)


def cmd_bench(args, peers=None):
    """The ladder, with the peers ({name: factory}, minidiff.bench) in turns: benchmarks/ passes them."""
    import torch

    from minidiff.bench import bench
    from minidiff.measure import format_table, summary, write_results

    check_speed_args(args)
    check_int("--steps", args.steps, 1, 1000)
    check_int("--repeats", args.repeats, 1, 1000)
    check_int("--threads", args.threads, 1, os.cpu_count() or 1024, optional=True)
    if args.json and args.csv and os.path.realpath(args.json) == os.path.realpath(args.csv):
        raise OutputError(f"--json and --csv both write {shown(args.json)}: give them different names")
    for path in (args.json, args.csv):
        check_writable(path)
    if args.threads:
        torch.set_num_threads(args.threads)
    rungs = args.rungs.split(",") if args.rungs else None
    header, results = bench(args.config, args.size, args.images, args.steps, args.repeats, args.device, rungs,
                            peers=peers, compile_options={"backend": args.compile_backend},
                            log=lambda line: print(line, file=sys.stderr))
    print(header)
    print(format_table(results))
    if comparison := summary(results):
        print(comparison)
    for path in (args.json, args.csv):
        if path:
            write_results(path, results)
    return 0 if all(r.passed for r in results) else 1  # 1: a rung outside its tolerance


def cmd_profile(args):
    from minidiff.bench import profile_unet
    from minidiff.pipeline import DTYPES

    check_speed_args(args)
    check_int("--rows", args.rows, 1, 10000)
    output_format("--trace", args.trace, {".json": "JSON"})
    check_writable(args.trace)
    table, profiler = profile_unet(args.config, args.size, args.images, args.device, DTYPES[args.dtype],
                                   args.channels_last, args.rows)
    print(table)
    atomic_save(args.trace, profiler.export_chrome_trace)
    print(f"wrote {args.trace} (open it in chrome://tracing or https://ui.perfetto.dev)")


def cmd_export_onnx(args):
    from minidiff.export import export_pipeline
    from minidiff.pipeline import load_pipeline

    height, width = parse_size(args.size)
    check_text("--model", args.model)
    out_dir = Path(check_text("the output folder", args.out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{shown(out_dir)} is a file, not a folder: give a folder for the .onnx files")
    if not out_dir.is_dir():
        raise OutputError(f"the folder {shown(out_dir)} does not exist: create it first (mkdir -p {shown(out_dir)})")
    check_outputs({"the output folder": [out_dir / "unet.onnx", out_dir / "vae_decoder.onnx"]}, args.overwrite)
    pipe = load_pipeline(args.model, device="cpu", dtype=args.dtype)
    for name, (path, error) in export_pipeline(pipe, args.out_dir, height, width, check=not args.no_check).items():
        check = "" if error is None else f", max |onnxruntime - torch| = {error:.2e}"
        print(f"wrote {path} ({name}{check})")
