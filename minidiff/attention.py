"""The one attention function used by the UNet, the VAE and the text encoder.

Notation (Vaswani et al. 2017, "Attention Is All You Need"):
    q, k, v   -> Q, K, V projected to (B, L, heads * d)
    d         -> head dimension d_k; the scores are softmax(Q K^T / sqrt(d)) V

`attention` splits the heads and hands (B, heads, L, d) tensors to a kernel, a function (q, k, v, mask) that
computes softmax(Q K^T / sqrt(d) + mask) V. Three kernels give the same numbers (lesson 05):
    SDPA              PyTorch's scaled_dot_product_attention, the default: fused (flash / memory-efficient)
                      kernels that never store the (L_q, L_k) scores
    naive_attention   the formula written out, for lessons and as the test oracle: stores the scores
    sliced_attention  a kernel on `slice_size` queries at a time: the scores of only that many queries at once
Each attention module of the models keeps its kernel in `.kernel` (None: SDPA); minidiff.speed.set_attention
chooses another one per model, and minidiff.speed puts its CPU kernel there when a model is loaded on a CPU.
"""

import math

import torch
import torch.nn.functional as F


def apply_mask_(scores, mask):
    """The scores with a bool (True = attend) or additive float mask applied, in place."""
    if mask is None:
        return scores
    return scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)


def naive_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d) + mask) V on (B, heads, L, d) tensors, written out."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # scaling q is cheaper than scaling the scores
    return apply_mask_(scores, mask).softmax(dim=-1) @ v


def mask_rows(mask, rows: slice):
    """The part of a (..., L_q or 1, L_k) mask for the queries `rows`."""
    return mask if mask is None or mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., rows, :]


def sliced_attention(q, k, v, mask=None, *, slice_size: int, kernel=None):
    """`kernel` (default SDPA) on (B, heads, L, d) tensors, `slice_size` queries at a time, the slices concatenated."""
    kernel = kernel or F.scaled_dot_product_attention
    rows = [slice(start, start + slice_size) for start in range(0, q.shape[2], slice_size)]
    return torch.cat([kernel(q[:, :, r], k, v, mask_rows(mask, r)) for r in rows], dim=2)


def attention(q, k, v, heads: int, mask=None, slice_size: int | None = None, kernel=None):
    """Multi-head attention on (B, L, heads * d) inputs; returns (B, L_q, heads * d).

    mask: broadcastable to (B, heads, L_q, L_k); bool (True = attend) or additive float.
    slice_size: compute at most this many queries at a time (low-memory mode).
    kernel: the function (q, k, v, mask) on (B, heads, L, d) tensors; None: SDPA.
    """
    batch, length_q, inner = q.shape
    head_dim = inner // heads
    # (B, L, heads * d) -> (B, heads, L, d)
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    kernel = kernel or F.scaled_dot_product_attention
    if slice_size is None or slice_size >= length_q:
        out = kernel(q, k, v, mask)
    else:
        out = sliced_attention(q, k, v, mask, slice_size=slice_size, kernel=kernel)
    # (B, heads, L, d) -> (B, L, heads * d)
    return out.transpose(1, 2).reshape(batch, length_q, inner)
