"""The one attention function used by the UNet, the VAE and the text encoder.

Notation (Vaswani et al. 2017, "Attention Is All You Need"):
    q, k, v   -> Q, K, V projected to (B, L, heads * d)
    d         -> head dimension d_k; the scores are softmax(Q K^T / sqrt(d)) V

`attention` runs PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels where
the device has them). `naive_attention` is the textbook formula, kept for lessons and for the test
that the two agree. `slice_size` computes the queries in chunks to bound peak memory.

On a CPU, PyTorch's flash kernel is no faster in half precision than in float32 (2-core AVX-512 CPU,
(2, 8, 4096, 40): bf16 319 ms, float32 311 ms). So there:
- bfloat16, on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX), is attended with the written-out
  formula, a block of queries at a time, its matmuls in bf16 (the softmax accumulates in float32): 161 ms for
  the shape above, 49 ms instead of 184 for the VAE's (1, 1, 4096, 512). The scores are rounded to bf16 before
  the softmax, as in any bf16 matmul; the blocks keep them under CPU_SCORES_PER_BLOCK at a time.
- float16 (which such CPUs do not multiply natively: the bf16-style path takes 7 s) and bfloat16 elsewhere
  are attended in float32 and the result cast back.
"""

import math

import torch
import torch.nn.functional as F

# Most query-key scores the CPU bf16 path holds at once (64 MiB of bf16): 512 queries of SD 1.5 at 512 px.
CPU_SCORES_PER_BLOCK = 2**25


def _cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which make bf16 matmuls fast."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # x86 only; elsewhere the float32 path
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


CPU_BF16_MATMUL = _cpu_multiplies_bf16()

# "sdpa" (default) or "naive"; set through set_attention_backend for lessons and comparisons.
_BACKEND = {"name": "sdpa", "slice_size": None}


def set_attention_backend(name: str = "sdpa", slice_size: int | None = None) -> None:
    """Choose how every minidiff model computes attention: "sdpa" or "naive", optionally sliced."""
    from minidiff.errors import MinidiffError

    if name not in ("sdpa", "naive"):
        raise MinidiffError(f"unknown attention backend {name!r}: use 'sdpa' or 'naive'")
    if slice_size is not None and slice_size < 1:
        raise MinidiffError(f"slice_size must be a positive number of queries, got {slice_size}")
    _BACKEND.update(name=name, slice_size=slice_size)


def naive_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d) + mask) V on (B, heads, L, d) tensors, written out."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # scaling q is cheaper than scaling the scores
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1) @ v


def attention(q, k, v, heads: int, mask=None, slice_size: int | None = None):
    """Multi-head attention on (B, L, heads * d) inputs; returns (B, L_q, heads * d).

    mask: broadcastable to (B, heads, L_q, L_k); bool (True = attend) or additive float.
    slice_size: compute at most this many queries at a time (low-memory mode).
    """
    batch, length_q, inner = q.shape
    head_dim = inner // heads
    # (B, L, heads * d) -> (B, heads, L, d)
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    kernel = naive_attention if _BACKEND["name"] == "naive" else F.scaled_dot_product_attention
    slice_size = slice_size or _BACKEND["slice_size"]
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16 and CPU_BF16_MATMUL:
        kernel = naive_attention
        slice_size = slice_size or max(1, CPU_SCORES_PER_BLOCK // (batch * heads * k.shape[2]))
    elif q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    if slice_size is None or slice_size >= length_q:
        out = kernel(q, k, v, mask)
    else:
        chunks = []
        for start in range(0, length_q, slice_size):
            chunk_mask = mask
            if mask is not None and mask.shape[-2] != 1:
                chunk_mask = mask[..., start : start + slice_size, :]
            chunks.append(kernel(q[:, :, start : start + slice_size], k, v, chunk_mask))
        out = torch.cat(chunks, dim=2)
    # (B, heads, L, d) -> (B, L, heads * d)
    return out.transpose(1, 2).reshape(batch, length_q, inner).to(dtype)
