"""Milestones of sampling: the DDPM step, the timestep grid, the Euler and DPM++ 2M steps, and the judge of a
whole sampler, which compares every model call (the timestep asked, the x_t given) with the reference method
on the same grid.

The references here are written apart from the course's solutions (minidiff/course/solutions) and checked
against the library's samplers in tests/test_milestones.py; each `_with` function computes the reference or,
with one argument changed, a known mistake. See core.py for the machinery.

Notation (Ho et al. 2020; Song et al. 2021; Lu et al. 2022):
    a_t, a_prev, a_next -> alpha_bar at this timestep, at the one a DDPM/DDIM step lands on, at the next grid point
    lam                 -> half the log-SNR, log(alpha / sigma) = 0.5 log(a / (1 - a)); h = lam_next - lam_t
    r                   -> h_prev / h, the ratio of the previous step to this one (DPM-Solver++(2M))
    calls               -> [(t, x_t)]: what a sampler asked its model, in order
"""

import inspect
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
from minidiff.course.milestones.explain import term_by_term
from minidiff.schedule import NoiseSchedule

REREAD = {
    "ddpm": "reread lesson 02 (course/02_ddpm.md, the posterior q(x_prev | x_t, x_0))",
    "grid": "reread lesson 03 (course/03_ddim.md, the timestep grid: leading, trailing, linspace, steps_offset)",
    "ddim": "reread lesson 03 (course/03_ddim.md, the DDIM update)",
    "dpmpp": "reread lesson 04 (course/04_ode_samplers.md, DPM++ 2M)",
    "euler": "reread lesson 04 (course/04_ode_samplers.md, the ODE and its Euler step)",
}
TRAJECTORY = Tolerance(1e-5, 1e-5)  # fp32: a correct sampler stays within ~2e-6 of the reference on 50 steps


def hint(text: str, section: str) -> str:
    return f"{text}; {REREAD[section]}"


# --- the DDPM step -----------------------------------------------------------------------------------------


def _ddpm_with(x_t, eps, a_t, a_prev, noise, std=math.sqrt, beta_from_jump=True, alpha_of_jump=True,
               posterior=True, sign=1.0):
    """The ancestral DDPM step (Ho et al. 2020, eq. 6-7), or with one term changed: its known mistakes."""
    a_t, a_prev = float(a_t), float(a_prev)
    beta = 1 - a_t / a_prev if beta_from_jump else 1 - a_t
    alpha = a_t / a_prev if alpha_of_jump else a_t
    x0 = (x_t - sign * math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a_t) * x_t
    variance = (1 - a_prev) / (1 - a_t) * beta if posterior else beta
    return mean + std(variance) * noise


def ddpm_step_mistakes(*args):
    return [
        (hint("the noise is scaled by the variance beta~_t where its square root belongs: x_prev = mu~_t + "
              "sqrt(beta~_t) z", "ddpm"), lambda: _ddpm_with(*args, std=lambda v: v)),
        (hint("that is sigma_t^2 = beta_t (DDPM's 'fixed large' variance); SD's scheduler samples with the posterior "
              "variance beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t", "ddpm"),
         lambda: _ddpm_with(*args, posterior=False)),
        (hint("alpha_bar where alpha belongs: the x_t coefficient is sqrt(alpha_t) = sqrt(alpha_bar_t / "
              "alpha_bar_prev), the jump's alpha, not sqrt(alpha_bar_t)", "ddpm"),
         lambda: _ddpm_with(*args, alpha_of_jump=False)),
        (hint("beta_t of the jump is 1 - alpha_bar_t / alpha_bar_prev, not 1 - alpha_bar_t", "ddpm"),
         lambda: _ddpm_with(*args, beta_from_jump=False)),
        (hint("the noise term is missing: x_prev = mu~_t + sqrt(beta~_t) z", "ddpm"),
         lambda: _ddpm_with(*args, std=lambda v: 0.0)),
        (hint("sign: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), the noise is subtracted", "ddpm"),
         lambda: _ddpm_with(*args, sign=-1.0)),
    ]


@milestone("DDPM step: the posterior mean and variance (Ho et al. 2020, eq. 6-7)", lesson=2)
def check_ddpm_step(candidate=None):
    """ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_prev, noise) -> x_prev; alpha_bars 0-dim tensors (1.0 at the end)

    Checked along a 50-step leading trajectory of the exact Gaussian model, one fixed noise per step, each step
    from the reference's x_t; the last step lands on alpha_bar_prev = 1.0 (no noise left).
    """
    from minidiff.course.gaussian import GaussianEpsModel

    candidate, call = candidate or _ddpm_with, signature(check_ddpm_step)
    model = GaussianEpsModel()
    ac, grid = model.schedule.alphas_cumprod, model.schedule.timesteps(50).tolist()
    x, largest = fixed_randn(1, 4, 8, 8, seed=60), 0.0
    for i, t in enumerate(grid):
        eps, noise = model(x, t), fixed_randn(1, 4, 8, 8, seed=61 + i)
        a_prev = ac[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0, dtype=ac.dtype)
        args = (x, eps, ac[t], a_prev, noise)
        expected = _ddpm_with(*args)
        yours = call_candidate(candidate, call, *(a.clone() for a in args))
        terms = lambda args=args: term_by_term(candidate, _ddpm_with, args, {0: "x_t", 1: "eps", 4: "noise"},  # noqa: E731
                                               TRAJECTORY, "x_t and eps make the posterior mean; the noise's "
                                               "coefficient is its std, sqrt(beta~_t)")
        largest = max(largest, compare(yours, expected, TRAJECTORY, f"step {i} (t={t})", ddpm_step_mistakes(*args),
                                       terms))
        x = expected
    return f"50 steps, the last onto alpha_bar 1.0, largest |diff| {largest:.1e} <= {TRAJECTORY.atol:g} (fp32)"


# --- the timestep grid ----------------------------------------------------------------------------------------

GRIDS = (("leading", 1), ("leading", 0), ("trailing", 1), ("linspace", 1))  # (spacing, steps_offset) of the course


def grid_name(spacing: str, steps_offset: int) -> str:
    return f"{spacing} grid" + (f" with steps_offset={steps_offset}" if spacing == "leading" else "")


def _short(grid) -> str:
    grid = list(grid)
    return ", ".join(str(t) for t in grid[:3]) + (f", ..., {grid[-1]}" if len(grid) > 3 else "")


def grid_mistake(yours: list, expected: list, steps: int, spacing: str, steps_offset: int,
                 schedule: NoiseSchedule) -> str:
    """The named mistake of a grid that is not the expected one, else ""."""
    if len(yours) != len(expected):
        return hint(f"{len(yours)} timesteps for {steps} steps: one timestep (one model call) per step", "grid")
    if yours == sorted(expected):
        return hint("the grid runs noisiest first (" + _short(expected) + "); yours runs upwards", "grid")
    if yours[:-1] == expected[1:]:
        return hint("each model call asks about the timestep the step lands on (t_prev); eps_theta(x_t, t) is "
                    "asked at the timestep t the step starts from", "grid")
    if spacing == "leading" and any(yours == [t + delta for t in expected] for delta in (-1, 1)):
        wanted = "adds steps_offset = 1 (SD's 981, ..., 1 for 50 steps)" if steps_offset else "has steps_offset = 0"
        return hint(f"off by one: the leading grid {wanted}, yours is {_short(yours)}: is steps_offset passed on?",
                    "grid")
    for other, offset in GRIDS:
        if (other, offset) != (spacing, steps_offset) and yours == schedule.timesteps(steps, other, offset).tolist():
            return hint(f"asked for the {grid_name(spacing, steps_offset)}, yours is the {grid_name(other, offset)}: "
                        "pass spacing and steps_offset on to timesteps()", "grid")
    if spacing == "linspace" and yours == [int(t) for t in torch.linspace(0, schedule.num_train_timesteps - 1,
                                                                          steps).double().flip(0).tolist()]:
        return hint("the linspace grid rounds to the nearest integer (978.6 -> 979); yours truncates", "grid")
    return ""


@milestone("the timestep grid: leading, trailing, linspace, steps_offset", lesson=3)
def check_timesteps(candidate=None):
    """timesteps(steps, spacing="leading", steps_offset=1, num_train_timesteps=1000) -> ints, noisiest first

    Compared exactly with diffusers' DDIM/DDPM grids (NoiseSchedule.timesteps) at 50, 20 and 7 steps.
    """
    schedule, call = NoiseSchedule.sd(), signature(check_timesteps)
    library = lambda steps, spacing, offset, T=1000: schedule.timesteps(steps, spacing, offset)  # noqa: E731
    for steps in (50, 20, 7):
        for spacing, offset in GRIDS:
            expected = schedule.timesteps(steps, spacing, offset).tolist()
            yours = call_candidate(candidate or library, call, steps, spacing, offset, 1000)
            try:
                yours = [int(t) for t in (yours.tolist() if torch.is_tensor(yours) else yours)]
            except (TypeError, ValueError):
                raise Mismatch(f"yours returned {type(yours).__name__}, expected a list of ints; the milestone calls "
                               f"{call}") from None
            if yours != expected:
                where = next((i for i, (a, b) in enumerate(zip(yours, expected)) if a != b), min(len(yours),
                                                                                                 len(expected)))
                mine = yours[where] if where < len(yours) else "(none)"
                theirs = expected[where] if where < len(expected) else "(none)"
                mistake = grid_mistake(yours, expected, steps, spacing, offset, schedule)
                raise Mismatch(f"{steps} steps, {grid_name(spacing, offset)}, position {where}: yours {mine}, "
                               f"reference {theirs} (reference {_short(expected)}; yours {_short(yours)})"
                               + (f"\n  hint: {mistake}" if mistake else ""))
    return "50, 20 and 7 steps on the leading (steps_offset 1 and 0), trailing and linspace grids, exact"


# --- Euler and DPM-Solver++(2M) steps -----------------------------------------------------------------------


def _euler_with(x, d, sigma, sigma_next, sign=1.0, step=None):
    return x + sign * d * ((sigma_next - sigma) if step is None else step(sigma, sigma_next))


@milestone("Euler step of the probability-flow ODE (Karras et al. 2022, alg. 1)", lesson=4)
def check_euler_step(candidate=None):
    """euler_step(x, d, sigma, sigma_next) -> x_next; x in k-diffusion space, d = dx/dsigma, sigmas as floats"""
    x, d = fixed_randn(1, 4, 8, 8, seed=70) * 14.6, fixed_randn(1, 4, 8, 8, seed=71)
    tol = Tolerance(1e-5, 1e-5)
    for sigma, sigma_next in ((14.61, 9.7), (1.2, 0.8), (0.03, 0.0)):
        args = (x, d, sigma, sigma_next)
        mistakes = [
            (hint("sign: the step is d (sigma_next - sigma), negative, since sigma falls", "euler"),
             lambda args=args: _euler_with(*args, sign=-1.0)),
            (hint("the step length is sigma_next - sigma, not sigma_next", "euler"),
             lambda args=args: _euler_with(*args, step=lambda s, n: n)),
            (hint("the step length is sigma_next - sigma, not sigma", "euler"),
             lambda args=args: _euler_with(*args, step=lambda s, n: -s)),
        ]
        yours = call_candidate(candidate or _euler_with, signature(check_euler_step), x.clone(), d.clone(), sigma,
                               sigma_next)
        terms = lambda args=args: term_by_term(candidate or _euler_with, _euler_with, args, {0: "x", 1: "d"},  # noqa: E731
                                               tol)
        compare(yours, _euler_with(*args), tol, f"sigma {sigma} -> {sigma_next}", mistakes, terms)
    return f"three steps, the last to sigma = 0, within {tol.atol:g} (fp32)"


def _lam(a, full=False) -> float:
    a = float(a)
    return (1.0 if full else 0.5) * math.log(a / (1 - a))


def _dpmpp_with(x_t, x0, x0_prev, a_t, a_next, a_prev=None, r_inverted=False, second_order=True, half=True,
                full_log_snr=False, to_zero=True):
    """One DPM-Solver++(2M) step in VP space (Lu et al. 2022, alg. 2, midpoint), or a known mistake."""
    a_t, a_next = float(a_t), float(a_next)
    if a_next == 1.0 and to_zero:
        return x0
    if a_next == 1.0:  # the mistake of stopping at alpha_bar_0 rather than at sigma = 0 is made by the sampler
        a_next = 0.9991499781608582
    lam_t, lam_next = _lam(a_t, full_log_snr), _lam(a_next, full_log_snr)
    h = lam_next - lam_t
    d = x0
    if x0_prev is not None and second_order:
        r = (lam_t - _lam(a_prev, full_log_snr)) / h
        r = 1 / r if r_inverted else r
        d = x0 + (x0 - x0_prev) / r * (0.5 if half else 1.0)
    return math.sqrt(1 - a_next) / math.sqrt(1 - a_t) * x_t - math.sqrt(a_next) * math.expm1(-h) * d


DPMPP_MISTAKES = {  # name -> (the _dpmpp_with options, the hint)
    "r_inverted": ({"r_inverted": True}, "the step ratio is inverted: r = h_prev / h (the step before over this "
                   "one), D1 = (D0 - D0_prev) / r"),
    "first_order": ({"second_order": False}, "the second-order term is missing: D = D0 + D1 / 2 with D1 = (D0 - "
                    "D0_prev) / r from the second step on (without it this is DDIM)"),
    "no_half": ({"half": False}, "the midpoint correction is D1 / 2, not D1: D = D0 + D1 / 2"),
    "full_log_snr": ({"full_log_snr": True}, "lambda is log(alpha / sigma) = 0.5 log(alpha_bar / (1 - alpha_bar)), "
                     "half the log-SNR"),
}


def dpmpp_step_mistakes(*args):
    return [(hint(text, "dpmpp"), lambda options=options: _dpmpp_with(*args, **options))
            for options, text in DPMPP_MISTAKES.values()]


@milestone("DPM-Solver++(2M) step (Lu et al. 2022, alg. 2)", lesson=4)
def check_dpmpp_2m_step(candidate=None):
    """dpmpp_2m_step(x_t, pred_x0, pred_x0_prev, alpha_bar_t, alpha_bar_next, alpha_bar_prev=None) -> x_next

    A first step (pred_x0_prev None), two second-order steps of a 20-step leading grid and the last step onto
    sigma = 0 (alpha_bar_next = 1.0, which returns pred_x0); alpha_bars as floats.
    """
    ac = NoiseSchedule.sd().alphas_cumprod
    x, x0, x0_prev = (fixed_randn(1, 4, 8, 8, seed=s) for s in (72, 73, 74))
    cases = [("first step, t=951 -> 901", (x, x0, None, ac[951], ac[901], None)),
             ("t=901 -> 851, after 951", (x, x0, x0_prev, ac[901], ac[851], ac[951])),
             ("t=101 -> 51, after 151", (x, x0, x0_prev, ac[101], ac[51], ac[151])),
             ("last step, t=1 -> sigma 0", (x, x0, x0_prev, ac[1], 1.0, ac[51]))]
    tol = Tolerance(1e-5, 1e-5)
    for where, args in cases:
        args = tuple(float(a) if torch.is_tensor(a) and a.ndim == 0 else a for a in args)
        yours = call_candidate(candidate or _dpmpp_with, signature(check_dpmpp_2m_step),
                               *(a.clone() if torch.is_tensor(a) else a for a in args))
        compare(yours, _dpmpp_with(*args), tol, where, dpmpp_step_mistakes(*args))
    return f"first, second-order and last steps within {tol.atol:g} (fp32)"


# --- whole samplers, judged by their trajectory ------------------------------------------------------------------


class Recorder:
    """A model that writes down every call: (the timestep asked, a copy of the x_t given)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x_t, t):
        self.calls.append((int(t), x_t.detach().clone()))
        return self.model(x_t, t)


def _ddim_variant(model, x, ac, grid, to_alpha_one=False, lands_on_t_minus_1=False):
    """DDIM (eta 0) on `grid`, or a known mistake of the loop around a correct step."""
    for i, t in enumerate(grid):
        t_prev = t - 1 if lands_on_t_minus_1 else (grid[i + 1] if i + 1 < len(grid) else None)
        a_t = float(ac[t])
        a_prev = (1.0 if to_alpha_one else float(ac[0])) if t_prev is None else float(ac[max(t_prev, 0)])
        eps = model(x, t)
        x = math.sqrt(a_prev) * (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t) + math.sqrt(1 - a_prev) * eps
    return x


def _dpmpp_variant(model, x, ac, grid, to_zero=True, **options):
    """DPM-Solver++(2M) on `grid`, or a known mistake (the options of _dpmpp_with, or to_zero=False)."""
    x0_prev = a_prev = None
    for i, t in enumerate(grid):
        a_t, a_next = float(ac[t]), float(ac[grid[i + 1]]) if i + 1 < len(grid) else 1.0
        eps = model(x, t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = _dpmpp_with(x, x0, x0_prev, a_t, a_next, a_prev, to_zero=to_zero, **options)
        x0_prev, a_prev = x0, a_t
    return x


SAMPLER_MISTAKES = {
    "ddim": [
        (hint("the last step lands on alpha_bar_0 = alphas_cumprod[0], as SD ships DDIM (set_alpha_to_one=False), "
              "not on alpha_bar = 1", "ddim"), {"to_alpha_one": True}),
        (hint("each step lands on the grid's next timestep, not on t - 1", "ddim"), {"lands_on_t_minus_1": True}),
    ],
    "dpmpp_2m": [(hint(text, "dpmpp"), options) for options, text in DPMPP_MISTAKES.values()] + [
        (hint("the last step goes to sigma = 0 (alpha_bar 1.0) and returns D0; yours stops at alpha_bar_0", "dpmpp"),
         {"to_zero": False})],
}
VARIANTS = {"ddim": _ddim_variant, "dpmpp_2m": _dpmpp_variant}


def allowed_grids(method: str, steps: int, spacing: str, steps_offset: int, schedule: NoiseSchedule) -> list:
    """The grids a correct sampler may run on: lesson 03's and, for DPM++, diffusers' multistep grid too."""
    grids = [schedule.timesteps(steps, spacing, steps_offset).tolist()]
    if method == "dpmpp_2m":
        grids.append(multistep_grid(steps, spacing, steps_offset, schedule.num_train_timesteps))
    return grids


def multistep_grid(steps: int, spacing: str, steps_offset: int, T: int = 1000) -> list:
    """diffusers' DPMSolverMultistepScheduler grid: N + 1 points over the range, the last (t = 0) dropped."""
    if spacing == "leading":
        return [i * (T // (steps + 1)) + steps_offset for i in range(steps, 0, -1)]
    if spacing == "trailing":
        return [round(T - i * T / steps) - 1 for i in range(steps)]
    return [round(i * (T - 1) / steps) for i in range(steps, 0, -1)]


def takes_grid_options(candidate) -> bool:
    try:
        inspect.signature(candidate).bind(None, None, None, 1, spacing="leading", steps_offset=1)
        return True
    except (TypeError, ValueError):
        return False


def _recorded(model, noise, method: str, steps: int, options: dict):
    """([(t, x_t)], x_0) of minidiff's sampler `method`."""
    from minidiff.samplers import sample

    recorder = Recorder(model)
    x0 = sample(recorder, noise.clone(), method, steps, **options)
    return recorder.calls, x0


def _compare_trajectory(calls, x0, reference_calls, expected_x0, method, label, grid, model, noise):
    """Mismatch at the first model call (or the result) of yours that differs from the reference's, with the
    known mistake it matches, else the step that made it."""
    variants = {}

    def variant(options):
        key = tuple(sorted(options.items()))
        if key not in variants:
            recorder = Recorder(model)
            variants[key] = (recorder.calls, VARIANTS[method](recorder, noise.clone(), model.schedule.alphas_cumprod,
                                                              grid, **options))
        return variants[key]

    for i, ((t, mine), (_, theirs)) in enumerate(zip(calls, reference_calls)):
        mistakes = [(text, lambda options=options, i=i: variant(options)[0][i][1])
                    for text, options in SAMPLER_MISTAKES[method]]
        try:
            compare(mine, theirs, TRAJECTORY, f"{label}, step {i} (t={t}): the x_t your model was given", mistakes)
        except Mismatch as failure:
            step = "ddim_step" if method == "ddim" else "dpmpp_2m_step"
            raise Mismatch(f"{failure}" + ("" if "hint:" in str(failure) else
                                           f"\n  the step before (t={grid[i - 1]}) made it: check {step} (its "
                                           "milestone compares it alone)")) from None
    mistakes = [(text, lambda options=options: variant(options)[1]) for text, options in SAMPLER_MISTAKES[method]]
    compare(x0, expected_x0, TRAJECTORY, f"{label}, the result x_0 (after the last step, from t={grid[-1]})", mistakes)


def judge_sampler(candidate, call: str, method: str, steps: int, model, noise) -> str:
    """Run candidate on every grid of the course (or SD's alone, if it takes no spacing) and compare each model
    call and the result with minidiff's `method` on the same grid; Mismatch names the first step that differs."""
    schedule = model.schedule
    with_options = takes_grid_options(candidate)
    combos = GRIDS if with_options else GRIDS[:1]
    for spacing, offset in combos:
        options = {"spacing": spacing, "steps_offset": offset} if with_options else {}
        label = grid_name(spacing, offset) + ("" if with_options else " (SD's; your sampler takes no spacing)")
        yours = Recorder(model)
        x0 = call_candidate(candidate, call, yours, noise.clone(), schedule.alphas_cumprod, steps, **options)
        asked = [t for t, _ in yours.calls]
        grids = allowed_grids(method, steps, spacing, offset, schedule)
        if asked not in grids:
            expected = grids[0]
            i = next((i for i, (a, b) in enumerate(zip(asked, expected)) if a != b), min(len(asked), len(expected)))
            theirs = f"t={expected[i]}" if i < len(expected) else "nothing (the reference is done)"
            mine = f"was asked about t={asked[i]}" if i < len(asked) else "was not asked"
            mistake = grid_mistake(asked, expected, steps, spacing, offset, schedule)
            raise Mismatch(f"{label}, step {i}: your model {mine}, the reference about {theirs} (reference "
                           f"{_short(expected)}; yours {_short(asked)}); the timesteps milestone checks the grid alone"
                           + (f"\n  hint: {mistake}" if mistake else ""))
        # the lesson's method steps to the grid's next timestep; the library's own DDIM on a linspace grid steps
        # back by T // N as diffusers does, and a sampler that does the same passes too
        references = [_recorded(model, noise, method, steps, {"timesteps": asked})]
        if method == "ddim" and spacing == "linspace" and asked == grids[0]:
            references.append(_recorded(model, noise, method, steps, {"spacing": spacing, "steps_offset": offset}))
        failures = []
        for calls, expected_x0 in references:
            try:
                _compare_trajectory(yours.calls, x0, calls, expected_x0, method, label, asked, model, noise)
                break
            except Mismatch as failure:
                failures.append(failure)
        else:
            raise failures[0]
    grids = "the leading (steps_offset 1 and 0), trailing and linspace grids" if with_options else "SD's grid"
    return f"every model call and x_0 as minidiff's {method} on {grids}, within {TRAJECTORY.atol:g} (fp32)"
