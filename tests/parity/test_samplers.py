"""Every sampler against the diffusers scheduler it mirrors, step by step, on a toy model (fp32).

Each case runs the same toy model from the same noise through diffusers' loop (set_timesteps, then
scale_model_input and step per timestep, the latent started as noise * init_noise_sigma) and through
`minidiff.sample` with the same settings, and compares at EVERY step the timestep the model is called at
(exactly for integer grids, 1e-3 for fractional ones), the noise level (1e-6 relative, where the scheduler
has sigmas), the latent x in VP space (what the UNet sees) and pred_x0, the latter two within RTOL = 1e-5
relative: max|ours - ref| / max|ref| over the whole tensor.

Covered: all nine samplers x the three spacings (leading, trailing, linspace) x epsilon and v_prediction x
1, 2, 7, 20 and 50 steps; Karras sigmas for the six samplers that step through noise levels; custom timestep
lists; img2img (sample(first_step, x0) against set_begin_index and scheduler.add_noise), Karras included. LCM
has one grid, its distillation grid, whatever the spacing.

Nothing is rescaled by hand: both sides start from the same unit noise, and minidiff's sample() scales it as
diffusers' init_noise_sigma does (sqrt(1 + sigma_max^2) for leading, sigma_max for linspace and trailing, in
Euler, Euler ancestral and Heun; 1 elsewhere). The same random numbers: each side gets its own
torch.Generator with the same seed, and both draw one x-shaped CPU tensor per step in the same order
(ddpm: every step with t > 0; ddim eta = 1 and dpmpp_2m_sde: every step; lcm: every step but the last;
euler_a: every step, the reference also on the last one, where sigma_up = 0 and the draw changes nothing).
diffusers' EulerAncestralDiscreteScheduler has no Karras option: for euler_a with karras=True the reference
steps over the sigmas and timesteps of EulerDiscreteScheduler(use_karras_sigmas=True).

The tightest cases (`python tests/parity/test_samplers.py` prints the table), each against an fp64 run of
minidiff: heun, epsilon, linspace, 2 steps, 7.6e-6 (diffusers 7.6e-6 from fp64, minidiff 2.8e-7: its corrector
is evaluated at sigma = 0.029 after a step of 14.6, where diffusers' (x - x0) / sigma loses digits and minidiff
takes dx/dsigma as pred_eps); euler with v_prediction, linspace or trailing, 1-2 steps, 7.5e-6 (both sides
about 5e-6 from fp64: the fp32 rounding of one long step from sigma_max); dpmpp_2m_sde, v_prediction, Karras,
6.3e-6 (diffusers computes h = lambda_t - lambda_s in float32, and its error scales the noise term).
"""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from minidiff.samplers import sample
from minidiff.schedule import SPACINGS
from tests.parity.toy_model import ToyModel

RTOL = 1e-5  # max|a - b| / max|b|, fp32
SEED = 1234
STEPS = (1, 2, 7, 20, 50)
PREDICTION_TYPES = ("epsilon", "v_prediction")

# SD's scheduler_config.json (SD 2.1-768 ships the same with prediction_type "v_prediction")
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, clip_sample=False, set_alpha_to_one=False)
DPM = dict(solver_order=2, solver_type="midpoint", lower_order_final=True)

# name -> (diffusers class, its config overrides, minidiff sampler, minidiff options, step kwargs)
VARIANTS = {
    "ddpm": (DDPMScheduler, {}, "ddpm", {}, {}),
    "ddim": (DDIMScheduler, {}, "ddim", {}, {}),
    "ddim-eta1": (DDIMScheduler, {}, "ddim", {"eta": 1.0}, {"eta": 1.0}),
    "euler": (EulerDiscreteScheduler, {}, "euler", {}, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "euler_a", {}, {}),
    "heun": (HeunDiscreteScheduler, {}, "heun", {}, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**DPM, "algorithm_type": "dpmsolver++"}, "dpmpp_2m", {}, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {**DPM, "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde",
                     {}, {}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                                        "lower_order_final": True, "disable_corrector": []}, "unipc", {}, {}),
}
KARRAS = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
STOCHASTIC = (DDPMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler)  # and those with an eta or SDE
K_DIFFUSION = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)


MODEL = ToyModel()


def make_noise():
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def draws_noise(scheduler, step_kwargs) -> bool:
    sde = getattr(scheduler.config, "algorithm_type", "").startswith("sde")
    return isinstance(scheduler, STOCHASTIC) or sde or step_kwargs.get("eta", 0) > 0


def run_reference(scheduler, noise, step_kwargs, first_step=0, x0=None):
    """diffusers' loop; returns [(timestep, sigma or None, x in VP space, pred_x0)], one per sampler step.

    With x0 (img2img), as StableDiffusionImg2ImgPipeline: the timesteps from first_step * scheduler.order on,
    set_begin_index there, the latent scheduler.add_noise(x0, noise, first timestep run)."""
    if draws_noise(scheduler, step_kwargs):
        step_kwargs = {**step_kwargs, "generator": torch.Generator().manual_seed(SEED)}
    begin = first_step * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if x0 is None:
        x = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):  # the schedulers that count their steps
            scheduler.set_begin_index(begin)
        x = scheduler.add_noise(x0, noise, timesteps[:1])
    heun, k_diffusion = isinstance(scheduler, HeunDiscreteScheduler), isinstance(scheduler, K_DIFFUSION)
    steps = []
    for j, t in enumerate(timesteps):
        first_stage = scheduler.state_in_first_order if heun else True
        sigma = None
        if hasattr(scheduler, "sigmas"):  # the schedulers with sigmas count their steps from begin
            sigma = float(scheduler.sigmas[begin if scheduler.step_index is None else scheduler.step_index])
        out = MODEL(scheduler.scale_model_input(x, t), t)
        result = scheduler.step(out, t, x, **step_kwargs)
        x = result.prev_sample
        if isinstance(scheduler, LCMScheduler):
            pred_x0 = result.denoised
        elif isinstance(scheduler, (DPMSolverMultistepScheduler, UniPCMultistepScheduler)):
            pred_x0 = scheduler.model_outputs[-1]  # the model output converted to x0
        else:
            pred_x0 = result.pred_original_sample
        if first_stage:  # Heun: a step ends after its correction stage, or after the last (Euler) stage
            step = (float(t), sigma, pred_x0)
            if heun and j + 1 < len(timesteps):
                continue
        x_vp = x / math.sqrt(1 + float(scheduler.sigmas[scheduler.step_index]) ** 2) if k_diffusion else x
        steps.append((step[0], step[1], x_vp, step[2]))
    return steps


def run_minidiff(noise, sampler, steps, prediction_type, spacing, options, timesteps=None, first_step=0, x0=None):
    recorded = []
    on_step = lambda **i: recorded.append((float(i["timestep"]), i["sigma"], i["x"], i["pred_x0"]))
    final = sample(MODEL, noise, sampler, steps, prediction_type=prediction_type, spacing=spacing,
                   steps_offset=SD["steps_offset"], timesteps=timesteps, callback=on_step,
                   generator=torch.Generator().manual_seed(SEED), first_step=first_step, x0=x0, **options)
    assert torch.equal(final, recorded[-1][2])  # the returned latent is the last step's
    return recorded


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def compare(ours, ref, label) -> float:
    """The largest relative error over all steps of x and pred_x0; asserts timesteps and sigmas agree."""
    assert len(ours) == len(ref), f"{label}: {len(ours)} steps, reference {len(ref)}"
    worst = 0.0
    for i, ((t, sigma, x, pred_x0), (t_ref, sigma_ref, x_ref, pred_x0_ref)) in enumerate(zip(ours, ref)):
        assert abs(t - t_ref) < 1e-3, f"{label} step {i}: timestep {t}, reference {t_ref}"
        if sigma_ref is not None:
            assert sigma == pytest.approx(sigma_ref, rel=1e-6), f"{label} step {i}: sigma {sigma}, ref {sigma_ref}"
        worst = max(worst, relative(x, x_ref), relative(pred_x0, pred_x0_ref))
    return worst


def reference_scheduler(variant, prediction_type, spacing, karras, steps=None, timesteps=None):
    scheduler_class, overrides, _, _, _ = VARIANTS.get(variant, (LCMScheduler, {}, "lcm", {}, {}))
    config = {**SD, **overrides, "prediction_type": prediction_type, "timestep_spacing": spacing}
    if karras and scheduler_class is not EulerAncestralDiscreteScheduler:
        config["use_karras_sigmas"] = True
    scheduler = scheduler_class.from_config(config)
    scheduler.set_timesteps(steps, timesteps=timesteps) if timesteps is not None else scheduler.set_timesteps(steps)
    if karras and scheduler_class is EulerAncestralDiscreteScheduler:  # no Karras option: Euler's Karras grid
        grid = EulerDiscreteScheduler.from_config({**config, "use_karras_sigmas": True})
        grid.set_timesteps(steps)
        scheduler.sigmas, scheduler.timesteps = grid.sigmas, grid.timesteps
    return scheduler


def worst_error(variant, prediction_type, spacing, karras=False):
    """Largest relative error of one (sampler, prediction type, spacing) over all step counts."""
    _, _, sampler, options, step_kwargs = VARIANTS[variant]
    worst = {}
    for steps in STEPS:
        scheduler = reference_scheduler(variant, prediction_type, spacing, karras, steps)
        ref = run_reference(scheduler, make_noise(), step_kwargs)
        ours = run_minidiff(make_noise(), sampler, steps, prediction_type, spacing, {**options, "karras": karras})
        worst[steps] = compare(ours, ref, f"{variant} {prediction_type} {spacing} karras={karras} steps={steps}")
    return worst


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_matches_diffusers_every_step(variant, prediction_type, spacing):
    worst = worst_error(variant, prediction_type, spacing)
    assert max(worst.values()) < RTOL, f"relative error per step count: {worst}"


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variant", KARRAS)
def test_karras_sigmas_match_diffusers_every_step(variant, prediction_type, spacing):
    worst = worst_error(variant, prediction_type, spacing, karras=True)
    assert max(worst.values()) < RTOL, f"relative error per step count: {worst}"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_lcm_matches_diffusers_every_step(prediction_type):
    for steps in STEPS:  # LCM picks its own timesteps (original_inference_steps=50): no spacing
        scheduler = reference_scheduler("lcm", prediction_type, "leading", False, steps)
        ref = run_reference(scheduler, make_noise(), {})
        ours = run_minidiff(make_noise(), "lcm", steps, prediction_type, "leading", {})
        assert compare(ours, ref, f"lcm {prediction_type} steps={steps}") < RTOL


CUSTOM = [999, 950, 900, 800, 650, 500, 300, 150, 60, 10, 5, 1]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])  # the spacing still decides init_noise_sigma
@pytest.mark.parametrize("variant", ["ddpm", "euler", "heun", "lcm", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_custom_timesteps_match_diffusers(variant, spacing):
    if variant == "unipc":  # UniPC's set_timesteps takes no list: lay the same grid out by hand
        scheduler = reference_scheduler(variant, "v_prediction", spacing, False, len(CUSTOM))
        scheduler.timesteps = torch.tensor(CUSTOM)
        sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()[CUSTOM]
        scheduler.sigmas = torch.cat([sigmas, torch.zeros(1)])
    else:
        scheduler = reference_scheduler(variant, "v_prediction", spacing, False, timesteps=CUSTOM)
    sampler, options, step_kwargs = VARIANTS[variant][2:] if variant != "lcm" else ("lcm", {}, {})
    ref = run_reference(scheduler, make_noise(), step_kwargs)
    ours = run_minidiff(make_noise(), sampler, None, "v_prediction", spacing, options, timesteps=CUSTOM)
    assert [t for t, _, _, _ in ours] == CUSTOM
    assert compare(ours, ref, f"{variant} custom timesteps") < RTOL


IMG2IMG = [(2, 0.6), (7, 0.6), (20, 0.6), (7, 1.0)]  # (steps, strength): first_step 1, 3, 8 and 0


@pytest.mark.parametrize(("variant", "spacing", "karras"), [
    (variant, spacing, karras) for variant in VARIANTS for spacing in SPACINGS
    for karras in ((False, True) if VARIANTS[variant][2] in KARRAS else (False,))
] + [("lcm", "leading", False)])
def test_img2img_matches_diffusers_every_step(variant, spacing, karras):
    """img2img: the last int(steps * strength) steps of the sampler's own grid, from an image latent noised to
    the first of them, as StableDiffusionImg2ImgPipeline runs a scheduler (t_start = steps - int(steps *
    strength), timesteps from t_start * order, set_begin_index, add_noise; Heun's order 2 covers its two
    stages per step) against sample(first_step=t_start, x0=image), every step compared as above."""
    image = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    sampler, options, step_kwargs = VARIANTS[variant][2:] if variant != "lcm" else ("lcm", {}, {})
    for steps, strength in IMG2IMG:
        first_step = steps - min(int(steps * strength), steps)
        scheduler = reference_scheduler(variant, "epsilon", spacing, karras, steps)
        ref = run_reference(scheduler, make_noise(), step_kwargs, first_step, image)
        ours = run_minidiff(make_noise(), sampler, steps, "epsilon", spacing, {**options, "karras": karras},
                            first_step=first_step, x0=image)
        label = f"{variant} {spacing} karras={karras} steps={steps} first_step={first_step}"
        assert compare(ours, ref, label) < RTOL, label


if __name__ == "__main__":  # the table of largest errors for the report
    for variant in VARIANTS:
        for karras in (False, True) if variant in KARRAS else (False,):
            for prediction_type in PREDICTION_TYPES:
                errors = {s: max(worst_error(variant, prediction_type, s, karras).values()) for s in SPACINGS}
                label = variant + ("-karras" if karras else "")
                print(f"{label:20s} {prediction_type:12s} " + "  ".join(f"{s} {e:.1e}" for s, e in errors.items()))
