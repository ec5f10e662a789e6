"""The milestone of DDIM's early exit (lesson 03): stop after step k and return that step's pred_x0.

The reference is minidiff.samplers.sample(..., "ddim", early_exit=k) on the exact Gaussian model of
minidiff.course.gaussian; the known mistakes are the same run returning x_t, or stopping a step off.
See core.py for the machinery.
"""

import torch

from minidiff.course.milestones.core import Tolerance, call_candidate, compare, fixed_randn, milestone, signature

REREAD = "reread lesson 03 (course/03_ddim.md, x_inter against pred_x0, early exit)"


def _ddim_trace(model, noise, steps: int):
    """(x_t after each step, pred_x0 of each step) of minidiff's DDIM on SD's grid."""
    from minidiff.samplers import sample

    xs, x0s = [], []

    def record(x, pred_x0, **info):  # returns None: a callback's return would steer the run (minidiff.steering)
        xs.append(x.clone())
        x0s.append(pred_x0.clone())

    sample(model, noise, "ddim", steps, callback=record)
    return xs, x0s


@milestone("DDIM early exit: stop after step k, return its pred_x0", lesson=3)
def check_ddim_early_exit(candidate=None):
    """ddim_early_exit(model, x_T, alphas_cumprod, steps, stop_after) -> pred_x0 of step stop_after; model -> eps

    The Gaussian model of ddim_50, 50 steps on SD's grid (leading, steps_offset 1), stopping after steps 1, 35 and 50.
    """
    from minidiff.course.gaussian import GaussianEpsModel
    from minidiff.samplers import sample

    model, noise = GaussianEpsModel(), fixed_randn(1, 4, 16, 16, seed=30)
    alphas_cumprod, tol = model.schedule.alphas_cumprod, Tolerance(1e-5, 1e-5)
    xs, x0s = _ddim_trace(model, noise, 50)
    run = candidate or (lambda m, x, a, steps, k: sample(m, x, "ddim", steps, early_exit=k))
    for k in (1, 35, 50):
        mistakes = [(f"yours returned x_t after step {k} (x_inter), not the step's pred_x0; {REREAD}",
                     lambda k=k: xs[k - 1])]
        mistakes += [(f"yours stopped one step {word} (after step {k + shift}); stop_after counts the steps run, "
                      f"from 1; {REREAD}", lambda k=k, s=shift: x0s[k - 1 + s])
                     for word, shift in (("late", 1), ("early", -1)) if 1 <= k + shift <= 50]
        with torch.no_grad():
            yours = call_candidate(run, signature(check_ddim_early_exit), model, noise.clone(), alphas_cumprod, 50, k)
            compare(yours, x0s[k - 1], tol, f"stop_after={k}", mistakes)
    return f"pred_x0 after steps 1, 35 and 50 of 50 within {tol.atol:g} (fp32)"
