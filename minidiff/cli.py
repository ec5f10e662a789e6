"""The `minidiff` command: generate images, list samplers and models, download weights.

    minidiff generate "a red circle" [--model shapes] [--sampler dpmpp_2m] [--steps 20] [--trace t.gif]
                      [--lora style.safetensors:0.8 ...] [--embedding my-word.safetensors:<my-word> ...]
    minidiff samplers | models | info MODEL | download NAME
    minidiff bench [--config sd15] [--size 256] | profile [--trace t.json] | export-onnx OUT_DIR [--model shapes]

Other packages add commands through the "minidiff.commands" entry point (a function given the subparsers):
minidiff.course adds `minidiff milestones` and `minidiff sampler-table` that way, so the library never imports it.

A user mistake prints one line, `minidiff: error: ...`, and exits with status 2: no traceback.
Files are written to a temporary name and renamed, so nothing half-written is ever left behind.
"""

import argparse
import math
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from minidiff.checks import (
    check_choice,
    check_device,
    check_float,
    check_int,
    check_seed,
    check_text,
    literal,
    shown,
)
from minidiff.errors import InputError, MinidiffError, OutputError
from minidiff.files import atomic_save, check_writable

IMAGE_FORMATS = {".png": "PNG", ".gif": "GIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}  # --out and --grid: the extension decides the format
ANIMATION_FORMATS = {".gif": "GIF", ".png": "PNG", ".webp": "WEBP"}  # --trace: GIF, animated PNG, animated WebP
MAX_SIDE = 16384  # px: far past what any SD model was trained for; the memory estimate decides below this


def parse_size(text: str, option: str = "--size"):
    """'512' -> (512, 512); '640x384' -> (height 384, width 640) as WIDTHxHEIGHT; multiples of 8, at least 8."""
    text = check_text(option, text)
    try:
        if "x" in text.lower():
            width, height = (int(v) for v in text.lower().split("x"))
        else:
            width = height = int(text)
    except ValueError:
        raise InputError(f"{option} must be N or WIDTHxHEIGHT, e.g. 512 or 640x384; got {literal(text)}") from None
    for side in (width, height):
        if side < 8 or side % 8 or side > MAX_SIDE:
            fix = min(max(8, 8 * round(side / 8)), MAX_SIDE)
            raise InputError(f"{option} {shown(text)}: each side must be a multiple of 8 px (the VAE downsamples by "
                             f"8) from 8 to {MAX_SIDE}; try {fix}")
    return height, width


def output_format(option: str, path, formats: dict) -> str:
    """The file format an output's extension asks for; unknown or missing extensions are refused up front."""
    check_text(option, str(path))
    if Path(path).is_dir():
        raise OutputError(f"{option} {shown(path)} is a folder: give a file name such as "
                          f"{shown(Path(path) / ('out' + next(iter(formats))))}")
    suffix = Path(path).suffix.lower()
    allowed = ", ".join(sorted(formats))
    if not suffix:
        raise OutputError(f"{option} {shown(path)} has no extension: name it e.g. {shown(path)}"
                          f"{next(iter(formats))} (allowed: {allowed})")
    if suffix not in formats:
        raise OutputError(f"{option} {shown(path)}: unknown extension {shown(suffix)}; use one of {allowed}")
    return formats[suffix]


def image_paths(out, count: int) -> list:
    """--out for `count` images: the path itself, or name_0.png, name_1.png, ... for several."""
    out = Path(out)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def check_outputs(outputs: dict, overwrite: bool) -> None:
    """{option: [paths]}: writable, not folders, not existing (unless overwrite), and no two the same file."""
    seen = {}
    for option, paths in outputs.items():
        for path in paths:
            check_writable(path, overwrite=overwrite)
            key = os.path.realpath(path)
            if key in seen:
                raise OutputError(f"{option} and {seen[key]} both write {shown(path)}: give them different names")
            seen[key] = option


def check_generate_args(args) -> dict:
    """Every option of `minidiff generate`, checked before the model is loaded; returns the pipeline's arguments."""
    check_text("the prompt", args.prompt)
    check_text("--negative", args.negative, optional=True)
    check_text("--model", args.model)
    check_device(args.device)
    steps = check_int("--steps", args.steps, 1, 1000, "the training schedules have 1000 timesteps")
    check_float("--guidance", args.guidance, optional=True)
    check_seed(args.seed, "--seed")
    check_int("--num-images", args.num_images, 1, 1000, "generate in several runs")
    if args.image is None and args.strength is not None:
        raise InputError("--strength is the img2img strength: give --image too, or drop --strength")
    strength = check_float("--strength", 0.8 if args.strength is None else args.strength, 0.0, 1.0,
                           "the fraction of the steps run from the noised image")
    if args.image is not None:
        from minidiff.pipeline import from_pil

        check_text("--image", args.image)
        from_pil(args.image)  # a complete picture, within the size limits: read now, before the model loads
        if (args.trace or args.grid) and int(steps * strength) == 0:
            raise InputError(f"--strength {strength} runs {int(steps * strength)} of the {steps} steps, so there is "
                             "nothing to trace: raise --strength (or --steps), or drop --trace/--grid")
    early_exit = args.early_exit
    if early_exit is not None:
        if not math.isfinite(early_exit) or early_exit <= 0 or (early_exit > 1 and not early_exit.is_integer()):
            raise InputError(f"--early-exit must be a fraction in (0, 1] of the steps (e.g. 0.7) or a whole number "
                             f"of steps (e.g. 14), got {early_exit}")
        if early_exit > 1:
            early_exit = check_int("--early-exit", int(early_exit), 1, steps, "at most --steps")
    if args.preview == "taesd":
        check_text("--taesd", args.taesd)
    output_format("--out", args.out, IMAGE_FORMATS)
    outputs = {"--out": image_paths(args.out, args.num_images)}
    if args.trace:
        output_format("--trace", args.trace, ANIMATION_FORMATS)
        outputs["--trace"] = [Path(args.trace)]
    if args.grid:
        output_format("--grid", args.grid, IMAGE_FORMATS)
        outputs["--grid"] = [Path(args.grid)]
    check_outputs(outputs, args.overwrite)
    height, width = parse_size(args.size) if args.size is not None else (None, None)
    return dict(negative_prompt=args.negative, steps=steps, sampler=args.sampler, guidance_scale=args.guidance,
                seed=args.seed, height=height, width=width, num_images=args.num_images, image=args.image,
                strength=strength, early_exit=early_exit, preview=args.preview,
                trace=bool(args.trace or args.grid), karras=args.karras)


def parse_adapter(flag: str, text: str, parse_tail):
    """'FILE' or 'FILE:TAIL' -> (FILE, parse_tail(TAIL) or None); a path that exists is taken whole."""
    path, tail = text, None
    if not Path(text).is_file() and ":" in text:
        path, _, tail = text.rpartition(":")
        tail = parse_tail(tail)
    if not Path(path).is_file():
        raise InputError(f"{flag} {text!r}: no such file {path}")
    return path, tail


def lora_scale(text: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        scale = float("nan")
    if not math.isfinite(scale):
        raise InputError(f"--lora: the scale after ':' must be a number, got {text!r} (e.g. style.safetensors:0.8)")
    return scale


def embedding_token(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise InputError(f"--embedding: the token after ':' must be a word without spaces around it, got {text!r} "
                            "(e.g. my-word.safetensors:<my-word>)")
    return text


def cmd_generate(args):
    from minidiff.pipeline import evenly_spaced_steps, load_pipeline, trace_frames, trace_grid
    from minidiff.samplers import SAMPLERS

    options = check_generate_args(args)
    check_choice("sampler", args.sampler, sorted(SAMPLERS))
    loras = [parse_adapter("--lora", spec, lora_scale) for spec in args.lora]
    words = [parse_adapter("--embedding", spec, embedding_token) for spec in args.embedding]
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype,
                         taesd=args.taesd if args.preview == "taesd" else None)
    for path, scale in loras:
        pipe.load_lora(path, 1.0 if scale is None else scale)
    if loras:
        pipe.fuse_lora()  # one matmul per layer again: sampling as fast as without LoRAs
    for path, token in words:
        pipe.load_textual_inversion(path, token)
    result = pipe(args.prompt, **options)
    outputs = []
    kind = output_format("--out", args.out, IMAGE_FORMATS)
    for out, image in zip(image_paths(args.out, len(result.images)), result.images):
        atomic_save(out, lambda p, image=image: image.save(p, format=kind))
        outputs.append(out)
    if args.trace:
        frames = trace_frames(result.trace)
        kind = output_format("--trace", args.trace, ANIMATION_FORMATS)
        atomic_save(args.trace, lambda p: frames[0].save(p, format=kind, save_all=True,
                                                        append_images=frames[1:], duration=120, loop=0))
        outputs.append(args.trace)
    if args.grid:
        total = len(result.trace)
        chosen = evenly_spaced_steps(total, 8)
        kind = output_format("--grid", args.grid, IMAGE_FORMATS)
        atomic_save(args.grid, lambda p: trace_grid(result.trace, chosen).save(p, format=kind))
        outputs.append(args.grid)
    print("wrote " + ", ".join(shown(o) for o in outputs))


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

    check_text("the model", args.model)
    if args.model in KNOWN_MODELS and "architecture" in KNOWN_MODELS[args.model] and local_path(args.model) is None:
        print(describe_known(args.model))  # not downloaded: the architecture from the config alone
        return
    pipe = load_pipeline(args.model)
    print(pipe.describe())


def cmd_download(args):
    from minidiff.hub import download

    print(download(args.name))


def cmd_bench(args, peers=None):
    """The ladder, with the peers ({name: factory}, minidiff.bench) in turns: benchmarks/ passes them."""
    import torch

    from minidiff.bench import bench, format_table, summary, write_results

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


def check_speed_args(args):
    """bench and profile: the options they share."""
    check_device(args.device)
    check_text("--config", args.config)
    check_int("--size", args.size, 8, MAX_SIDE, "a size in px such as 256")  # the bench checks the UNet's multiple
    check_int("--images", args.images, 1, 1000)


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


class Parser(argparse.ArgumentParser):
    """argparse with minidiff's one-line error (argparse prints the usage, then the error)."""

    def error(self, message):
        print(f"minidiff: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    parser = Parser(prog="minidiff", description="Stable Diffusion from scratch, readable and fast.")
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
    g.add_argument("--strength", type=float, help="img2img: fraction of the steps to run (default 0.8)")
    g.add_argument("--early-exit", type=float, help="stop at this fraction of the steps (e.g. 0.7) and "
                   "return the model's pred_x0 there")
    g.add_argument("--karras", action="store_true", help="Karras sigmas (sigma-space samplers)")
    g.add_argument("--trace", help="write an animation (.gif, or animated .png / .webp): x_inter on top, pred_x0 "
                   "below")
    g.add_argument("--grid", help="write a PNG: x_inter and pred_x0 rows at 8 steps")
    g.add_argument("--preview", choices=["vae", "taesd"], default="vae", help="decoder for --trace/--grid")
    g.add_argument("--taesd", default="taesd", help="TAESD weights for --preview taesd")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a LoRA, kohya/A1111 or "
                   "diffusers safetensors, at SCALE (default 1.0); repeatable")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]", help="a textual-inversion "
                   "embedding (A1111 or diffusers safetensors) whose word is TOKEN (default: the file's); repeatable")
    g.add_argument("--out", default="image.png", help="the image; its extension decides the format (.png, .jpg, "
                   ".webp, ...); several images: NAME_0.png, NAME_1.png, ...")
    g.add_argument("--overwrite", action="store_true", help="replace output files that exist already "
                   "(without it they are refused before anything is generated)")
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
    parser.add_argument("--config", default="sd15", help="UNetConfig preset (random weights): sd15, sd21, "
                        "bk_sdm_small, tiny, ...")
    parser.add_argument("--size", type=int, default=256, help="image size in px (latent = size / 8)")
    parser.add_argument("--images", type=int, default=1, help="images per batch (the UNet sees 2x: CFG)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")


def add_bench_arguments(parser):
    """The flags of `minidiff bench` (benchmarks/ takes the same)."""
    add_unet_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="Euler steps of the end-to-end run")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per rung (medians are reported)")
    parser.add_argument("--rungs", help="comma-separated subset: fp32,half,channels_last,compile,freeze,cuda_graphs,"
                        "reuse_memory,taesd,bk_small,bk_tiny")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' only traces: "
                        "a quick check of the compile path)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", help="also write the results as JSON")
    parser.add_argument("--csv", help="also write the results as CSV")


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
    except MemoryError:  # what the memory estimate did not foresee
        print("minidiff: error: out of memory: use a smaller --size or --num-images, or --dtype float16",
              file=sys.stderr)
        return 2
    return status or 0  # a command may return its own exit status (milestones: 1 when one fails)


if __name__ == "__main__":
    sys.exit(main())
