"""The writable step callback against diffusers' callback_on_step_end: guidance switched off mid-run
(minidiff.steering.guidance_cutoff against diffusers' SDCFGCutoffCallback) on the same weights and noise."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.callbacks import SDCFGCutoffCallback

from minidiff.pipeline import load_pipeline
from minidiff.steering import guidance_cutoff

CASES = [
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("ddim", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    ("euler", EulerDiscreteScheduler, {}),
]


@pytest.mark.parametrize(("sampler", "scheduler_class", "options"), CASES)
def test_guidance_cutoff_matches_sdcfg_cutoff_callback(tiny_sd, sampler, scheduler_class, options):
    """fp32, 10 steps at w = 6, guidance off after step int(10 * 0.4) = 4 on both sides (steps 5..9 call the UNet on
    the prompt alone): final latents within 1e-3 of max |reference|, as tests/parity/test_pipeline.py. The same run
    without the cutoff differs from the reference with it by ten times more (the cutoff is what is compared)."""
    folder, reference = tiny_sd
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **options)
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    prompt = "a red circle in the top left"  # one prompt: SDCFGCutoffCallback keeps the last row of the embeddings
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    common = dict(guidance_scale=6.0, height=64, width=64)

    ours = pipe(prompt, steps=10, sampler=sampler, latents=noise, progress=False,
                callback=guidance_cutoff(10, 0.4), **common).latents
    theirs = reference(prompt, num_inference_steps=10, latents=noise.clone(), output_type="latent",
                       callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4), **common).images
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= 1e-3, f"{sampler}: latents differ by {error:.2e} (relative) > 1e-3"

    uncut = pipe(prompt, steps=10, sampler=sampler, latents=noise, progress=False, **common).latents
    moved = float((uncut - theirs).abs().max() / theirs.abs().max())
    # 10x: on this random model ten guided steps amplify rounding (the order of a matmul's sums alone moves the
    # final latents by 1e-5 to 2.4e-4 relative), while the cutoff moves them by about 4e-3
    assert moved > 10 * max(error, 1e-5), f"{sampler}: the cutoff changes the latents by only {moved:.2e}"
