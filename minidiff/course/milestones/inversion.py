"""The milestones of DDIM inversion (lesson 14, section 4): the inverse step, and the whole walk up the grid.

The reference is minidiff.inversion.invert_ddim on the exact Gaussian model of minidiff.course.gaussian; the
known mistakes are named: alpha_bars swapped, pred_x0 taken at the wrong level, missing square roots, the grid
walked the wrong way (noisiest first), the model asked at the level a step comes from, the walk started from
alpha_bar = 1. See core.py for the machinery.
"""

import math

import torch

from minidiff.course.milestones.core import (
    Mismatch,
    Tolerance,
    call_candidate,
    compare,
    fixed_randn,
    milestone,
    signature,
)

REREAD = "reread lesson 14, section 4 (course/14_inspect_and_edit.md, DDIM inversion)"


def _inverse_step(x, eps, a_from, a_to, level_of_x0=None, root=math.sqrt):
    """ddim_inverse_step, or one of its known mistakes (pred_x0 at another level, a root forgotten)."""
    a_x0 = a_from if level_of_x0 is None else level_of_x0
    x0 = (x - root(1 - a_x0) * eps) / root(a_x0)
    return root(a_to) * x0 + root(1 - a_to) * eps


def ddim_inverse_step(x, eps, alpha_bar_from: float, alpha_bar_to: float):
    """One DDIM inversion step: the clean latent seen at alpha_bar_from, carried up to alpha_bar_to."""
    return _inverse_step(x, eps, float(alpha_bar_from), float(alpha_bar_to))


def inverse_step_mistakes(x, eps, a_from, a_to):
    same = lambda a: a  # noqa: E731 (a "root" that forgets to take the root)
    return [
        ("alpha_bar_from and alpha_bar_to are swapped: the step starts at alpha_bar_from (more signal) and goes "
         f"up to alpha_bar_to; {REREAD}", lambda: _inverse_step(x, eps, a_to, a_from)),
        ("pred_x0 is taken at alpha_bar_to, the level the step goes to; x sits at alpha_bar_from, so "
         f"x_0 = (x - sqrt(1 - alpha_bar_from) eps) / sqrt(alpha_bar_from); {REREAD}",
         lambda: _inverse_step(x, eps, a_from, a_to, level_of_x0=a_to)),
        (f"missing sqrt: every alpha_bar enters DDIM's update through its square root; {REREAD}",
         lambda: _inverse_step(x, eps, a_from, a_to, root=same)),
    ]


@milestone("DDIM inversion step (DDIM's eq. 12, from t_prev up to t)", lesson=14)
def check_ddim_inverse_step(candidate=None):
    """ddim_inverse_step(x, eps, alpha_bar_from, alpha_bar_to) -> x at the level alpha_bar_to; alpha_bars as floats

    Checked along SD's 50-step grid walked upwards (leading, steps_offset 1, the first step from alpha_bar_0),
    with the exact Gaussian model's eps, each step from the reference's x.
    """
    from minidiff.course.gaussian import GaussianEpsModel

    candidate, call = candidate or ddim_inverse_step, signature(check_ddim_inverse_step)
    tol, model = Tolerance(1e-5, 1e-5), GaussianEpsModel()
    alphas_cumprod = model.schedule.alphas_cumprod
    x, largest = 0.5 + 0.8 * fixed_randn(1, 4, 8, 8, seed=41), 0.0
    grid, previous = model.schedule.ddim_timesteps(50)
    for i, (t, t_prev) in enumerate(reversed(list(zip(grid.tolist(), previous.tolist())))):
        a_from, a_to = float(alphas_cumprod[max(t_prev, 0)]), float(alphas_cumprod[t])
        eps = model(x, t)
        expected = ddim_inverse_step(x, eps, a_from, a_to)
        yours = call_candidate(candidate, call, x.clone(), eps.clone(), a_from, a_to)
        error = compare(yours, expected, tol, f"step {i} ({max(t_prev, 0)} -> {t})",
                        inverse_step_mistakes(x, eps, a_from, a_to))
        largest, x = max(largest, error), expected
    return f"50 steps up SD's grid, largest |diff| {largest:.1e} <= {tol.atol:g} (fp32)"


class _Recorder:
    """The model, remembering the timesteps it was asked about."""

    def __init__(self, model):
        self.model, self.asked = model, []

    def __call__(self, x, t):
        self.asked.append(int(t))
        return self.model(x, t)


def _walk(model, x, alphas_cumprod, pairs, ask_at_from=False, start_at_one=False):
    """The inversion over `pairs` [(t_from, t_to)] in the order given, or one of its known mistakes."""
    for i, (t_from, t_to) in enumerate(pairs):
        a_from = 1.0 if (start_at_one and i == 0) else float(alphas_cumprod[max(t_from, 0)])
        x = _inverse_step(x, model(x, max(t_from, 0) if ask_at_from else t_to), a_from, float(alphas_cumprod[t_to]))
    return x


def invert_mistakes(model, x, alphas_cumprod, pairs):
    return [
        (f"the grid is walked the wrong way: inversion starts at the least noisy step (t=1) and climbs to t=981; "
         f"{REREAD}", lambda: _walk(model, x, alphas_cumprod, [(a, b) for b, a in pairs[::-1]])),
        ("the model is asked at the timestep the step comes from (t_prev); ask it at the t the step goes to, "
         f"eps(x_(t_prev), t) standing in for eps(x_t, t); {REREAD}",
         lambda: _walk(model, x, alphas_cumprod, pairs, ask_at_from=True)),
        ("the first step starts from alpha_bar = 1 (diffusers' set_alpha_to_one=True); SD's DDIM ends at "
         f"alpha_bar_0, so its inversion starts there; {REREAD}",
         lambda: _walk(model, x, alphas_cumprod, pairs, start_at_one=True)),
    ]


@milestone("DDIM inversion: x_0 up SD's grid to x_T", lesson=14)
def check_ddim_invert(candidate=None):
    """ddim_invert(model, x_0, alphas_cumprod, steps) -> x_T; model(x, t) -> eps

    The exact Gaussian model, 50 and 10 steps on SD's grid (leading, steps_offset 1), against
    minidiff.inversion.invert_ddim: the timesteps the model is asked about, then x_T.
    """
    from minidiff.course.gaussian import GaussianEpsModel
    from minidiff.inversion import invert_ddim
    from minidiff.schedule import Denoiser

    call, model = signature(check_ddim_invert), GaussianEpsModel()
    schedule, tol = model.schedule, Tolerance(1e-4, 1e-4)
    candidate = candidate or (lambda m, x, a, steps: invert_ddim(Denoiser(m, schedule), x,
                                                                 *schedule.ddim_timesteps(steps)))
    x0 = 0.5 + 0.8 * fixed_randn(1, 4, 8, 8, seed=42)
    for steps in (50, 10):
        grid, previous = schedule.ddim_timesteps(steps)
        pairs = list(zip(previous.tolist(), grid.tolist()))[::-1]  # (t_from, t_to), least noisy first
        expected = invert_ddim(Denoiser(model, schedule), x0.clone(), grid, previous)
        yours_model = _Recorder(model)
        with torch.no_grad():
            yours = call_candidate(candidate, call, yours_model, x0.clone(), schedule.alphas_cumprod, steps)
        wanted = [t for _, t in pairs]
        if yours_model.asked != wanted:
            hint = ""
            if yours_model.asked == wanted[::-1]:
                hint = invert_mistakes(model, x0, schedule.alphas_cumprod, pairs)[0][0]
            elif yours_model.asked == [max(t, 0) for t, _ in pairs]:
                hint = invert_mistakes(model, x0, schedule.alphas_cumprod, pairs)[1][0]
            raise Mismatch(f"{steps} steps: your model was asked about {yours_model.asked[:4]}..., the reference's "
                           f"about {wanted[:4]}..." + (f"\n  hint: {hint}" if hint else ""))
        compare(yours, expected, tol, f"{steps} steps, x_T", invert_mistakes(model, x0, schedule.alphas_cumprod,
                                                                             pairs))
    return f"x_T after 50 and 10 steps within {tol.atol:g} (fp32)"
