"""The `minidiff` command: generate images, list samplers and models, download weights.

    minidiff generate "a red circle" [--model shapes] [--sampler dpmpp_2m] [--steps 20] [--trace t.gif]
    minidiff samplers | models | info MODEL | download NAME
    minidiff sampler-table [--model shapes] [--prompts 200] [--grid samplers.png]
    minidiff bench [--config sd15] [--size 256] | profile [--trace t.json] | export-onnx OUT_DIR [--model shapes]
    minidiff milestones [--ddim-step my_code.py:my_ddim_step ...]

A user mistake prints one line, `minidiff: error: ...`, and exits with status 2: no traceback.
Files are written to a temporary name and renamed, so nothing half-written is ever left behind.
"""

import argparse
import sys
from pathlib import Path

from minidiff.errors import MinidiffError
from minidiff.files import atomic_save, check_writable


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


def cmd_sampler_table(args):
    from minidiff.evaluate import format_table, held_out_prompts, sampler_table, save_grid
    from minidiff.pipeline import load_pipeline

    check_writable(args.grid)
    if args.prompts < 1:
        raise MinidiffError(f"--prompts must be a positive integer, got {args.prompts}")
    pipe = load_pipeline(args.model, device=args.device)
    results, images = sampler_table(pipe, args.prompts, args.guidance, args.seed, args.batch)
    print(f"{pipe.source}: {args.prompts} held-out prompts, guidance {args.guidance}, seed {args.seed}")
    print(format_table(results, args.prompts))
    if args.grid:
        atomic_save(args.grid, lambda p: save_grid(images, held_out_prompts(args.prompts, args.seed), p))
        print(f"wrote {args.grid}")


def cmd_models(args):
    from minidiff.hub import KNOWN_MODELS, local_path

    for name, entry in KNOWN_MODELS.items():
        where = local_path(name)
        missing = "not trained yet (python -m minidiff.train shapes)" if "bundled" in entry else \
            f"not downloaded (minidiff download {name})"
        status = f"present: {where}" if where else missing
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

    return milestones_main(args.options)  # 1 when a milestone failed, after the checklist is printed


def cmd_bench(args, peers=None):
    """The ladder, with the peers ({name: factory}, minidiff.bench) in turns: benchmarks/ passes them."""
    import torch

    from minidiff.bench import bench, format_table, summary, write_results

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
    t = sub.add_parser("sampler-table", help="the samplers side by side on a shapes model: held-out adherence, "
                       "difference to DDIM 50, time")
    t.add_argument("--model", default="shapes", help="a shapes model: a known name or a path (default: shapes)")
    t.add_argument("--prompts", type=int, default=200, help="held-out prompts per sampler")
    t.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=50, help="prompts per batch")
    t.add_argument("--grid", help="also write a PNG: a row of pictures per sampler")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    t.set_defaults(run=cmd_sampler_table)
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
    add_speed_commands(sub)
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
    return status or 0  # a command may return its own exit status (milestones: 1 when one fails)


if __name__ == "__main__":
    sys.exit(main())
