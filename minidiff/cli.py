"""The `minidiff` command: generate images, list samplers and models, download weights.

    minidiff generate "a red circle" [--model shapes] [--sampler dpmpp_2m] [--steps 20] [--trace t.gif]
    minidiff samplers | models | info MODEL | download NAME
    minidiff milestones [--ddim-step my_code.py:my_ddim_step ...]

A user mistake prints one line, `minidiff: error: ...`, and exits with status 2: no traceback.
Files are written to a temporary name and renamed, so nothing half-written is ever left behind.
"""

import argparse
import os
import sys
import tempfile
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
        status = f"present: {where}" if where else f"not downloaded (minidiff download {name})"
        print(f"{name:16s} {entry.get('description', '')}\n{'':16s} {status}")


def cmd_info(args):
    from minidiff.pipeline import load_pipeline

    pipe = load_pipeline(args.model)
    print(pipe.describe())


def cmd_download(args):
    from minidiff.hub import download

    print(download(args.name))


def cmd_milestones(args):
    from minidiff.milestones import main as milestones_main

    status = milestones_main(args.options)
    if status:
        raise SystemExit(status)  # a failed milestone: exit 1 after the checklist is printed


def build_parser():
    parser = argparse.ArgumentParser(prog="minidiff", description="Stable Diffusion from scratch, readable and fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image (or image-to-image with --image)")
    g.add_argument("prompt")
    g.add_argument("--model", default="shapes", help="a known name (see `minidiff models`) or a path; "
                   "default: the bundled shapes model")
    g.add_argument("--sampler", default="dpmpp_2m", help="see `minidiff samplers`")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1: none")
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
    # its options (--only, --ddim-step FILE.py:FUNCTION, ...) are parsed by minidiff.milestones, so that building
    # this parser does not import torch; prefix_chars="+" lets every "--option" through to it untouched
    m = sub.add_parser("milestones", prefix_chars="+", add_help=False,
                       help="the course checklist; check your own code with --NAME FILE.py:FUNCTION (see --help)")
    m.add_argument("options", nargs="*")
    m.set_defaults(run=cmd_milestones)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MinidiffError as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minidiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
