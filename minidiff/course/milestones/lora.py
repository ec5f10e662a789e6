"""Milestones of lesson 12: a linear layer with a LoRA beside it, and the LoRA merged into its weight.

The reference is minidiff.lora (LoRA and LoRALayer, proved against diffusers + PEFT in tests/parity/test_lora.py);
the candidate gets the same tensors. alpha (2) differs from the rank (4) and the scale is 0.8, so that each known
mistake (alpha / r missing, B A in the wrong order, the scale twice, r read from the wrong dimension) gives
numbers of its own. See core.py for the machinery.

Notation (Hu et al. 2021): W (d_out, d_in), A = down (r, d_in), B = up (d_out, r), s = scale.
"""

import torch
from torch import nn

from minidiff.course.milestones.core import Tolerance, call_candidate, compare, fixed_randn, milestone, signature
from minidiff.lora import LoRA, LoRALayer

TOL = Tolerance(1e-5, 1e-5)
SECTION = "reread lesson 12 (course/12_lora.md, LoRA: a low-rank update of many weights)"
ALPHA, SCALE, RANK = 2.0, 0.8, 4
SHAPES = ((320, 320), (768, 320))  # (d_in, d_out): a square to_q, and a to_k reading the text


def _layer(d_in: int, d_out: int, seed: int):
    """A seeded nn.Linear with a LoRA of rank 4 beside it, and the tensors (W, b, A, B)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out)
    down, up = 0.1 * fixed_randn(RANK, d_in, seed=seed + 1), 0.1 * fixed_randn(d_out, RANK, seed=seed + 2)
    layer = LoRALayer(base)
    layer.loras["exercise"], layer.scales["exercise"] = LoRA(base, down, up, ALPHA), SCALE
    return layer, (base.weight.detach(), base.bias.detach(), down, up)


def _update(down, up, alpha=ALPHA, scale=SCALE, rank=None, order="BA"):
    """s (alpha / r) B A, or one of its known mistakes."""
    rank = rank or down.shape[0]
    product = {"BA": lambda: up @ down, "AB^T": lambda: (up @ down).T}[order]()
    return scale * (alpha / rank) * product


def _mistakes(down, up, apply):
    """(hint, what apply(delta W) gives) for each known mistake in the update s (alpha / r) B A."""
    return [
        (f"alpha / r is missing: the update is s (alpha / r) B A; {SECTION}", lambda: apply(SCALE * up @ down)),
        (f"the scale is applied twice: s (alpha / r) B A, with s once; {SECTION}",
         lambda: apply(_update(down, up, scale=SCALE**2))),
        (f"r is the rank, down's first dimension (A is r x d_in), not d_in or d_out; {SECTION}",
         lambda: apply(_update(down, up, rank=up.shape[0]))),
        (f"r is the rank, down's first dimension (A is r x d_in), not d_in or d_out; {SECTION}",
         lambda: apply(_update(down, up, rank=down.shape[1]))),
        (f"B A is in the wrong order or transposed: delta W = B A is (d_out, d_in) like W, and the forward applies "
         f"it as x A^T B^T; {SECTION}", lambda: apply(_update(down, up, order="AB^T"))),
        (f"alpha / r is upside down: the update is s (alpha / r) B A; {SECTION}",
         lambda: apply(_update(down, up, alpha=RANK, rank=ALPHA))),
    ]


@milestone("LoRA forward: x W^T + b + s (alpha / r) (x A^T) B^T (Hu et al. 2021)", lesson=12)
def check_lora_forward(candidate=None):
    """lora_forward(x, weight, bias, down, up, alpha, scale) -> (N, d_out); x (N, d_in), down (r, d_in), up (d_out, r)

    A 320 -> 320 and a 768 -> 320 layer with a rank-4 LoRA (alpha 2, scale 0.8), against minidiff.lora.LoRALayer.
    """
    largest = 0.0
    for i, (d_in, d_out) in enumerate(SHAPES):
        layer, (weight, bias, down, up) = _layer(d_in, d_out, seed=90 + 10 * i)
        x = fixed_randn(8, d_in, seed=93 + 10 * i)
        run = candidate or (lambda x, weight, bias, down, up, alpha, scale, layer=layer: layer(x))
        with torch.no_grad():
            expected = layer(x)
            yours = call_candidate(run, signature(check_lora_forward), x.clone(), weight.clone(), bias.clone(),
                                   down.clone(), up.clone(), ALPHA, SCALE)
            mistakes = _mistakes(down, up, lambda delta, x=x, w=weight, b=bias: x @ (w + delta).T + b)
            largest = max(largest, compare(yours, expected, TOL, f"{d_in} -> {d_out}", mistakes))
    return f"320 -> 320 and 768 -> 320, rank 4, largest |diff| {largest:.1e} <= {TOL.atol:g} (fp32)"


@milestone("LoRA merged into the weight: W' = W + s (alpha / r) B A", lesson=12)
def check_lora_merge(candidate=None):
    """lora_merge(weight, down, up, alpha, scale) -> W' (d_out, d_in); down (r, d_in), up (d_out, r)

    The layers of lora_forward: W' must equal the weight minidiff's LoRALayer.fuse() writes.
    """
    largest = 0.0
    for i, (d_in, d_out) in enumerate(SHAPES):
        layer, (weight, bias, down, up) = _layer(d_in, d_out, seed=90 + 10 * i)
        weight = weight.clone()
        layer.fuse()
        expected = layer.base.weight.detach().clone()
        run = candidate or (lambda weight, down, up, alpha, scale, merged=expected: merged)
        with torch.no_grad():
            yours = call_candidate(run, signature(check_lora_merge), weight.clone(), down.clone(), up.clone(), ALPHA,
                                   SCALE)
            mistakes = _mistakes(down, up, lambda delta, w=weight: w + delta)
            largest = max(largest, compare(yours, expected, TOL, f"{d_in} -> {d_out}", mistakes))
    return f"320 -> 320 and 768 -> 320, rank 4, largest |diff| {largest:.1e} <= {TOL.atol:g} (fp32)"
