"""Parity of the multistep solvers with the diffusers schedulers they mirror, step by step.

Each case runs the same toy model (nonlinear in x and t) through diffusers' scheduler loop and through
minidiff's pure function, and compares at every step the timestep, the noise level, the latent x (VP space)
and pred_x0 (diffusers' converted model output). Tolerance: fp32, max|a - b| / max|b| <= 1e-5.
"""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from minidiff.samplers import sampler_grid
from minidiff.schedule import Denoiser, NoiseSchedule
from minidiff.solvers import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc

# fp32, relative to the largest entry of the reference. The largest error seen is 6.6e-6 (dpmpp_2m_sde, pred_x0,
# v_prediction, Karras, 50 steps): diffusers computes h = lambda_t - lambda_s in float32, and the error of h
# scales the noise term; minidiff's float64 coefficients sit ~5x closer to an all-float64 evaluation.
RTOL = 1e-5
SHAPE = (2, 4, 8, 8)

# SD 1.5 ships prediction_type "epsilon", SD 2.1-768 "v_prediction"; both: this schedule, steps_offset 1, leading
SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
SOLVERS = {
    "dpmpp_2m": (
        sample_dpmpp_2m,
        lambda **kw: DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True, **kw
        ),
    ),
    "dpmpp_2m_sde": (
        sample_dpmpp_2m_sde,
        lambda **kw: DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True, **kw
        ),
    ),
    "unipc": (
        sample_unipc,
        lambda **kw: UniPCMultistepScheduler(
            solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[], **kw
        ),
    ),
}
GRIDS = ["leading", "trailing", "linspace", "karras"]
STEPS = [1, 2, 7, 20, 50]


class ToyModel(torch.nn.Module):
    """eps/v = tanh(channel mix of x + a t-dependent shift) + a little of x: nonlinear in x and t."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5 + torch.eye(4), requires_grad=False)
        self.shift = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)

    def forward(self, x, t):
        t = float(t) / 1000
        mixed = (self.mix[:, :, None, None] * x[:, None]).sum(2)  # (B, C_out, C_in, H, W) summed over C_in
        h = mixed + (t - 0.5) * self.shift[:, None, None]
        return torch.tanh(h * (1 + t)) + 0.1 * x * t


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_reference(scheduler, model, x, seed=None):
    """diffusers' denoising loop; returns (timesteps, sigmas, [x after each step], [pred_x0 of each step])."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    xs, preds = [], []
    for t in scheduler.timesteps:
        out = model(x, t)
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        xs.append(x)
        preds.append(scheduler.model_outputs[-1])  # the converted output: x0 for dpmsolver++ and UniPC(x0)
    return scheduler.timesteps.tolist(), scheduler.sigmas[:-1].tolist(), xs, preds


def run_minidiff(sample_fn, model, prediction_type, x, steps, seed=None, **grid_options):
    denoiser = Denoiser(model, NoiseSchedule.sd(), prediction_type)
    grid = sampler_grid(denoiser.schedule, "dpmpp_2m", steps, **grid_options)  # the grid of all three
    seen = []
    callback = lambda **kw: seen.append(kw)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    final = sample_fn(denoiser, x, *grid, generator=generator, callback=callback)
    assert torch.equal(final, seen[-1]["x"])
    return (
        [s["timestep"] for s in seen],
        [s["sigma"] for s in seen],
        [s["x"] for s in seen],
        [s["pred_x0"] for s in seen],
    )


def compare(ours, ref):
    """Largest relative error over all steps of x and pred_x0; timesteps must agree exactly, sigmas closely."""
    (ts, sigmas, xs, preds), (ts_ref, sigmas_ref, xs_ref, preds_ref) = ours, ref
    assert ts == ts_ref
    assert sigmas == pytest.approx(sigmas_ref, rel=1e-6)
    assert len(xs) == len(xs_ref)
    err_x = max(max_rel(a, b) for a, b in zip(xs, xs_ref))
    err_x0 = max(max_rel(a, b) for a, b in zip(preds, preds_ref))
    return err_x, err_x0


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_matches_diffusers_every_step(solver, prediction_type, grid, steps):
    sample_fn, make_scheduler = SOLVERS[solver]
    karras = grid == "karras"
    spacing = "leading" if karras else grid
    scheduler = make_scheduler(
        **SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing, use_karras_sigmas=karras
    )
    scheduler.set_timesteps(steps)
    model = ToyModel()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    seed = 1234 if solver == "dpmpp_2m_sde" else None

    ref = run_reference(scheduler, model, x.clone(), seed)
    ours = run_minidiff(sample_fn, model, prediction_type, x.clone(), steps, seed, spacing=spacing, karras=karras)
    err_x, err_x0 = compare(ours, ref)
    assert err_x <= RTOL and err_x0 <= RTOL, f"x: {err_x:.2e}, pred_x0: {err_x0:.2e}"


CUSTOM = [999, 950, 900, 800, 650, 500, 300, 150, 60, 10, 5, 1]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_custom_timesteps_match_diffusers(solver):
    sample_fn, make_scheduler = SOLVERS[solver]
    scheduler = make_scheduler(**SD_CONFIG, prediction_type="epsilon")
    if solver == "unipc":
        # UniPC's set_timesteps takes no custom list: lay the same grid out by hand (sigmas at t, then 0)
        scheduler.set_timesteps(len(CUSTOM))
        scheduler.timesteps = torch.tensor(CUSTOM)
        sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()[CUSTOM]
        scheduler.sigmas = torch.cat([sigmas, torch.zeros(1)])
    else:
        scheduler.set_timesteps(timesteps=CUSTOM)
    model = ToyModel()
    x = torch.randn(SHAPE)
    seed = 7 if solver == "dpmpp_2m_sde" else None
    ref = run_reference(scheduler, model, x.clone(), seed)
    ours = run_minidiff(sample_fn, model, "epsilon", x.clone(), 3, seed, timesteps=CUSTOM)
    err_x, err_x0 = compare(ours, ref)
    assert err_x <= RTOL and err_x0 <= RTOL, f"x: {err_x:.2e}, pred_x0: {err_x0:.2e}"
