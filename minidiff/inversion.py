"""DDIM inversion: a picture back to the noise that deterministic DDIM turns into it.

    noise = pipe.invert(image, "a red circle", steps=50)            # image -> latents -> noise
    again = pipe("a red circle", sampler="ddim", steps=50, guidance_scale=1.0, latents=noise)
    minidiff invert picture.png --prompt "a red circle" --out noise.safetensors
    minidiff generate "a red circle" --noise noise.safetensors       # ddim, the steps and guidance of the file

DDIM with eta = 0 is a discretisation of an ODE, so it can be run the other way: from the clean latent x_0 up
the same grid to x_T (Song et al. 2021, "Denoising Diffusion Implicit Models", sec. 4.3; Dhariwal & Nichol 2021,
appendix F). Each inverse step needs eps at the level it goes to, which is not known yet; it takes the network's
eps at the level it comes from, asked at the timestep it goes to, eps_theta(x_{t_prev}, t) ~ eps_theta(x_t, t).
That error is of the size of one step, so the round trip (invert, then generate) misses the picture by O(1/N):
first order in the step count, measured on the exact Gaussian model in tests/test_inversion.py.

The grid is sample_ddim's, walked backwards: sample_ddim's steps (t, t_prev) in reverse order, each run from
t_prev to t. This is diffusers' DDIMInverseScheduler (the same timesteps visited, the same update) with SD's
scheduler config, set_alpha_to_one=False: the walk starts at alpha_bar_0, where sample_ddim ends. The scheduler's
own default, set_alpha_to_one=True, starts the first step at alpha_bar = 1, which is not where DDIM ends; minidiff
does not offer it. A custom timestep list and linspace spacing are walked the same way (diffusers' inverse
scheduler has neither).

Notation (as sample_ddim's, in minidiff.samplers):
    a_from, a_to -> alpha_bar at the level a step starts from (t_prev; alpha_bar_0 for the first) and goes to (t)
    pred_x0      -> (x - sqrt(1 - a_from) eps) / sqrt(a_from), the clean latent the network sees in x
    pred_eps     -> eps_theta(x, t): the network's noise, asked at the timestep t the step goes to
    x_next       -> sqrt(a_to) pred_x0 + sqrt(1 - a_to) pred_eps, DDIM's eq. 12 with the roles of t, t_prev swapped
"""

import math

import torch
from PIL import Image
from tqdm.auto import tqdm

from minidiff.checks import check_bool, check_float, check_input_file, check_int, check_text, shown
from minidiff.errors import InputError
from minidiff.files import atomic_save
from minidiff.images import from_pil, open_picture
from minidiff.schedule import Denoiser

NOISE_KEY = "noise"  # the tensor's name in a noise file; the metadata holds prompt, steps, guidance, model, spacing


def invert_ddim(denoiser, x, timesteps, prev_timesteps, *, callback=None):
    """DDIM inversion (Song et al. 2021, eq. 12 run from x_0 to x_T): sample_ddim's grid, walked backwards.

    Takes the grid sample_ddim takes (NoiseSchedule.ddim_timesteps: t noisiest first, and each t's t_prev) and
    returns x_T, the latent that sample_ddim on the same grid turns back into about x. After step i it calls
    callback(step=i, timestep=t, sigma=s, x=x_inter, pred_x0=pred_x0) as the samplers do.
    """
    schedule = denoiser.schedule
    ts, prev_ts = torch.as_tensor(timesteps).tolist(), torch.as_tensor(prev_timesteps).tolist()
    for i, (t, t_from) in enumerate(reversed(list(zip(ts, prev_ts)))):
        a_from = float(schedule.alphas_cumprod[max(t_from, 0)])  # t_prev = -1: the start, alpha_bar_0
        a_to = float(schedule.alphas_cumprod[t])
        # the network's eps for the level we go to, asked of the latent we have: eps(x_{t_prev}, t) ~ eps(x_t, t)
        pred_x0, pred_eps = denoiser.at_level(x, t, a_from)
        # the clean part kept at the new level, plus the direction pointing to x_t
        x = math.sqrt(a_to) * pred_x0 + math.sqrt(1 - a_to) * pred_eps
        if callback is not None:
            callback(step=i, timestep=t, sigma=float(schedule.sigmas[t]), x=x, pred_x0=pred_x0)
    return x


def check_opaque(image, name: str = "the image") -> Image.Image:
    """A picture to invert: 8-bit colour or grey, no transparent pixels (what is under them is not the picture)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise InputError(f"{name} is a {image.mode} (16/32-bit single-channel) image: save it as 8-bit RGB (or "
                         "grey) PNG first")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise InputError(f"{name} has transparent pixels ({image.mode} with alpha): flatten it onto a background "
                             "first (e.g. in PIL, Image.alpha_composite onto a white RGBA image), then invert")
    return image.convert("RGB")


@torch.no_grad()
def invert(pipe, image, prompt: str, steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str | None = None,
           height: int | None = None, width: int | None = None, timesteps=None, callback=None,
           progress: bool = False) -> torch.Tensor:
    """A picture -> its noise: the VAE's posterior mean of `image`, run up DDIM's grid of `steps` (pipe's spacing).

    Returns the latents x_T (1, C, height / 8, width / 8) that `pipe(prompt, sampler="ddim", steps=steps,
    guidance_scale=guidance_scale, latents=x_T)` turns back into the picture. The size is the picture's own unless
    height and width are given. guidance_scale > 1 inverts the guided ODE; the round trip is then looser (guidance
    amplifies the step error), which is why 1, no guidance, is the default.
    """
    if pipe.sdxl is not None:
        raise InputError("invert works on SD 1.x/2.x pipelines; SDXL's size and crop conditioning is not wired in "
                         "here: use an SD 1.x/2.x model")
    if not isinstance(image, Image.Image):
        image = open_picture(image)
    picture = check_opaque(image)
    check_text("prompt", prompt)
    check_text("negative_prompt", negative_prompt, optional=True)
    check_int("steps", steps, 1, pipe.schedule.num_train_timesteps)
    guidance_scale = check_float("guidance_scale", guidance_scale)
    height = picture.height if height is None else check_int("height", height, 8)
    width = picture.width if width is None else check_int("width", width, 8)
    for name, size in (("height", height), ("width", width)):
        if size % 8:
            raise InputError(f"the picture's {name} is {size} px, not a multiple of 8 (the VAE downsamples by 8): "
                             f"resize it, or pass {name}={max(8, 8 * round(size / 8))} (the command: --size)")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be a function callback(step, timestep, sigma, x, pred_x0), got "
                         f"{type(callback).__name__}")
    check_bool("progress", progress)
    pipe.check_memory(1, height, width, guidance_scale > 1.0)
    grid = pipe.schedule.ddim_timesteps(steps, pipe.spacing, pipe.steps_offset, timesteps)

    pixels = from_pil(picture, height, width).to(pipe.device, pipe.dtype)
    x0 = pipe.vae.encode(pixels) * pipe.vae.scaling_factor  # the posterior mean: no randomness anywhere
    context = pipe.encode_prompt([prompt])
    uncond = pipe.encode_prompt([negative_prompt or ""]) if guidance_scale > 1.0 else None
    denoiser = Denoiser(pipe.guided_model(context, uncond, guidance_scale), pipe.schedule, pipe.prediction_type)
    bar = tqdm(total=len(grid[0]), desc="invert", disable=not progress)

    def on_step(**info):
        bar.update(1)
        if callback is not None:
            callback(**info)

    try:
        noise = invert_ddim(denoiser, x0, *grid, callback=on_step)
    finally:
        bar.close()
    denoiser.check_finite()
    return noise


# --- noise files: the latents and how they were made, in one safetensors file -----------------------------------


def save_noise(path, noise: torch.Tensor, **metadata) -> None:
    """Write noise latents (float32) and string metadata (prompt, steps, guidance_scale, model, ...), atomically."""
    from safetensors.torch import save_file

    tensors = {NOISE_KEY: noise.detach().float().cpu().contiguous()}
    text = {key: str(value) for key, value in metadata.items() if value is not None}
    atomic_save(path, lambda p: save_file(tensors, p, metadata=text))


def load_noise(path, what: str = "the noise file") -> tuple:
    """A noise file written by save_noise (or `minidiff invert`) -> (latents (B, C, h, w), metadata dict)."""
    from safetensors import SafetensorError, safe_open

    path = check_input_file(path, what, max_bytes=2**30)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            noise = f.get_tensor(NOISE_KEY) if NOISE_KEY in keys else None
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{what} {shown(path)} is not a safetensors file ({shown(error)}): give the file "
                         "`minidiff invert` wrote") from None
    if noise is None:
        raise InputError(f"{what} {shown(path)} holds no '{NOISE_KEY}' tensor (it has {shown(keys[:4])}): give the "
                         "file `minidiff invert` wrote")
    if noise.ndim != 4 or not noise.is_floating_point() or 0 in noise.shape:
        raise InputError(f"{what} {shown(path)} holds a {noise.dtype} tensor of shape {tuple(noise.shape)}, not "
                         "float latents (batch, channels, height / 8, width / 8)")
    if not torch.isfinite(noise).all():
        raise InputError(f"{what} {shown(path)} holds NaN or inf: invert the picture again")
    return noise.float(), dict(metadata)
