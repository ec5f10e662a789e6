"""`minidiff generate`: text-to-image or image-to-image, with its trace, grid and adapters.

`--prompts FILE` generates one image per line: the i-th prompt (blank lines skipped, counting from 0) gets seed
--seed + i and is written to NAME_i.EXT, so it is the picture `minidiff generate LINE --seed SEED+i` draws. Under
`torchrun --nproc_per_node N` process r draws prompts r, r + N, ... (minidiff.distributed): the same pictures as one
process, N at a time.
"""

import math
from pathlib import Path

from minidiff.checks import (
    MAX_SEED,
    check_choice,
    check_device,
    check_float,
    check_input_file,
    check_int,
    check_seed,
    check_text,
    shown,
)
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
    g.add_argument("prompt", nargs="?", help="what to draw (or --prompts FILE)")
    g.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file, one prompt per line: one image each, "
                   "prompt i with seed --seed + i, written to NAME_i.EXT; split across processes under torchrun")
    g.add_argument("--model", default="shapes", help="a known name (see `minidiff models`) or a path; "
                   "default: the bundled shapes model")
    g.add_argument("--sampler", help="see `minidiff samplers` (default dpmpp_2m; with --noise, the file's: ddim)")
    g.add_argument("--steps", type=int, help="default 20; with --noise, the file's")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1: none (default: 7.5, or "
                   "the scale the model was tuned for: 5 for shapes)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", help="N or WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's own)")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--no-prompt-weights", action="store_true", help="read ( ) [ ] : \\ in the prompts as plain "
                   "text; by default (word:1.3), (word) = 1.1, [word] = 1/1.1 and BREAK weight words (see the README)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--image", help="img2img: the starting image")
    g.add_argument("--noise", help="start from this noise file (from `minidiff invert`): its sampler, steps and "
                   "guidance unless given; the size and the number of images follow the noise")
    g.add_argument("--mask", help="inpainting: a picture of the --image's size, white where it is repainted, black "
                   "where it is kept")
    g.add_argument("--strength", type=float, help="img2img: fraction of the steps to run (default 0.8; 1.0 with "
                   "--mask)")
    g.add_argument("--early-exit", type=float, help="stop at this fraction of the steps (e.g. 0.7) and "
                   "return the model's pred_x0 there")
    g.add_argument("--karras", action="store_true", help="Karras sigmas (sigma-space samplers)")
    g.add_argument("--trace", help="write an animation (.gif, or animated .png / .webp): x_inter on top, pred_x0 "
                   "below")
    g.add_argument("--grid", help="write a PNG: x_inter and pred_x0 rows at 8 steps")
    g.add_argument("--attention-maps", metavar="FILE", help="write a PNG: the image, then one heat map per prompt "
                   "token of where it was attended to (cross-attention over layers, heads and steps)")
    g.add_argument("--guidance-cutoff", type=float, metavar="FRACTION", help="switch guidance off after this "
                   "fraction of the steps (e.g. 0.4): the rest call the UNet on the prompt alone")
    g.add_argument("--preview", choices=["vae", "taesd"], default="vae", help="decoder for --trace/--grid")
    g.add_argument("--taesd", default="taesd", help="TAESD weights for --preview taesd")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a LoRA, kohya/A1111 or "
                   "diffusers safetensors, at SCALE (default 1.0); the words bundled into it are added; repeatable")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]", help="a textual-inversion "
                   "embedding (A1111 or diffusers safetensors) whose word is TOKEN (default: the file's); repeatable")
    g.add_argument("--out", default="image.png", help="the image; its extension decides the format (.png, .jpg, "
                   ".webp, ...); several images: NAME_0.png, NAME_1.png, ...")
    g.add_argument("--refiner", metavar="PATH_OR_NAME", help="SDXL: the refiner (e.g. sdxl-refiner) runs the last, "
                   "low-noise steps from the --model's latents (minidiff.refiner)")
    g.add_argument("--refiner-start", type=float, metavar="FRACTION", help="where the refiner takes over: a fraction "
                   "of the schedule (default 0.8: the base runs t = 1000 down to 200)")
    g.add_argument("--overwrite", action="store_true", help="replace output files that exist already "
                   "(without it they are refused before anything is generated)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    g.set_defaults(run=cmd_generate)


def check_generate_args(args) -> dict:
    """Every option of `minidiff generate`, checked before the model is loaded; returns the pipeline's arguments."""
    prompts = read_prompts(args)
    noise = noise_defaults(args)
    check_text("--negative", args.negative, optional=True)
    if not args.no_prompt_weights:  # bad weight syntax is reported before the model loads
        from minidiff.prompts import parse_prompt_weights

        for text in [*prompts, args.negative or ""]:
            parse_prompt_weights(text)
    check_text("--model", args.model)
    check_device(args.device)
    steps = check_int("--steps", args.steps, 1, 1000, "the training schedules have 1000 timesteps")
    check_float("--guidance", args.guidance, optional=True)
    check_seed(args.seed, "--seed")
    if args.prompts and args.seed + len(prompts) - 1 > MAX_SEED:
        raise InputError(f"--seed {args.seed} + {len(prompts) - 1} (the last prompt's seed) is past {MAX_SEED}: "
                         f"use a smaller --seed")
    check_int("--num-images", args.num_images, 1, 1000, "generate in several runs")
    if args.image is None and args.strength is not None:
        raise InputError("--strength is the img2img strength: give --image too, or drop --strength")
    if args.mask is not None and args.image is None:
        raise InputError("--mask marks the part of --image to repaint: give --image too, or drop --mask")
    default_strength = 0.8 if args.mask is None else 1.0
    strength = check_float("--strength", default_strength if args.strength is None else args.strength, 0.0, 1.0,
                           "the fraction of the steps run from the noised image")
    if args.image is not None:
        from minidiff.images import from_pil
        from minidiff.inpaint import check_inpaint_inputs

        check_text("--image", args.image)
        from_pil(args.image)  # a complete picture, within the size limits: read now, before the model loads
        if args.mask is not None:
            check_text("--mask", args.mask)
            check_inpaint_inputs(args.image, args.mask)
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
    outputs = {"--out": image_paths(args.out, len(prompts) if args.prompts else args.num_images)}
    if args.trace:
        output_format("--trace", args.trace, ANIMATION_FORMATS)
        outputs["--trace"] = [Path(args.trace)]
    if args.grid:
        output_format("--grid", args.grid, IMAGE_FORMATS)
        outputs["--grid"] = [Path(args.grid)]
    if args.attention_maps:
        output_format("--attention-maps", args.attention_maps, IMAGE_FORMATS)
        outputs["--attention-maps"] = [Path(args.attention_maps)]
    check_float("--guidance-cutoff", args.guidance_cutoff, 0.0, 1.0, "the fraction of the steps run with guidance",
                optional=True)
    check_refiner_args(args)
    check_outputs(outputs, args.overwrite)
    height, width = parse_size(args.size) if args.size is not None else (None, None)
    if noise is not None:
        height, width = noise_size(args, noise, height, width)
    return dict(prompt=prompts if args.prompts else args.prompt, latents=noise, negative_prompt=args.negative,
                steps=steps, sampler=args.sampler, guidance_scale=args.guidance, seed=args.seed, height=height,
                width=width, num_images=args.num_images, image=args.image, mask=args.mask, strength=strength,
                early_exit=early_exit, preview=args.preview, trace=bool(args.trace or args.grid), karras=args.karras,
                attention_maps=bool(args.attention_maps), prompt_weights=not args.no_prompt_weights)


def check_refiner_args(args) -> None:
    """--refiner and --refiner-start: a fraction strictly inside (0, 1), and no option that a two-stage run lacks."""
    if args.refiner is None:
        if args.refiner_start is not None:
            raise InputError("--refiner-start says where the refiner takes over: give --refiner too, or drop it")
        return
    if not args.refiner:
        raise InputError("--refiner is empty: give the refiner's path or known name (e.g. sdxl-refiner)")
    check_text("--refiner", args.refiner)
    start = 0.8 if args.refiner_start is None else args.refiner_start
    if not 0 < start < 1:  # NaN too
        raise InputError(f"--refiner-start must be a fraction strictly between 0 and 1 (e.g. 0.8), got {start}")
    for flag, given in (("--image", args.image), ("--noise", args.noise), ("--prompts", args.prompts),
                        ("--trace", args.trace), ("--grid", args.grid), ("--early-exit", args.early_exit),
                        ("--attention-maps", args.attention_maps), ("--guidance-cutoff", args.guidance_cutoff)):
        if given is not None:
            raise InputError(f"{flag} does not go with --refiner (text-to-image in two stages, one prompt): drop "
                             f"{flag} or --refiner")
    args.refiner_start = start


MAX_PROMPTS = 1000  # lines of --prompts, as --num-images: more in several runs
MAX_PROMPTS_BYTES = 2**20


def read_prompts(args) -> list:
    """The prompt, or the non-blank lines of --prompts (stripped), checked; --prompts excludes some options."""
    if (args.prompt is None) == (args.prompts is None):
        raise InputError("give a prompt, or --prompts FILE (one prompt per line), not both"
                         if args.prompt is not None else "give a prompt (in quotes), or --prompts FILE")
    if args.prompt is not None:
        return [check_text("the prompt", args.prompt)]
    path = check_input_file(args.prompts, "--prompts", max_bytes=MAX_PROMPTS_BYTES)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"--prompts {shown(path)} is not UTF-8 text (line {line}, byte {error.start}): save it as "
                         f"UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {shown(path)} has no prompts: write one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"--prompts {shown(path)} has {len(prompts)} prompts, more than {MAX_PROMPTS}: split the "
                         f"file and give later parts --seed {args.seed} + the lines before them")
    for flag, given in (("--num-images", args.num_images != 1), ("--trace", args.trace), ("--grid", args.grid),
                        ("--noise", args.noise), ("--attention-maps", args.attention_maps)):
        if given:
            raise InputError(f"{flag} goes with one prompt, not --prompts (one image per line; repeat a line "
                             f"for more): drop {flag}")
    return prompts


def load_with_adapters(args, loras: list, words: list):
    from minidiff.pipeline import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype,
                         taesd=args.taesd if args.preview == "taesd" else None)
    for path, scale in loras:
        pipe.load_lora(path, 1.0 if scale is None else scale)
    if loras:
        pipe.fuse_lora()  # one matmul per layer again: sampling as fast as without LoRAs
    for path, token in words:
        pipe.load_textual_inversion(path, token)
    return pipe


def generate_prompts(args, options: dict, loras: list, words: list) -> None:
    """Image i of options["prompt"] (a list) with seed --seed + i, written to NAME_i.EXT; under torchrun this
    process draws its share (i = rank, rank + N, ...), on GPU LOCAL_RANK when the device is CUDA."""
    import torch

    from minidiff import distributed

    world = distributed.setup("cpu")  # gloo: the processes only wait for each other
    try:
        distributed.barrier()  # every process has checked the outputs before any is written
        if world.distributed and args.device in (None, "cuda") and torch.cuda.is_available():
            args.device = f"cuda:{world.local_rank % torch.cuda.device_count()}"  # the GPUs dealt out in turn
        pipe = load_with_adapters(args, loras, words)
        prompts, seed = options.pop("prompt"), options.pop("seed")
        paths = image_paths(args.out, len(prompts))
        kind, written = output_format("--out", args.out, IMAGE_FORMATS), []
        for i in distributed.my_indices(len(prompts)):
            image = pipe(prompts[i], **options, seed=seed + i, progress=distributed.is_main()).images[0]
            atomic_save(paths[i], lambda p, image=image: image.save(p, format=kind))
            written.append(paths[i])
    finally:
        distributed.teardown()
    print("wrote " + (", ".join(shown(o) for o in written) or "nothing (more processes than prompts)"))


def cmd_generate(args):
    from minidiff.images import attention_grid, evenly_spaced_steps, trace_frames, trace_grid
    from minidiff.samplers import SAMPLERS
    from minidiff.steering import guidance_cutoff

    options = check_generate_args(args)
    check_choice("sampler", args.sampler, sorted(SAMPLERS))
    loras = [parse_adapter("--lora", spec, lora_scale) for spec in args.lora]
    words = [parse_adapter("--embedding", spec, embedding_token) for spec in args.embedding]
    if args.guidance_cutoff is not None:  # diffusers' SDCFGCutoffCallback: counted over the steps run
        steps_run = int(options["steps"] * options["strength"]) if args.image else options["steps"]
        options["callback"] = guidance_cutoff(steps_run, args.guidance_cutoff)
    if args.prompts:
        return generate_prompts(args, options, loras, words)
    pipe = load_with_adapters(args, loras, words)
    noise = options["latents"]
    if noise is not None and noise.shape[1] != pipe.latent_channels():
        raise InputError(f"--noise {shown(args.noise)} holds {noise.shape[1]}-channel latents, but --model "
                         f"{shown(args.model)} works in {pipe.latent_channels()}: invert the picture with this model")
    if args.refiner is not None:  # two experts: --model down to --refiner-start, the refiner from there
        from minidiff.pipeline import load_pipeline
        from minidiff.refiner import refine

        refiner = load_pipeline(args.refiner, device=args.device, dtype=args.dtype)
        for name in ("image", "mask", "strength"):
            options.pop(name)
        result = refine(pipe, refiner, options.pop("prompt"), args.refiner_start, **options)
    else:
        result = pipe(**options)
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
    if args.attention_maps:
        kind = output_format("--attention-maps", args.attention_maps, IMAGE_FORMATS)
        grid = attention_grid(result.images, result.attention_maps)
        atomic_save(args.attention_maps, lambda p: grid.save(p, format=kind))
        outputs.append(args.attention_maps)
    print("wrote " + ", ".join(shown(o) for o in outputs))


def noise_defaults(args):
    """--noise: the latents of a noise file, with the file's sampler, steps and guidance where none were given."""
    made = {}
    noise = None
    if args.noise is not None:
        from minidiff.inversion import load_noise

        if args.image is not None:
            raise InputError("--noise is the starting noise of text-to-image and --image the starting picture of "
                             "img2img: give one of them")
        noise, made = load_noise(args.noise, "--noise")
    for option, name, default, kind in (("--sampler", "sampler", "dpmpp_2m", str), ("--steps", "steps", 20, int),
                                        ("--guidance", "guidance_scale", None, float)):
        what = {str: "text", int: "a whole number", float: "a number"}[kind]
        attribute = option.removeprefix("--")
        if getattr(args, attribute) is None:
            try:
                setattr(args, attribute, kind(made[name]) if name in made else default)
            except ValueError:
                raise InputError(f"--noise {shown(args.noise)}: its metadata {name}={made[name]!r} is not "
                                 f"{what}: give {option} yourself") from None
    return noise


def noise_size(args, noise, height, width) -> tuple:
    """The picture size of --noise latents; a --size or --num-images that disagrees with them is refused."""
    batch, _, rows, columns = noise.shape
    if height is not None and (height, width) != (8 * rows, 8 * columns):
        raise InputError(f"--noise {shown(args.noise)} holds noise for {8 * columns}x{8 * rows} px pictures, but "
                         f"--size asks for {width}x{height}: drop --size (the size follows the noise), or invert "
                         "at that size")
    if batch != args.num_images:
        raise InputError(f"--noise {shown(args.noise)} holds noise for {batch} picture(s), but --num-images is "
                         f"{args.num_images}: pass --num-images {batch}")
    return 8 * rows, 8 * columns
