"""The `minidiff` command: generate images, list samplers and models, download weights.

    minidiff generate "a red circle" [--model shapes] [--sampler dpmpp_2m] [--steps 20] [--trace t.gif]
    minidiff samplers | models | info MODEL | download NAME
    minidiff bench [--config sd15] [--size 256] | profile [--trace t.json] | export-onnx OUT_DIR [--model shapes]

Other packages add commands through the "minidiff.commands" entry point (a function given the subparsers):
minidiff.course adds `minidiff milestones` and `minidiff sampler-table` that way, so the library never imports it.

A user mistake prints one line, `minidiff: error: ...`, and exits with status 2: no traceback.
Files are written to a temporary name and renamed, so nothing half-written is ever left behind.
"""

import argparse
import os
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from minidiff.errors import MinidiffError


def atomic_save(path, save):
    """Call save(tmp_path), then rename tmp_path to path: readers never see a partial file."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise MinidiffError(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise MinidiffError(f"cannot write {path}: {e.strerror}. Choose a writable location.") from None
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path):
    """Fail before any work is done when the output path cannot be written."""
    if path is None:
        return
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MinidiffError(f"cannot write {path}: {parent} is not a writable folder")


def parse_size(text: str):
    """'512' -> (512, 512); '640x384' -> (height 384, width 640) as WIDTHxHEIGHT."""
    try:
        if "x" in text:
            width, height = (int(v) for v in text.lower().split("x"))
        else:
            width = height = int(text)
    except ValueError:
        raise MinidiffError(f"--size must be N or WIDTHxHEIGHT, e.g. 512 or 640x384; got {text!r}") from None
    return height, width


def cmd_generate(args):
    from minidiff.pipeline import evenly_spaced_steps, load_pipeline, trace_frames, trace_grid

    for path in (args.out, args.trace, args.grid):
        check_writable(path)
    height, width = parse_size(args.size) if args.size else (None, None)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype,
                         taesd=args.taesd if args.preview == "taesd" else None)
    early_exit = args.early_exit
    if early_exit is not None and early_exit > 1:
        early_exit = int(early_exit)
    result = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, sampler=args.sampler,
                  guidance_scale=args.guidance, seed=args.seed, height=height, width=width,
                  num_images=args.num_images, image=args.image, strength=args.strength, early_exit=early_exit,
                  preview=args.preview, trace=bool(args.trace or args.grid), karras=args.karras)
    outputs = []
    for i, image in enumerate(result.images):
        out = Path(args.out)
        if len(result.images) > 1:
            out = out.with_name(f"{out.stem}_{i}{out.suffix}")
        atomic_save(out, image.save)
        outputs.append(out)
    if args.trace:
        frames = trace_frames(result.trace)
        atomic_save(args.trace, lambda p: frames[0].save(p, format="GIF", save_all=True,
                                                        append_images=frames[1:], duration=120, loop=0))
        outputs.append(args.trace)
    if args.grid:
        total = len(result.trace)
        chosen = evenly_spaced_steps(total, 8)
        atomic_save(args.grid, lambda p: trace_grid(result.trace, chosen).save(p, format="PNG"))
        outputs.append(args.grid)
    print("wrote " + ", ".join(str(o) for o in outputs))


def cmd_samplers(args):
    from minidiff.samplers import SAMPLERS

    for name in sorted(SAMPLERS):
        doc = (SAMPLERS[name].__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}")


def cmd_models(args):
    from minidiff.hub import KNOWN_MODELS, local_path

    for name, entry in KNOWN_MODELS.items():
        where = local_path(name)
        missing = "not trained yet (python -m minidiff.course.train shapes)" if "bundled" in entry else \
            f"not downloaded (minidiff download {name})"
        status = f"present: {where}" if where else missing
        print(f"{name:16s} {entry.get('description', '')}\n{'':16s} {status}")


def cmd_info(args):
    from minidiff.hub import KNOWN_MODELS, describe_known, local_path
    from minidiff.pipeline import load_pipeline

    if args.model in KNOWN_MODELS and "architecture" in KNOWN_MODELS[args.model] and local_path(args.model) is None:
        print(describe_known(args.model))  # not downloaded: the architecture from the config alone
        return
    pipe = load_pipeline(args.model)
    print(pipe.describe())


def cmd_download(args):
    from minidiff.hub import download

    print(download(args.name))


def cmd_bench(args):
    import torch

    from minidiff.bench import bench, format_table, summary, write_results

    for path in (args.json, args.csv):
        check_writable(path)
    if args.threads:
        torch.set_num_threads(args.threads)
    rungs = args.rungs.split(",") if args.rungs else None
    header, results = bench(args.config, args.size, args.images, args.steps, args.repeats, args.device, rungs,
                            diffusers=not args.no_diffusers, compile_options={"backend": args.compile_backend},
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
    pipe = load_pipeline(args.model, device="cpu", dtype=args.dtype)
    for name, (path, error) in export_pipeline(pipe, args.out_dir, height, width, check=not args.no_check).items():
        check = "" if error is None else f", max |onnxruntime - torch| = {error:.2e}"
        print(f"wrote {path} ({name}{check})")


def build_parser():
    parser = argparse.ArgumentParser(prog="minidiff", description="Stable Diffusion from scratch, readable and fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image (or image-to-image with --image)")
    g.add_argument("prompt")
    g.add_argument("--model", default="shapes", help="a known name (see `minidiff models`) or a path; "
                   "default: the bundled shapes model")
    g.add_argument("--sampler", default="dpmpp_2m", help="see `minidiff samplers`")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1: none (default: 7.5, or "
                   "the scale the model was tuned for: 5 for shapes)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", help="N or WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's own)")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--image", help="img2img: the starting image")
    g.add_argument("--strength", type=float, default=0.8, help="img2img: fraction of the steps to run")
    g.add_argument("--early-exit", type=float, help="stop at this fraction of the steps (e.g. 0.7) and "
                   "return the model's pred_x0 there")
    g.add_argument("--karras", action="store_true", help="Karras sigmas (sigma-space samplers)")
    g.add_argument("--trace", help="write an animated GIF: x_inter on top, pred_x0 below")
    g.add_argument("--grid", help="write a PNG: x_inter and pred_x0 rows at 8 steps")
    g.add_argument("--preview", choices=["vae", "taesd"], default="vae", help="decoder for --trace/--grid")
    g.add_argument("--taesd", default="taesd", help="TAESD weights for --preview taesd")
    g.add_argument("--out", default="image.png")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    g.set_defaults(run=cmd_generate)

    sub.add_parser("samplers", help="list the samplers").set_defaults(run=cmd_samplers)
    sub.add_parser("models", help="known models and which are present").set_defaults(run=cmd_models)
    i = sub.add_parser("info", help="architecture, parameter counts, dtype and files of a model")
    i.add_argument("model")
    i.set_defaults(run=cmd_info)
    d = sub.add_parser("download", help="download a known model into the Hugging Face cache")
    d.add_argument("name")
    d.set_defaults(run=cmd_download)
    add_speed_commands(sub)
    for plugin in entry_points(group="minidiff.commands"):  # the course's commands (milestones, sampler-table)
        plugin.load()(sub)
    return parser


def add_speed_commands(sub):
    """bench, profile, export-onnx (minidiff.bench, minidiff.export)."""
    b = sub.add_parser("bench", help="the speed ladder: ms per UNet step for each speed option, accuracy, "
                       "and the ratio to diffusers on the same weights")
    p = sub.add_parser("profile", help="the top operators of one UNet step, and a chrome://tracing trace")
    for parser in (b, p):
        parser.add_argument("--config", default="sd15", help="UNetConfig preset (random weights): sd15, sd21, "
                            "bk_sdm_small, tiny, ...")
        parser.add_argument("--size", type=int, default=256, help="image size in px (latent = size / 8)")
        parser.add_argument("--images", type=int, default=1, help="images per batch (the UNet sees 2x: CFG)")
        parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    b.add_argument("--steps", type=int, default=4, help="Euler steps of the end-to-end run")
    b.add_argument("--repeats", type=int, default=3, help="end-to-end runs per rung (medians are reported)")
    b.add_argument("--rungs", help="comma-separated subset: fp32,half,channels_last,compile,freeze,cuda_graphs,"
                   "reuse_memory,taesd,bk_small,bk_tiny")
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' only traces: "
                   "a quick check of the compile path)")
    b.add_argument("--no-diffusers", action="store_true", help="skip the comparison with diffusers' UNet")
    b.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    b.add_argument("--json", help="also write the results as JSON")
    b.add_argument("--csv", help="also write the results as CSV")
    b.set_defaults(run=cmd_bench)
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
    e.set_defaults(run=cmd_export_onnx)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except MinidiffError as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minidiff: interrupted", file=sys.stderr)
        return 130
    return status or 0  # a command may return its own exit status (milestones: 1 when one fails)


if __name__ == "__main__":
    sys.exit(main())
