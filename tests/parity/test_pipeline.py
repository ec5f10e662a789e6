"""The whole text-to-image pipeline against diffusers' StableDiffusionPipeline on the same small weights."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from minidiff.pipeline import load_pipeline

# (minidiff sampler, diffusers scheduler class, extra scheduler options)
CASES = [
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("ddim", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    ("euler", EulerDiscreteScheduler, {}),
]


@pytest.mark.parametrize(("sampler", "scheduler_class", "options"), CASES)
def test_images_match_the_reference_pipeline(tiny_sd, sampler, scheduler_class, options):
    """fp32, same weights, initial noise, scheduler settings and prompts (with CFG and a negative prompt).

    Both start from the same unit noise: minidiff's samplers scale it to their first noise level as
    diffusers' init_noise_sigma does. Compared: the final latents, and the images decoded from them
    (before clamping, so that saturated pixels hide nothing): max abs difference <= 1e-3 * max |reference|.
    """
    folder, reference = tiny_sd
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **options)
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    prompts, negatives = ["a red circle in the top left", "a small blue square"], ["", "blurry"]
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))

    ours = pipe(prompts, negative_prompt=negatives, steps=7, sampler=sampler, guidance_scale=6.0,
                height=64, width=64, latents=noise, progress=False).latents
    theirs = reference(prompts, negative_prompt=negatives, num_inference_steps=7, guidance_scale=6.0,
                       height=64, width=64, latents=noise.clone(), output_type="latent").images
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max(), f"{sampler}: latents differ"

    with torch.no_grad():
        our_images = pipe.decode(ours)
        their_images = reference.vae.decode(theirs / reference.vae.config.scaling_factor).sample
    error = (our_images - their_images).abs().max() / their_images.abs().max()
    assert error <= 1e-3, f"{sampler}: decoded images differ by {error:.2e} (relative) > 1e-3"
