import importlib
import subprocess
import sys

import pytest
import torch

import minidiff
from minidiff.attention import attention, blockwise_attention, naive_attention

attention_module = importlib.import_module("minidiff.attention")


def test_import_is_light():
    """`import minidiff` must not pull in torch or any oracle library."""
    code = "import sys, minidiff; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("slice_size", [None, 5])
def test_sdpa_matches_naive_attention(slice_size):
    q, k, v = (torch.randn(2, 17, 4 * 8) for _ in range(3))
    heads = 4
    out = attention(q, k, v, heads, slice_size=slice_size)
    qh, kh, vh = (t.view(2, 17, heads, 8).transpose(1, 2) for t in (q, k, v))
    ref = naive_attention(qh, kh, vh).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_causal_mask_sdpa_matches_naive():
    q, k, v = (torch.randn(1, 6, 16) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    out = attention(q, k, v, 2, mask=mask)
    minidiff.set_attention_backend("naive")
    try:
        ref = attention(q, k, v, 2, mask=mask, slice_size=4)
    finally:
        minidiff.set_attention_backend("sdpa")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unknown_attention_backend_is_named():
    with pytest.raises(minidiff.MinidiffError, match="sdpa"):
        minidiff.set_attention_backend("flash3")


def test_every_public_name_is_the_object_its_module_defines():
    """minidiff.NAME is the very object of the module _PUBLIC names (getattr alone would pass any value)."""
    for name in minidiff.__all__:
        module = importlib.import_module(minidiff._PUBLIC[name])
        assert getattr(minidiff, name) is getattr(module, name), name
        defined_in = getattr(getattr(module, name), "__module__", module.__name__)
        assert defined_in == module.__name__, f"{name} is defined in {defined_in}, not {module.__name__}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attention_on_a_cpu_is_computed_in_float32(dtype, monkeypatch):
    """float16 always, bfloat16 on a CPU without bf16 instructions."""
    monkeypatch.setattr(attention_module, "CPU_BF16_MATMUL", False)
    q, k, v = (torch.randn(2, 33, 4 * 8).to(dtype) for _ in range(3))
    out = attention(q, k, v, 4)
    assert out.dtype == dtype
    # float32 attention of the same half-precision numbers, rounded once at the end
    assert torch.equal(out, attention(q.float(), k.float(), v.float(), 4).to(dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_on_a_cpu_with_bf16_instructions_in_blocks(causal, monkeypatch):
    """The bf16 path (written-out formula, blocks of queries) agrees with float32 attention to bf16's precision."""
    monkeypatch.setattr(attention_module, "CPU_BF16_MATMUL", True)
    monkeypatch.setattr(attention_module, "CPU_SCORES_PER_BLOCK", 2 * 4 * 33 * 5)  # 5 queries a block: 7 blocks
    q, k, v = (torch.randn(2, 33, 4 * 8).bfloat16() for _ in range(3))
    mask = torch.ones(33, 33, dtype=torch.bool).tril() if causal else None
    out = attention(q, k, v, 4, mask=mask)
    assert out.dtype == torch.bfloat16
    ref = attention(q.float(), k.float(), v.float(), 4, mask=mask)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "one row"])
def test_blockwise_attention_is_naive_attention(mask_kind):
    """Blocks of 5 of 33 queries (the last one short), each in the same score buffers: float32, to 1e-6."""
    q, k, v = (torch.randn(2, 4, 33, 8) for _ in range(3))
    mask = {None: None, "bool": torch.ones(33, 33, dtype=torch.bool).tril(), "additive": torch.randn(2, 1, 33, 33),
            "one row": torch.randn(2, 1, 1, 33)}[mask_kind]
    torch.testing.assert_close(blockwise_attention(q, k, v, mask, block=5), naive_attention(q, k, v, mask),
                               rtol=1e-6, atol=1e-6)
