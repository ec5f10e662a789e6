"""Attention kernels beside PyTorch's SDPA: the same softmax(Q K^T / sqrt(d) + mask) V, computed faster on a CPU.

Each is a function (q, k, v, mask) on (B, heads, L, d) tensors, as minidiff.attention.attention calls it; an
attention module uses the one in its `.kernel` (minidiff.speed.set_attention puts it there, per model).

On a CPU without AMX, PyTorch's flash kernel is no faster in half precision than in float32 (2-core AVX-512
AMD EPYC, (2, 8, 4096, 40): bf16 319 ms, float32 311 ms); with AMX its bf16 products run on the tile unit and it
is twice as fast as anything written out here (2-core Intel Xeon with AMX, torch 2.13, bf16: SDPA 80 ms, the
blockwise path below 148, SDPA in float32 175; the VAE's (1, 1, 4096, 512): 16 vs 30 ms). So `cpu_attention`,
the CPU default:
- bfloat16 on a CPU with AMX: SDPA in bf16 (PyTorch's flash kernel; it accumulates in float32).
- bfloat16 on a CPU that multiplies bf16 with AVX512-BF16 but has no AMX: the written-out formula, a block of
  heads and queries at a time (`blockwise_attention`), its matmuls in bf16 (the softmax accumulates in float32;
  compiled, in base 2, `base2_block`): eager 176 ms for the shape above (158 with reuse_memory), 50 ms instead of
  184 for the VAE's (1, 1, 4096, 512). The scores are rounded to bf16 before the softmax, as in any bf16 matmul;
  each block holds at most CPU_SCORES_PER_BLOCK of them.
- float16 (which such CPUs do not multiply natively: the blockwise path takes 7 s), and bfloat16 elsewhere:
  SDPA in float32, the result cast back (float16 SDPA, (2, 8, 4096, 40): 1.9 s, in float32 0.5 s).
- float32: SDPA.
"""

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from minidiff.attention import apply_mask_, naive_attention, sliced_attention
from minidiff.errors import MinidiffError

# Most query-key scores the CPU bf16 path holds at once (8 MiB of bf16): SD 1.5 at 512 px, 512 queries of 2 heads
# (`tiles`). Blocks of every head were slower: (2, 8, 4096, 40) compiled, 128 queries of the 16 heads (16 MiB)
# 229 ms, 2 heads x 512 queries 206 (4 x 256 208, 1 x 512 232, 2 x 1024 and 4 x 512 (16 MiB) 238 and 224);
# (2, 8, 1024, 40) 15.5 -> 14.1 with 4 heads x 1024 (2-core AMD EPYC, medians of 7 in turns). The frozen +int8
# UNet at 512 px, CFG batch 2: 3612 -> 3461 ms (both in one process, 8 calls each in turns); processes alternating,
# medians of 5: 3258 -> 3230 and 3200 -> 3137
CPU_SCORES_PER_BLOCK = 2**22
# The probabilities-times-values matmul with a head width that is not a multiple of 16 (AVX-512's float lanes) is
# slower than with more columns: SD 1.5's 40 -> 48 (zero columns), bf16, 16 heads x (128, 4096) @ (4096, d),
# summed over the 32 blocks of one 512 px self-attention: 86.6 ms at 40, 66.6 at 48, 86.8 at 64; the whole
# blockwise attention (2, 8, 4096, 40) 276 -> 249 ms, compiled 282 -> 258 (2-core AMD EPYC, medians in turns);
# the frozen +int8 UNet at 512 px, CFG batch 2, processes alternating: 4146 -> 3605 and 3965 -> 3512 ms
VALUE_COLUMNS = 16
LOG2E = math.log2(math.e)  # exp(x) = exp2(x log2(e))


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which make bf16 matmuls fast."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # x86 only; elsewhere the float32 path
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), on which PyTorch's flash kernel runs bf16."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


CPU_BF16_MATMUL = cpu_multiplies_bf16()
CPU_AMX = cpu_has_amx()


def blockwise_attention(q, k, v, mask=None, block: int | None = None):
    """naive_attention on (B, heads, L, d) tensors, a block of (batch entries, heads, queries) at a time.

    block: `block` queries of every head a block (a slice size); default about CPU_SCORES_PER_BLOCK scores a block,
    `tiles`' blocks. The values get zero columns up to a multiple of VALUE_COLUMNS (the output's extra columns are
    zeros, dropped at the end). Eager, every block's scores go in one buffer: fresh score tensors for every block
    would be fresh pages from the kernel for every block (glibc returns large freed blocks at once), which costs
    more than the arithmetic. Compiled, each block is `base2_block` (Inductor plans the buffers itself).
    """
    width = v.shape[-1]
    blocks = tiles(*q.shape[:3], k.shape[2], q.shape[-1], block)
    compiled = torch.compiler.is_compiling()
    # contiguous once, not once a block: the (B, heads, L, d) views of (B, L, heads * d) tensors are strided
    q = (q / (math.sqrt(q.shape[-1]) / (LOG2E if compiled else 1.0))).contiguous()  # eager: as naive_attention
    keys = k.contiguous().transpose(-2, -1)
    v = F.pad(v, (0, -width % VALUE_COLUMNS)).contiguous()
    mask = None if mask is None else mask.view(*[1] * (4 - mask.dim()), *mask.shape)  # (B or 1, heads or 1, ...)
    if compiled:  # the blocks concatenated: written into a slice of `out` each would copy all of it (Inductor's
        # slice_scatter) once a block
        mask = mask * LOG2E if mask is not None and mask.is_floating_point() else mask
        outs = [base2_block(q[index] @ keys[index[:2]], mask_block(mask, index), v[index[:2]]) for index in blocks]
        return concatenated(outs, blocks)[..., :width]
    batch, heads, rows = (part.stop - part.start for part in blocks[0])  # the first block is the largest
    scores = q.new_empty(batch, heads, rows, k.shape[2])
    probs = torch.empty_like(scores)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for index in blocks:
        shape = tuple(slice(0, part.stop - part.start) for part in index)  # a short last block: part of the buffers
        block_scores, block_probs = scores[shape], probs[shape]
        torch.matmul(q[index], keys[index[:2]], out=block_scores)
        torch.softmax(apply_mask_(block_scores, mask_block(mask, index)), dim=-1, out=block_probs)
        out[index] = block_probs @ v[index[:2]]
    return out[..., :width]


def tiles(batch: int, heads: int, length_q: int, length_k: int, width: int, rows: int | None = None) -> list[tuple]:
    """blockwise_attention's blocks: (batch, heads, queries) slices, each block's scores a slice of the
    (batch, heads, length_q, length_k) scores, together all of them; width: the queries' and keys' (d).

    rows: queries a block, every head and batch entry in it. Default: at most CPU_SCORES_PER_BLOCK scores a block
    (times width / 64 for wider heads, whose products outweigh the scores' traffic: the VAE's single head of 512,
    (1, 1, 4096, 512), blocks of 512, 1024, 2048 and 4096 queries 112, 101, 96 and 94 ms), in blocks of equal size
    (a last one shorter), its queries at most half a block's score rows (room for two heads) and as many heads and
    batch entries as that leaves room for.
    """
    if rows is None:
        scores = CPU_SCORES_PER_BLOCK * max(1, width // 64)
        score_rows = max(1, scores // length_k)  # (batch entry, head, query) rows of scores a block
        rows = even(length_q, max(1, score_rows // 2))
        heads_a_block = even(heads, max(1, score_rows // rows))
        entries = even(batch, max(1, score_rows // (rows * heads))) if heads_a_block == heads else 1
    else:
        heads_a_block, entries = heads, batch
    return list(itertools.product(parts(batch, entries), parts(heads, heads_a_block), parts(length_q, rows)))


def parts(total: int, size: int) -> list[slice]:
    """range(total) in slices of `size` (the last one shorter)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def concatenated(outs: list, blocks: list[tuple]):
    """The (B, heads, L, d) tensor of the blocks' outputs, `tiles`' blocks in its order (queries within heads within
    batch entries)."""
    for dim in (2, 1, 0):  # join the blocks of queries, then of heads, then of batch entries
        count = len({index[dim].start for index in blocks})  # blocks along dim (within each of the other dims')
        outs = [torch.cat(outs[i:i + count], dim) if count > 1 else outs[i] for i in range(0, len(outs), count)]
        blocks = blocks[::count]
    return outs[0]


def even(total: int, most: int) -> int:
    """The size of the fewest parts of at most `most` that cover `total`, as equal as they can be."""
    return -(-total // -(-total // most))


def mask_block(mask, index: tuple):
    """The part of a 4-dimensional mask (each of its first three sizes 1 or the whole) for the block `index`."""
    if mask is None:
        return None
    return mask[tuple(part if size > 1 else slice(None) for part, size in zip(index, mask.shape))]


def base2_block(scores, mask, v):
    """softmax(scores + mask) @ v, in v's dtype, for scores (and an additive mask) in base 2, log2(e) times the
    natural ones.

    One pass over the scores computes each exp2 once (for the probabilities, unnormalized, and for their sum), and
    the rows' sums divide the (rows, d) product instead of the (rows, keys) probabilities. Inductor's softmax
    computes exp, which costs more than exp2, and divides every probability: one block of SD 1.5 at 512 px,
    (2, 8, 128, 4096) bf16 scores, summed over the 32 blocks of a self-attention, 101-106 ms -> 76-77 ms (ATen's
    softmax, eager, 87-92; 2-core AMD EPYC, compiled, in turns). In the frozen +int8 UNet at 512 px, CFG batch 2,
    the softmax kernels of a step 540 -> 428 ms (torch.profiler); processes alternating, medians of 5 calls:
    3347 -> 3352 and 3454 -> 3327 ms.
    """
    s = apply_mask_(scores, mask).float()
    e = torch.exp2(s - s.amax(dim=-1, keepdim=True))
    return ((e.to(v.dtype) @ v) * e.sum(dim=-1, keepdim=True).reciprocal()).to(v.dtype)


def cpu_attention(q, k, v, mask=None, slice_size: int | None = None):
    """The CPU default (see the module docstring): bf16 SDPA with AMX, else blockwise bf16 with bf16 instructions;
    half precision otherwise in float32.

    slice_size: queries at a time (the block of blockwise_attention, which it then is with AMX too). Off a CPU:
    SDPA, as it is; when gradients are asked for, the float32 path (blockwise_attention is for inference).
    """
    dtype = q.dtype
    gradients = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # blockwise has no autograd
    if q.device.type == "cpu" and dtype == torch.bfloat16 and CPU_BF16_MATMUL and not gradients:
        if CPU_AMX and slice_size is None:
            return F.scaled_dot_product_attention(q, k, v, mask)
        return blockwise_attention(q, k, v, mask, slice_size)
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    if slice_size is None:
        return F.scaled_dot_product_attention(q, k, v, mask).to(dtype)
    return sliced_attention(q, k, v, mask, slice_size=slice_size).to(dtype)


KERNELS = {"sdpa": None, "naive": naive_attention, "blockwise": blockwise_attention, "cpu": cpu_attention}


def attention_kernel(name: str, slice_size: int | None = None):
    """The kernel called `name` ("sdpa", "naive", "blockwise" or "cpu"), on slice_size queries at a time if given.

    None stands for SDPA (minidiff.attention.attention's default).
    """
    if name not in KERNELS:
        raise MinidiffError(f"unknown attention backend {name!r}: use one of {', '.join(map(repr, KERNELS))}")
    if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
        raise MinidiffError(f"slice_size must be a positive number of queries, got {slice_size!r}")
    if slice_size is None:
        return KERNELS[name]
    if name == "blockwise":
        return functools.partial(blockwise_attention, block=slice_size)
    if name == "cpu":
        return functools.partial(cpu_attention, slice_size=slice_size)
    return functools.partial(sliced_attention, slice_size=slice_size, kernel=KERNELS[name])
