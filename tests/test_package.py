import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff.attention import attention, naive_attention, sliced_attention


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
    ref = attention(q, k, v, 2, mask=mask, slice_size=4, kernel=naive_attention)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "one row"])
def test_sliced_attention_is_the_kernel_on_all_queries(mask_kind):
    """Slices of 5 of 33 queries (the last one short), with every kind of mask: float32, to 1e-6."""
    q, k, v = (torch.randn(2, 4, 33, 8) for _ in range(3))
    mask = {None: None, "bool": torch.ones(33, 33, dtype=torch.bool).tril(), "additive": torch.randn(2, 1, 33, 33),
            "one row": torch.randn(2, 1, 1, 33)}[mask_kind]
    for kernel in (torch.nn.functional.scaled_dot_product_attention, naive_attention):
        whole = kernel(q, k, v, mask)
        torch.testing.assert_close(sliced_attention(q, k, v, mask, slice_size=5, kernel=kernel), whole,
                                   rtol=1e-6, atol=1e-6)


def test_every_public_name_is_the_object_its_module_defines():
    """minidiff.NAME is the very object of the module _PUBLIC names (getattr alone would pass any value)."""
    for name in minidiff.__all__:
        module = importlib.import_module(minidiff._PUBLIC[name])
        assert getattr(minidiff, name) is getattr(module, name), name
        defined_in = getattr(getattr(module, name), "__module__", module.__name__)
        assert defined_in == module.__name__, f"{name} is defined in {defined_in}, not {module.__name__}"


def test_the_library_never_imports_a_reference_library():
    """minidiff/ imports no oracle or peer engine, not even inside a function: tests/ and benchmarks/ do."""
    forbidden = {"diffusers", "transformers", "peft", "openvino"}
    found = []
    for path in Path(minidiff.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "__import__", "import_module", "find_spec") and node.args:
                names = [getattr(node.args[0], "value", "")]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {name}" for name in names
                      if isinstance(name, str) and name.split(".")[0] in forbidden]
    assert not found, found
