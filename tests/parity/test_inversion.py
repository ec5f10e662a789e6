"""DDIM inversion against diffusers' DDIMInverseScheduler: step by step on a toy model, and the whole inversion
(image -> VAE posterior mean -> noise) on the tiny random Stable Diffusion of conftest.py.

The reference loop is the one diffusers' inversion pipelines run: set_timesteps(N), then for each of its
timesteps t (ascending) one model call at t and scheduler.step(output, t, latents). The scheduler is built from
SD's scheduler config, set_alpha_to_one=False, clip_sample=False: its first step then starts at alpha_bar_0,
where minidiff's sample_ddim ends, so the inversion is sample_ddim's grid walked backwards. (The scheduler's own
default, set_alpha_to_one=True, would start from alpha_bar = 1; minidiff has no such option, deliberately.)
diffusers' inverse scheduler has leading and trailing spacing only; minidiff also walks linspace and custom grids,
which tests/test_inversion.py covers by the round trip.

Compared at every step: the timestep the model is called at (exactly), the latent x and pred_x0, within
RTOL = 1e-5 relative (max|ours - ref| / max|ref|, fp32) on the toy model, as tests/parity/test_samplers.py states
it; the whole inversion on the random tiny SD within 1e-7 of max |reference| in float64 (why float64: the
test's docstring).
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler
from PIL import Image

from minidiff.inversion import invert_ddim
from minidiff.pipeline import load_pipeline
from minidiff.schedule import Denoiser, NoiseSchedule
from tests.parity.toy_model import ToyModel

RTOL = 1e-5
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def reference_inversion(scheduler, model, x):
    """diffusers' loop: [(timestep, x after the step, pred_x0)] per step."""
    steps = []
    for t in scheduler.timesteps:
        result = scheduler.step(model(x, t), t, x)
        x = result.prev_sample
        steps.append((int(t), x, result.pred_original_sample))
    return steps


@pytest.mark.parametrize("steps", (1, 2, 7, 20, 50))
@pytest.mark.parametrize("spacing", ("leading", "trailing"))
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction"))
def test_inversion_matches_ddim_inverse_scheduler_every_step(prediction_type, spacing, steps):
    model = ToyModel(seed=2)
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    scheduler = DDIMInverseScheduler.from_config({**SD, "prediction_type": prediction_type,
                                                  "timestep_spacing": spacing})
    scheduler.set_timesteps(steps)
    ref = reference_inversion(scheduler, model, x0.clone())

    schedule, ours = NoiseSchedule.sd(), []
    grid = schedule.ddim_timesteps(steps, spacing, SD["steps_offset"])
    final = invert_ddim(Denoiser(model, schedule, prediction_type), x0.clone(), *grid,
                        callback=lambda **i: ours.append((i["timestep"], i["x"], i["pred_x0"])))
    assert [t for t, _, _ in ours] == [t for t, _, _ in ref]  # the same timesteps, noisiest last
    assert torch.equal(final, ours[-1][1])
    worst = max(max(relative(x, x_ref), relative(x0_, x0_ref)) for (_, x, x0_), (_, x_ref, x0_ref) in zip(ours, ref))
    assert worst <= RTOL, f"{prediction_type} {spacing} {steps} steps: {worst:.2e} > {RTOL}"


def test_alpha_to_one_is_a_different_start():
    """The comparison could fail: diffusers' default set_alpha_to_one=True starts elsewhere and is told apart."""
    model, x0 = ToyModel(seed=2), torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    scheduler = DDIMInverseScheduler.from_config({**SD, "set_alpha_to_one": True})
    scheduler.set_timesteps(10)
    ref = reference_inversion(scheduler, model, x0.clone())[-1][1]
    schedule = NoiseSchedule.sd()
    ours = invert_ddim(Denoiser(model, schedule), x0.clone(), *schedule.ddim_timesteps(10))
    assert relative(ours, ref) > 100 * RTOL


def make_image():
    """A 64 x 64 RGB picture: ramps and a disc, with seeded pixel noise."""
    ramp = np.linspace(0, 255, 64)
    rgb = np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), 255 - ramp[None, :].repeat(64, 0)], -1)
    yy, xx = np.mgrid[:64, :64]
    rgb[(yy - 20) ** 2 + (xx - 40) ** 2 < 100] = (230, 40, 40)
    rgb = rgb * 0.8 + np.random.default_rng(5).integers(0, 51, (64, 64, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("guidance_scale", (1.0, 4.0))
def test_pipeline_inversion_matches_diffusers(tiny_sd, guidance_scale):
    """The whole inversion, 10 steps: the image through diffusers' VAE (posterior mean, the deterministic path of
    its inversion pipelines), the prompt through its text encoder (with the empty prompt for guidance), then the
    DDIMInverseScheduler loop with the same UNet; every step's latents within 1e-7 of max |reference|.

    In float64 on both sides: this random-weight model amplifies rounding chaotically as the inversion climbs
    (measured, w = 1: diffusers' own fp32 run strays 6.8e-3 from its fp64 run by step 10, minidiff's fp32 run
    2.2e-3 from diffusers' fp32 run), so an fp32 comparison would test the rounding, not the code. In float64,
    with the scheduler's alpha_bar widened to float64 as minidiff holds them, the two agree to 6e-15 after the
    first step and 1.7e-11 (w = 1) and 1.1e-9 (w = 4) after the tenth."""
    folder, reference = tiny_sd
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.double()
    prompt = "a red circle in the top right"

    ours = []
    pipe.invert(make_image(), prompt, steps=10, guidance_scale=guidance_scale,
                callback=lambda **i: ours.append((i["timestep"], i["x"])))

    scheduler = DDIMInverseScheduler.from_config(reference.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    # alpha_bar as float64 tensors, as minidiff holds them (the same float32 cumprod, widened): diffusers keeps
    # float32 tensors and takes their square roots in float32, a 1e-8 difference that this model amplifies
    scheduler.alphas_cumprod = pipe.schedule.alphas_cumprod.double()
    scheduler.initial_alpha_cumprod = scheduler.alphas_cumprod[0]
    unet, vae = copy.deepcopy(reference.unet).double(), copy.deepcopy(reference.vae).double()
    text_encoder = copy.deepcopy(reference.text_encoder).double()
    guided = guidance_scale > 1
    with torch.no_grad():
        pixels = reference.image_processor.preprocess(make_image()).double()
        x = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = reference.tokenizer([prompt, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond, uncond = text_encoder(ids)[0].chunk(2)
        context = torch.cat([uncond, cond]) if guided else cond
        ref = []
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]) if guided else x, t, encoder_hidden_states=context).sample
            if guided:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x = scheduler.step(out, t, x).prev_sample
            ref.append((int(t), x))
    assert [t for t, _ in ours] == [t for t, _ in ref]
    for i, ((t, mine), (_, theirs)) in enumerate(zip(ours, ref)):
        error = relative(mine, theirs)
        assert error <= 1e-7, f"w={guidance_scale}, step {i} (t={t}): latents differ by {error:.2e} > 1e-7"
    assert relative(ref[-1][1], ref[0][1]) > 0.1  # the loop moved the latents
