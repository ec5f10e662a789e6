"""Milestones of lesson 14: cross-attention maps aggregated as DAAM does, and a step callback that cuts guidance.

The references are the library's: minidiff.attention_maps.token_maps and minidiff.steering.guidance_cutoff.
Notation as minidiff/course/solutions/lesson_14.py.
"""

import torch
import torch.nn.functional as F

from minidiff.course.milestones.core import Tolerance, call_candidate, compare, fixed_randn, milestone, signature

MAPS = "reread lesson 14 (course/14_inspect_and_edit.md, section 1: cross-attention maps)"
CUTOFF = "reread lesson 14 (course/14_inspect_and_edit.md, section 2: a writable step callback)"


def _aggregate_variant(layer_probs, height, width, normalise="token", transposed=False, mode="bilinear"):
    """The aggregation with a known mistake: normalise "none" / "global", the (h, w) map read as (w, h), nearest."""
    total = 0
    for probs in layer_probs:
        batch, _, positions, tokens = probs.shape
        factor = round((height * width / positions) ** 0.5)
        h, w = height // factor, width // factor
        maps = probs.sum(dim=1).transpose(1, 2)
        maps = maps.reshape(batch, tokens, w, h).transpose(-2, -1) if transposed else maps.reshape(batch, tokens, h, w)
        options = {"align_corners": False} if mode == "bilinear" else {}
        total = total + F.interpolate(maps, size=(height, width), mode=mode, **options)
    if normalise == "none":
        return total
    dims = (-3, -2, -1) if normalise == "global" else (-2, -1)
    return total / total.amax(dim=dims, keepdim=True)


def _layer_probs():
    """Three layers of a (8, 12) latent, as the UNet's stages see it: 8 x 12, 4 x 6 (twice), 2 and 4 heads, 5 tokens."""
    shapes = [(2, 2, 96, 5), (2, 4, 24, 5), (2, 4, 24, 5)]
    return [fixed_randn(*shape, seed=140 + i).mul(3).softmax(dim=-1) for i, shape in enumerate(shapes)]


@milestone("cross-attention maps: DAAM's aggregation over heads, layers and steps (Tang et al. 2023)", lesson=14)
def check_aggregate_attention(candidate=None):
    """aggregate_attention(layer_probs, height, width) -> (B, L, height, width), each token's map with maximum 1

    Three layers of a non-square 8 x 12 latent (one at 8 x 12, two at 4 x 6), 2 pictures, 5 tokens; the reference is
    minidiff.attention_maps.token_maps.
    """
    from minidiff.attention_maps import token_maps

    probs = _layer_probs()
    mistakes = [
        (f"each token's map is divided by its own maximum (normalised per token); {MAPS}",
         lambda: _aggregate_variant(probs, 8, 12, normalise="none")),
        (f"normalise per token, not by the largest value over all the tokens; {MAPS}",
         lambda: _aggregate_variant(probs, 8, 12, normalise="global")),
        (f"the h * w positions are row-major: reshape them to (h, w), not (w, h); {MAPS}",
         lambda: _aggregate_variant(probs, 8, 12, transposed=True)),
        (f"upsample bilinearly (align_corners=False), not to the nearest cell; {MAPS}",
         lambda: _aggregate_variant(probs, 8, 12, mode="nearest")),
    ]
    yours = call_candidate(candidate or token_maps, signature(check_aggregate_attention),
                           [p.clone() for p in probs], 8, 12)
    tol = Tolerance(1e-5, 1e-5)
    compare(yours, token_maps(probs, 8, 12), tol, "maps", mistakes)
    return f"3 layers (8 x 12 and 4 x 6), 2 pictures, 5 tokens within {tol.atol:g} (fp32)"


def _guidance_in_effect(callback, steps: int, guidance_scale: float = 7.5) -> torch.Tensor:
    """The guidance each of `steps` steps runs with when the callback may change it at the end of every step."""
    used, x = [], torch.zeros(1, 4, 2, 2)
    for step in range(steps):
        used.append(guidance_scale)
        returned = callback(step=step, timestep=999 - 50 * step, sigma=1.0, x=x, pred_x0=x,
                            guidance_scale=guidance_scale)
        if isinstance(returned, dict) and "guidance_scale" in returned:
            guidance_scale = float(returned["guidance_scale"])
    return torch.tensor([w if w > 1 else 0.0 for w in used])  # w <= 1 is guidance off, whatever its value


def _cutoff_at(cutoff_of):
    def make(steps, ratio):
        cutoff = cutoff_of(steps, ratio)
        return lambda step, guidance_scale, **info: {"guidance_scale": 0.0} if step == cutoff else None
    return make


@milestone("a writable step callback: guidance off after a fraction of the steps (SDCFGCutoffCallback)", lesson=14)
def check_guidance_cutoff_callback(candidate=None):
    """guidance_cutoff_callback(steps, ratio) -> callback(step, timestep, sigma, x, pred_x0, guidance_scale)

    Runs of 10, 7 and 20 steps at ratios 0.4, 0.4 and 0.55 with w = 7.5: the guidance in effect at each step (w > 1
    on, else off) against minidiff.steering.guidance_cutoff's.
    """
    from minidiff.steering import guidance_cutoff

    make = candidate or guidance_cutoff
    for steps, ratio in ((10, 0.4), (7, 0.4), (20, 0.55)):
        mistakes = [
            (f"the cutoff step is int(steps * ratio), rounded down, not round(); {CUTOFF}",
             lambda steps=steps, ratio=ratio: _guidance_in_effect(_cutoff_at(lambda n, r: round(n * r))(steps, ratio),
                                                                  steps)),
            (f"guidance goes off one step late: return the new guidance AT step int(steps * ratio), counted from 0, "
             f"and it holds from the next step; {CUTOFF}",
             lambda steps=steps, ratio=ratio: _guidance_in_effect(
                 _cutoff_at(lambda n, r: int(n * r) + 1)(steps, ratio), steps)),
            (f"guidance goes off one step early: the step int(steps * ratio) itself still runs guided; {CUTOFF}",
             lambda steps=steps, ratio=ratio: _guidance_in_effect(
                 _cutoff_at(lambda n, r: int(n * r) - 1)(steps, ratio), steps)),
        ]
        callback = call_candidate(make, signature(check_guidance_cutoff_callback), steps, ratio)
        yours = call_candidate(_guidance_in_effect, signature(check_guidance_cutoff_callback), callback, steps)
        compare(yours, _guidance_in_effect(guidance_cutoff(steps, ratio), steps), Tolerance(0.0),
                f"{steps} steps, ratio {ratio}: guidance per step", mistakes)
    return "the guidance of every step of 10, 7 and 20-step runs, exactly"
