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
  formula, a block of queries at a time (`blockwise_attention`), its matmuls in bf16 (the softmax accumulates in
  float32): 176 ms for the shape above (158 with reuse_memory), 50 ms instead of 184 for the VAE's
  (1, 1, 4096, 512). The scores are rounded to bf16 before the softmax, as in any bf16 matmul; each block holds
  CPU_SCORES_PER_BLOCK of them.
- float16 (which such CPUs do not multiply natively: the bf16-style path takes 7 s) and bfloat16 elsewhere
  are attended in float32 and the result cast back.
"""

import math

import torch
import torch.nn.functional as F

# Most query-key scores the CPU bf16 path holds at once (16 MiB of bf16): 128 queries of SD 1.5 at 512 px.
CPU_SCORES_PER_BLOCK = 2**23


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


def _mask_scores_(scores, mask):
    """The scores with a bool (True = attend) or additive float mask applied, in place."""
    if mask is None:
        return scores
    return scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)


def naive_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d) + mask) V on (B, heads, L, d) tensors, written out."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # scaling q is cheaper than scaling the scores
    return _mask_scores_(scores, mask).softmax(dim=-1) @ v


def _query_rows(mask, rows: slice):
    """The part of a (..., L_q or 1, L_k) mask for the queries `rows`."""
    return mask if mask is None or mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., rows, :]


def blockwise_attention(q, k, v, mask=None, block: int = 128):
    """naive_attention on (B, heads, L, d) tensors, `block` queries at a time, every block's scores in one buffer.

    The buffers matter on a CPU: fresh score tensors for every block would be fresh pages from the kernel for
    every block (glibc returns large freed blocks at once), which costs more than the arithmetic.
    """
    length_q = q.shape[2]
    # contiguous once, not once a block: the (B, heads, L, d) views of (B, L, heads * d) tensors are strided
    q, keys, v = (q / math.sqrt(q.shape[-1])).contiguous(), k.contiguous().transpose(-2, -1), v.contiguous()
    scores = q.new_empty(*q.shape[:2], min(block, length_q), k.shape[2])  # (B, heads, block, L_k)
    probs, out = torch.empty_like(scores), q.new_empty(*q.shape[:3], v.shape[-1])
    for start in range(0, length_q, block):
        rows, count = slice(start, start + block), min(block, length_q - start)
        block_scores, block_probs = scores[:, :, :count], probs[:, :, :count]
        torch.matmul(q[:, :, rows], keys, out=block_scores)
        torch.softmax(_mask_scores_(block_scores, _query_rows(mask, rows)), dim=-1, out=block_probs)
        out[:, :, rows] = block_probs @ v
    return out


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
        block = slice_size or max(1, CPU_SCORES_PER_BLOCK // (batch * heads * k.shape[2]))
        out = blockwise_attention(q, k, v, mask, block)
    else:
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            q, k, v = q.float(), k.float(), v.float()
            mask = mask.float() if mask is not None and mask.is_floating_point() else mask
        if slice_size is None or slice_size >= length_q:
            out = kernel(q, k, v, mask)
        else:
            rows = [slice(start, start + slice_size) for start in range(0, length_q, slice_size)]
            out = torch.cat([kernel(q[:, :, r], k, v, _query_rows(mask, r)) for r in rows], dim=2)
    # (B, heads, L, d) -> (B, L, heads * d)
    return out.transpose(1, 2).reshape(batch, length_q, inner).to(dtype)
