"""Two expert denoisers on one noise schedule: SDXL's base model and its refiner (Podell et al. 2023, section 2.5;
the "ensemble of expert denoisers" of Balaji et al. 2022, eDiff-I).

The refiner is a second SDXL UNet trained only on the low-noise end of the schedule, where the last steps add fine
detail; from pure noise it is useless. So one grid of timesteps is cut in two: the base model runs the high-noise
steps from pure noise and hands over its latent x_t, and the refiner runs the remaining steps from that latent, with
no noise added in between (diffusers: denoising_end on StableDiffusionXLPipeline, then denoising_start on
StableDiffusionXLImg2ImgPipeline).

Notation:
    fraction   -> the base's denoising_end = the refiner's denoising_start: the share of the training timesteps,
                  counted down from T, that the base covers (0.8 with T = 1000: the base goes down to t = 200)
    cutoff     -> the discrete timestep int(round(T - fraction T)) where the grid is cut, as diffusers cuts it: the base
                  runs the grid's steps with t >= cutoff, the refiner those with t < cutoff
    handover   -> the latent x_t at the refiner's first step, in VP space (what the UNet sees): the same for every
                  sampler, so the two stages may even use different samplers

From Python (the same steps, sampler and seed for both stages):
    base, refiner = load_pipeline("sdxl"), load_pipeline("sdxl-refiner")
    handed = base(prompt, steps=40, denoising_end=0.8, output="latent").latents
    image = refiner(prompt, steps=40, latents=handed, denoising_start=0.8).images[0]
or in one call: refine(base, refiner, prompt, steps=40, refiner_start=0.8).
"""

from minidiff.checks import check_choice, check_float, literal
from minidiff.errors import InputError

OUTPUTS = ("pil", "latent")  # a call's output: decoded pictures, or the latents alone (GenerationResult.images empty)


def handover_step(timesteps, fraction: float, num_train_timesteps: int) -> int:
    """How many steps of the grid `timesteps` lie above the cut at `fraction`: the index of the first step that is
    the second expert's."""
    cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))  # diffusers' discrete_timestep_cutoff
    return sum(float(t) >= cutoff for t in timesteps)


def check_stage(pipe, denoising_start, denoising_end, image, latents, strength, output) -> None:
    """A pipeline call's denoising_start, denoising_end and output, checked before anything runs."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        check_float(name, value, 0.0, 1.0, "the fraction of the schedule where the refiner takes over (e.g. 0.8)",
                    optional=True)
        if value in (0.0, 1.0):
            raise InputError(f"{name} must be a fraction strictly between 0 and 1 (e.g. 0.8), got {value}: "
                             f"{'0 and 1 leave' if value == 0 else '1 leaves'} one of the two stages nothing to do")
    check_choice("output", output, OUTPUTS)
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise InputError(f"denoising_start {denoising_start} must come before denoising_end {denoising_end}: a "
                         "middle expert runs the steps between them")
    if denoising_start is not None:
        if image is not None:
            raise InputError("denoising_start goes on from latents= (what a base run with denoising_end handed over),"
                             " and image= starts img2img from a picture: give latents=, not image=")
        if latents is None:
            raise InputError("denoising_start needs latents=: the latents of a base run with denoising_end="
                             f"{denoising_start} and output='latent' (or use minidiff.refiner.refine)")
        if strength is not None:
            raise InputError(f"strength {literal(strength)} is img2img's; with denoising_start {denoising_start} the "
                             "run starts at the cut: drop strength")
    if pipe.is_refiner and image is None and denoising_start is None:
        raise InputError("this is the SDXL refiner, trained on the low-noise steps only: it goes on from a base "
                         "model's latents (latents=..., denoising_start=0.8; `minidiff generate --model sdxl "
                         "--refiner ...`) or refines a picture (image=...); load the base model for text-to-image")


def stage_steps(timesteps, num_train_timesteps: int, denoising_start, denoising_end) -> tuple:
    """(first_step, end_step) of the grid for one stage: end_step None when the stage runs to the end."""
    n_steps = len(timesteps)
    first = 0 if denoising_start is None else handover_step(timesteps, denoising_start, num_train_timesteps)
    end = n_steps if denoising_end is None else handover_step(timesteps, denoising_end, num_train_timesteps)
    last = f"the grid's timesteps run from {float(timesteps[0]):g} to {float(timesteps[-1]):g}"
    if first == n_steps:
        raise InputError(f"denoising_start {denoising_start} leaves none of the {n_steps} steps to run ({last}): "
                         "lower it, or use more steps")
    if end <= first:
        raise InputError(f"denoising_end {denoising_end} stops before the first of the {n_steps} steps ({last}): "
                         "raise it, or use more steps")
    return first, (None if end == n_steps else end)


def check_pair(base, refiner) -> None:
    """base: an SDXL base pipeline; refiner: an SDXL refiner pipeline working in the same latent space."""
    if base.sdxl is None or base.is_refiner:
        raise InputError(f"the base model {literal(base.source)} is not an SDXL base model: the refiner goes on "
                         "from SDXL base latents (`minidiff download sdxl`)")
    if not refiner.is_refiner:
        raise InputError(f"the refiner {literal(refiner.source)} is not the SDXL refiner (it has "
                         f"{'two text encoders' if refiner.sdxl else 'one CLIP text encoder, no bigG'}, the refiner "
                         "bigG alone and an aesthetic score): `minidiff download sdxl-refiner`")
    if refiner.latent_channels() != base.latent_channels():
        raise InputError(f"the refiner works in {refiner.latent_channels()} latent channels, the base model in "
                         f"{base.latent_channels()}: they do not share a latent space")


def refine(base, refiner, prompt, refiner_start: float = 0.8, **options):
    """Base model, then refiner: base(prompt, denoising_end=refiner_start, output="latent") and the refiner from its
    latents with denoising_start=refiner_start; `options` (steps, sampler, seed, negative_prompt, height ...) go to
    both, but latents (the starting noise) to the base alone. Returns the refiner's GenerationResult."""
    check_pair(base, refiner)
    check_float("refiner_start", refiner_start, 0.0, 1.0, "the fraction of the schedule the base model runs")
    for name in ("denoising_start", "denoising_end", "image", "mask", "strength"):
        if name in options:
            raise InputError(f"refine() sets {name} itself: drop it (refiner_start cuts the schedule)")
    output, noise = options.pop("output", "pil"), options.pop("latents", None)  # the base's starting noise
    handed = base(prompt, denoising_end=refiner_start, output="latent", latents=noise, **options).latents
    return refiner(prompt, latents=handed, denoising_start=refiner_start, output=output, **options)
