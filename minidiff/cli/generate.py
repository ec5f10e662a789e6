"""`minidiff generate`: text-to-image or image-to-image, with its trace, grid and adapters."""

import math
from pathlib import Path

from minidiff.checks import check_choice, check_device, check_float, check_int, check_seed, check_text, shown
from minidiff.cli.options import (
    ANIMATION_FORMATS,
    IMAGE_FORMATS,
    check_outputs,
    embedding_token,
    image_paths,
    lora_scale,
    output_format,
    parse_adapter,
    parse_size,
)
from minidiff.errors import InputError
from minidiff.files import atomic_save


def add_commands(sub):
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
    g.add_argument("--no-prompt-weights", action="store_true", help="read ( ) [ ] : \\ in the prompts as plain "
                   "text; by default (word:1.3), (word) = 1.1, [word] = 1/1.1 and BREAK weight words (see the README)")
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


def check_generate_args(args) -> dict:
    """Every option of `minidiff generate`, checked before the model is loaded; returns the pipeline's arguments."""
    check_text("the prompt", args.prompt)
    check_text("--negative", args.negative, optional=True)
    if not args.no_prompt_weights:  # bad weight syntax is reported before the model loads
        from minidiff.prompts import parse_prompt_weights

        for text in (args.prompt, args.negative or ""):
            parse_prompt_weights(text)
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
        from minidiff.images import from_pil

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
                trace=bool(args.trace or args.grid), karras=args.karras, prompt_weights=not args.no_prompt_weights)


def cmd_generate(args):
    from minidiff.images import evenly_spaced_steps, trace_frames, trace_grid
    from minidiff.pipeline import load_pipeline
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
