"""`minidiff invert`: a picture back to its DDIM noise, saved for `minidiff generate --noise`.

    minidiff invert picture.png --prompt "a red circle" --out noise.safetensors [--steps 50] [--guidance 1]
                                [--reconstruction again.png]
    minidiff generate "a red circle" --noise noise.safetensors    # DDIM with the file's steps and guidance
"""

from pathlib import Path

from minidiff.checks import check_device, check_float, check_int, check_text, shown
from minidiff.cli.options import IMAGE_FORMATS, check_outputs, output_format, parse_size
from minidiff.errors import InputError

NOISE_FORMATS = {".safetensors": "safetensors"}


def add_commands(sub):
    v = sub.add_parser("invert", help="DDIM inversion: a picture -> the noise that DDIM turns back into it")
    v.add_argument("image", help="the picture to invert (PNG, JPEG, ...; 8-bit colour or grey, no transparency)")
    v.add_argument("--prompt", required=True, help="what the picture shows: the text the ODE is run with")
    v.add_argument("--out", required=True, help="the noise file to write (.safetensors, with the prompt, steps, "
                   "guidance and model in its metadata)")
    v.add_argument("--model", default="shapes", help="a known name (see `minidiff models`) or a path")
    v.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50); regenerate with the same")
    v.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1: none, the tightest "
                   "round trip)")
    v.add_argument("--size", help="N or WIDTHxHEIGHT to resize the picture to (default: its own size)")
    v.add_argument("--reconstruction", help="also generate the picture back from the noise and write it here "
                   "(.png, ...); prints the round trip's PSNR")
    v.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    v.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    v.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    v.set_defaults(run=cmd_invert)


def check_invert_args(args):
    """Every option, checked before the model loads; returns the picture, read and checked."""
    from minidiff.images import open_picture
    from minidiff.inversion import check_opaque

    check_text("--prompt", args.prompt)
    check_text("--model", args.model)
    check_device(args.device)
    check_int("--steps", args.steps, 1, 1000, "the training schedules have 1000 timesteps")
    check_float("--guidance", args.guidance)
    check_text("the image", args.image)
    output_format("--out", args.out, NOISE_FORMATS)
    outputs = {"--out": [Path(args.out)]}
    if args.reconstruction:
        output_format("--reconstruction", args.reconstruction, IMAGE_FORMATS)
        outputs["--reconstruction"] = [Path(args.reconstruction)]
    check_outputs(outputs, args.overwrite)
    picture = check_opaque(open_picture(args.image), f"the image {shown(args.image)}")
    size = parse_size(args.size) if args.size is not None else (picture.height, picture.width)
    if size[0] % 8 or size[1] % 8:
        fix = f"{max(8, 8 * round(size[1] / 8))}x{max(8, 8 * round(size[0] / 8))}"
        raise InputError(f"the image {shown(args.image)} is {size[1]}x{size[0]} px, not a multiple of 8 (the VAE "
                         f"downsamples by 8): pass --size {fix} to resize it")
    return picture, size


def cmd_invert(args):
    from minidiff.files import atomic_save
    from minidiff.images import psnr
    from minidiff.inversion import save_noise
    from minidiff.pipeline import load_pipeline

    picture, (height, width) = check_invert_args(args)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    noise = pipe.invert(picture, args.prompt, args.steps, args.guidance, height=height, width=width, progress=True)
    save_noise(args.out, noise, prompt=args.prompt, steps=args.steps, guidance_scale=args.guidance, sampler="ddim",
               model=args.model, spacing=pipe.spacing, height=height, width=width)
    written = [args.out]
    if args.reconstruction:
        again = pipe(args.prompt, sampler="ddim", steps=args.steps, guidance_scale=args.guidance, height=height,
                     width=width, latents=noise).images[0]
        kind = output_format("--reconstruction", args.reconstruction, IMAGE_FORMATS)
        atomic_save(args.reconstruction, lambda p: again.save(p, format=kind))
        written.append(args.reconstruction)
        print(f"round trip: PSNR {psnr(again, picture.resize((width, height))):.1f} dB against the picture")
    print("wrote " + ", ".join(shown(o) for o in written))
