"""Each single-step sampler against its diffusers scheduler, step by step, on a toy model.

Tolerance: fp32, at EVERY step both the latent in VP space (x_t, what the UNet sees) and pred_x0 agree
within 1e-5 relative, where relative means max|ours - ref| / max|ref| over the whole tensor. The
timesteps the model is called at must agree too (exactly for integer grids, 1e-3 for fractional ones).

How the two sides are made comparable:
- The same starting latent: x = noise, i.e. x_T. The sigma-space schedulers start from noise times
  sqrt(1 + sigma_max^2) = x_T / alpha_T (minidiff's convention; diffusers' init_noise_sigma is
  sigma_max alone for linspace/trailing), so the reference is started from that same tensor.
- The same random numbers: each side gets its own torch.Generator seeded with the same seed, and both
  draw one x-shaped fp32 CPU tensor per step in the same order (ddpm: every step with t > 0; ddim
  eta=1: every step; lcm: every step but the last; euler_a: every step, the reference also on the last
  one, where the draw is multiplied by sigma_up = 0 and changes nothing).
- diffusers' EulerAncestralDiscreteScheduler has no Karras option: for euler_a with karras=True the
  reference is that scheduler stepping over the sigmas and timesteps of EulerDiscreteScheduler with
  use_karras_sigmas=True.

The tightest case is heun with linspace and 2 steps (9.4e-6): its corrector is evaluated at sigma = 0.029
after a step of 14.6, and diffusers' (x - x0) / sigma loses digits there: against an fp64 run the reference
is 9.3e-6 off and minidiff (which takes dx/dsigma as pred_eps) 1.7e-7.

`python tests/parity/test_samplers.py` prints the largest error per sampler and configuration.
"""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from minidiff.samplers import sample

RTOL = 1e-5  # max|a - b| / max|b|, fp32
SEED = 1234
STEPS = (1, 2, 7, 20, 50)
SPACINGS = ("leading", "trailing", "linspace")

# the scheduler_config.json of SD 1.5 and of SD 2.1-768 (v-prediction)
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
            prediction_type="epsilon")
SD21_768 = {**SD15, "prediction_type": "v_prediction"}
CONFIGS = {"sd15-eps": SD15, "sd21-v": SD21_768}

# name -> (diffusers class, minidiff sampler, minidiff options, reference config overrides, step kwargs)
VARIANTS = {
    "ddpm": (DDPMScheduler, "ddpm", {}, {}, {}),
    "ddim": (DDIMScheduler, "ddim", {}, {}, {}),
    "ddim-eta1": (DDIMScheduler, "ddim", {"eta": 1.0}, {}, {"eta": 1.0}),
    "euler": (EulerDiscreteScheduler, "euler", {}, {}, {}),
    "euler-karras": (EulerDiscreteScheduler, "euler", {"karras": True}, {"use_karras_sigmas": True}, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, "euler_a", {}, {}, {}),
    "euler_a-karras": (EulerAncestralDiscreteScheduler, "euler_a", {"karras": True}, {}, {}),
    "heun": (HeunDiscreteScheduler, "heun", {}, {}, {}),
    "heun-karras": (HeunDiscreteScheduler, "heun", {"karras": True}, {"use_karras_sigmas": True}, {}),
}
SIGMA_SPACE = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)


def toy_model(x, t):
    """Depends nonlinearly on x and t, like a network would; any output works as eps, v or x0."""
    return torch.tanh(x * 0.7 + t / 1000) * 0.9 + torch.sin(x * 1.3) * (t / 2000)


def make_noise():
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def run_reference(scheduler, noise, step_kwargs, generator, karras_grid_from=None):
    """Drive a diffusers scheduler; returns [(timestep, x in VP space, pred_x0)] per sampler step."""
    if karras_grid_from is not None:  # euler_a on Euler's Karras grid (see the module docstring)
        scheduler.sigmas, scheduler.timesteps = karras_grid_from.sigmas, karras_grid_from.timesteps
    sigma_space = isinstance(scheduler, SIGMA_SPACE)
    x = noise * math.sqrt(1 + float(scheduler.sigmas[0]) ** 2) if sigma_space else noise.clone()
    steps, first_order = [], True
    timesteps = scheduler.timesteps
    for j, t in enumerate(timesteps):
        if isinstance(scheduler, HeunDiscreteScheduler):
            first_order = scheduler.state_in_first_order
        out = toy_model(scheduler.scale_model_input(x, t) if sigma_space else x, t)
        if not isinstance(scheduler, HeunDiscreteScheduler):  # deterministic, takes no generator
            step_kwargs = {**step_kwargs, "generator": generator}
        result = scheduler.step(out, t, x, **step_kwargs)
        x = result.prev_sample
        pred_x0 = result.denoised if isinstance(scheduler, LCMScheduler) else result.pred_original_sample
        if first_order:  # Heun: a step ends after its second (correction) stage, or after the last Euler stage
            step_t, step_pred_x0 = float(t), pred_x0
            if isinstance(scheduler, HeunDiscreteScheduler) and j + 1 < len(timesteps):
                continue
        x_vp = x / math.sqrt(1 + float(scheduler.sigmas[scheduler.step_index]) ** 2) if sigma_space else x
        steps.append((step_t, x_vp, step_pred_x0))
    return steps


def run_minidiff(noise, sampler, steps, config, spacing, options, timesteps=None):
    recorded = []
    on_step = lambda **i: recorded.append((float(i["timestep"]), i["x"], i["pred_x0"]))
    final = sample(toy_model, noise, sampler, steps, prediction_type=config["prediction_type"], spacing=spacing,
                   steps_offset=config["steps_offset"], timesteps=timesteps, callback=on_step,
                   generator=torch.Generator().manual_seed(SEED), **options)
    assert torch.equal(final, recorded[-1][1])  # the returned latent is the last step's
    return recorded


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def compare(ours, ref, label) -> float:
    """The largest relative error over all steps of x and pred_x0; asserts the timesteps agree."""
    assert len(ours) == len(ref), f"{label}: {len(ours)} steps, reference {len(ref)}"
    worst = 0.0
    for i, ((t, x, pred_x0), (t_ref, x_ref, pred_x0_ref)) in enumerate(zip(ours, ref)):
        assert abs(t - t_ref) < 1e-3, f"{label} step {i}: timestep {t}, reference {t_ref}"
        worst = max(worst, relative(x, x_ref), relative(pred_x0, pred_x0_ref))
    return worst


def worst_error(variant, config_name, spacing):
    """Largest relative error of one (sampler, config, spacing) over all step counts."""
    scheduler_class, sampler, options, overrides, step_kwargs = VARIANTS[variant]
    config = {**CONFIGS[config_name], "timestep_spacing": spacing, **overrides}
    noise, worst = make_noise(), {}
    for steps in STEPS:
        scheduler = scheduler_class.from_config(config)
        scheduler.set_timesteps(steps)
        karras_grid = None
        if variant == "euler_a-karras":
            karras_grid = EulerDiscreteScheduler.from_config({**config, "use_karras_sigmas": True})
            karras_grid.set_timesteps(steps)
        ref = run_reference(scheduler, noise, step_kwargs, torch.Generator().manual_seed(SEED), karras_grid)
        ours = run_minidiff(noise, sampler, steps, CONFIGS[config_name], spacing, options)
        worst[steps] = compare(ours, ref, f"{variant} {config_name} {spacing} steps={steps}")
    return worst


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_matches_diffusers_every_step(variant, config_name, spacing):
    worst = worst_error(variant, config_name, spacing)
    assert max(worst.values()) < RTOL, f"relative error per step count: {worst}"


@pytest.mark.parametrize("config_name", CONFIGS)
def test_lcm_matches_diffusers_every_step(config_name):
    config = CONFIGS[config_name]
    for steps in STEPS:  # LCM picks its own timesteps (original_inference_steps=50): no spacing
        scheduler = LCMScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        ref = run_reference(scheduler, make_noise(), {}, torch.Generator().manual_seed(SEED))
        ours = run_minidiff(make_noise(), "lcm", steps, config, "leading", {})
        assert compare(ours, ref, f"lcm {config_name} steps={steps}") < RTOL


CUSTOM = [999, 950, 900, 800, 650, 500, 300, 100, 10, 5, 1]


@pytest.mark.parametrize("scheduler_class, sampler", [
    (DDPMScheduler, "ddpm"), (EulerDiscreteScheduler, "euler"), (HeunDiscreteScheduler, "heun"),
    (LCMScheduler, "lcm"),
])
def test_custom_timesteps_match_diffusers(scheduler_class, sampler):
    scheduler = scheduler_class.from_config(SD21_768)
    scheduler.set_timesteps(timesteps=CUSTOM)
    ref = run_reference(scheduler, make_noise(), {}, torch.Generator().manual_seed(SEED))
    ours = run_minidiff(make_noise(), sampler, None, SD21_768, "leading", {}, timesteps=CUSTOM)
    assert [t for t, _, _ in ours] == CUSTOM
    assert compare(ours, ref, f"{sampler} custom timesteps") < RTOL


if __name__ == "__main__":  # the table of largest errors for the report
    for variant in VARIANTS:
        for config_name in CONFIGS:
            errors = {spacing: max(worst_error(variant, config_name, spacing).values()) for spacing in SPACINGS}
            print(f"{variant:15s} {config_name:9s} " + "  ".join(f"{s} {e:.1e}" for s, e in errors.items()))
