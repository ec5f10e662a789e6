"""Milestone of lesson 14, section 3: A1111's prompt weighting, each chunk scaled back to its own mean.

Notation (course/14_inspect_and_edit.md, section 3):
    states   -> h, (N, 77, d): the text encoder's hidden states of N chunks of a prompt
    weights  -> w, (N, 77): 1.3 for (word:1.3), 1.1 for (word), 1 / 1.1 for [word], 1 elsewhere
"""

import torch

from minidiff.course.milestones.core import Tolerance, call_candidate, compare, fixed_randn, milestone, signature
from minidiff.prompts import apply_token_weights as library_weights

WEIGHTS = "reread lesson 14 (course/14_inspect_and_edit.md, section 3: weighting words)"


def weighted_states(states, weights, rescale=True, over="chunk", inverted=False):
    """h w scaled to mean(h) / mean(h w) per chunk; the options are known mistakes."""
    weighted = states * weights[..., None]
    if not rescale:
        return weighted
    dims = {"chunk": (-2, -1), "batch": (0, 1, 2), "token": (-1,)}[over]
    before, after = states.mean(dim=dims, keepdim=True), weighted.mean(dim=dims, keepdim=True)
    return weighted * (after / before if inverted else before / after)


def weighting_mistakes(states, weights):
    return [
        (f"the weighted states are not scaled back: multiply the chunk by mean(h) / mean(w h) so that the weights "
         f"move the words against each other, not the whole prompt's size; {WEIGHTS}",
         lambda: weighted_states(states, weights, rescale=False)),
        (f"the mean is per chunk (over its positions and channels), not over the whole batch: a prompt's "
         f"embedding must not depend on the other prompts beside it; {WEIGHTS}",
         lambda: weighted_states(states, weights, over="batch")),
        (f"the mean is over the whole chunk (positions and channels), not per token: scaled per token, every "
         f"weight cancels out; {WEIGHTS}", lambda: weighted_states(states, weights, over="token")),
        (f"the scale is inverted: mean(h) / mean(w h) brings the mean back, mean(w h) / mean(h) moves it twice "
         f"as far; {WEIGHTS}", lambda: weighted_states(states, weights, inverted=True)),
    ]


@milestone("prompt weights: each position times its weight, each chunk back to its mean (A1111)", lesson=14)
def check_apply_token_weights(candidate=None):
    """apply_token_weights(states, weights) -> (N, 77, d) weighted states

    Three chunks of seeded states (3, 77, 16) with means 0.5, -0.4 and 0.8, weights 1 except a few tokens at 1.3,
    1.21, 0.8 and 1 / 1.1; compared with minidiff.prompts.apply_token_weights, the pipeline's own.
    """
    tol = Tolerance(1e-5, 1e-5)
    states = fixed_randn(3, 77, 16, seed=140) + torch.tensor([0.5, -0.4, 0.8]).view(3, 1, 1)
    weights = torch.ones(3, 77)
    weights[0, 2], weights[0, 5:8], weights[1, 3], weights[2, 1:4] = 1.3, 1.21, 0.8, 1 / 1.1
    yours = call_candidate(candidate or library_weights, signature(check_apply_token_weights), states.clone(),
                           weights.clone())
    compare(yours, library_weights(states, weights), tol, "3 chunks", weighting_mistakes(states, weights))
    return f"3 chunks, weights 0.8 to 1.3, within {tol.atol:g} (fp32)"
