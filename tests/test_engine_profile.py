"""benchmarks/engine_profile.py: each profiler row lands in the group it belongs to, the groups add up as the
docstring says, and a whole run on the tiny config writes a record with every group filled. No timing assertions."""

import json

import pytest
import torch

import benchmarks.engine_profile as engine_profile
import benchmarks.vs_engines as vs_engines
from benchmarks.vs_engines import available
from minidiff.speed import int8_available, memory, reuse_memory_available


@pytest.mark.parametrize("name, group", [
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::scaled_dot_product_attention", "the rest"),  # an eager call's dispatch: its kernel is a child row
    # Inductor's fused kernels around the attention (the projections' epilogues) are the rest, not attention
    ("graph_0_cpp_fused__scaled_dot_product_flash_attention_for_cpu__to_copy_add_clamp_div_mul_6", "the rest"),
    # the blockwise path's (a CPU without AMX): the batched matmuls, Inductor's softmax and base2_block's kernels
    ("aten::bmm", "attention"),
    ("graph_0_cpp_fused__softmax_view_8", "attention"),
    ("graph_0_cpp_fused__to_copy_amax_exp2_sub_sum_view_12", "attention"),
    ("onednn::qconv_pointwise", "convolutions"),
    ("mkldnn::_convolution_pointwise", "convolutions"),  # conv_in and conv_out, kept in bf16
    ("onednn::qlinear_pointwise", "linear layers"),
    ("aten::addmm", "linear layers"),
    ("graph_0_cpp_fused__to_copy_abs_add_amax_clamp_div_gelu_mul_native_layer_norm_13", "the rest"),
    ("## Call CompiledFxGraph None ##", "the rest"),
])
def test_torch_rows_are_grouped(name, group):
    assert engine_profile.torch_group(name) == group


@pytest.mark.parametrize("node, kind, group", [
    ("node_scaled_dot_product_attention_26", "Subgraph", "attention"),
    ("node_gelu_3", "Subgraph", "the rest"),
    ("node_conv2d_5", "Convolution", "convolutions"),
    ("node_linear_12", "FullyConnected", "linear layers"),
    ("node_group_norm_2", "MVN", "the rest"),
])
def test_openvino_nodes_are_grouped(node, kind, group):
    assert engine_profile.openvino_group(node, kind) == group


def test_the_rest_is_the_total_less_the_named_groups_or_the_sum_of_its_rows():
    rows = [("attention", 5.0), ("convolutions", 2.0), ("the rest", 1.0), ("linear layers", 1.5), ("the rest", 0.5)]
    assert engine_profile.grouped(rows, total_ms=10.0) == {
        "attention": 5.0, "convolutions": 2.0, "linear layers": 1.5, "the rest": 1.5}
    assert engine_profile.grouped(rows)["the rest"] == 1.5  # OpenVINO: its other nodes
    assert engine_profile.grouped(rows, total_ms=9.0)["the rest"] == 0.5


@pytest.mark.parametrize("budget", [2 * 17 * 64, 2**22])  # blocks of 2 heads x 17 queries; one block
def test_the_blockwise_self_attentions_are_counted_from_the_matmuls_shapes(budget, monkeypatch):
    """Three self-attentions of 64 tokens among shorter ones and cross-attentions (7 text tokens), 2 x 4
    (batch entry, head) pairs, through blockwise_attention under torch.profiler: three calls of length 64, and the
    ms are those of the bmm rows of 64 keys."""
    from torch.profiler import ProfilerActivity, profile

    from minidiff.speed import attention_kernels

    monkeypatch.setattr(attention_kernels, "CPU_SCORES_PER_BLOCK", budget)
    q64, q16, text = (torch.randn(2, 4, length, 8) for length in (64, 16, 7))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(3):
            attention_kernels.blockwise_attention(q64, q64, q64)
            attention_kernels.blockwise_attention(q16, q16, q16)
            attention_kernels.blockwise_attention(q64, text, text)
    products = [(e.input_shapes, e.self_cpu_time_total / 1000) for e in profiler.events() if e.name == "aten::bmm"]
    ms, calls, longest = engine_profile.blockwise_self_attention(products, text_tokens=7, pairs=8)
    assert (calls, longest) == (3, 64)
    assert ms == pytest.approx(sum(ms for shapes, ms in products if 64 in shapes[1][1:]))
    assert 0 < ms < sum(ms for shapes, ms in products)


@pytest.mark.parametrize("arguments, message", [
    (["--size", "100"], "--size 100 must be a positive multiple of 64 px"),
    (["--size", "0"], "--size 0 must be a positive multiple"),
    (["--repeats", "0"], "--repeats 0: time at least 1 call"),
    (["--config", "sd16"], "unknown UNet config 'sd16'"),
    (["--config", "sdxl"], "without 'text_time' added conditioning"),
    (["--json", "no/such/folder/profile.json"], "the folder no/such/folder does not exist; create it first"),
])
def test_bad_arguments_are_one_line_before_any_work(arguments, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine_profile, "available", lambda name: True)  # the message, with or without OpenVINO
    monkeypatch.setattr(engine_profile, "measure", lambda *args: pytest.fail("measured despite bad arguments"))
    assert engine_profile.main(["--size", "64", "--config", "tiny", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("engine_profile: error: ") and message in error and error.count("\n") == 1, error
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_without_openvino_it_names_the_extra(capsys, monkeypatch):
    monkeypatch.setattr(engine_profile, "available", lambda name: False)
    assert engine_profile.main([]) == 2
    assert 'pip install -e ".[engines]"' in capsys.readouterr().err


@pytest.mark.slow  # ~2 min of CPU: compiling the int8 UNet, exporting it and compiling it twice in OpenVINO
@pytest.mark.skipif(not available("openvino"), reason="needs the engines extra")
def test_a_run_on_the_tiny_config_writes_every_group(tmp_path, capsys, monkeypatch):
    # its exports in a folder of their own, not left to the other tests (nor named like theirs)
    monkeypatch.setattr(vs_engines, "_exports", {})
    monkeypatch.setattr(vs_engines, "_folder", None)
    path = tmp_path / "profile.json"
    assert engine_profile.main(["--config", "tiny", "--size", "64", "--repeats", "1", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert [file.name for file in tmp_path.iterdir()] == ["profile.json"]  # its temporary file renamed
    for engine in ("minidiff", "openvino"):
        groups = record[engine]["groups_ms"]
        assert list(groups) == list(engine_profile.GROUPS)
        assert all(groups[group] > 0 for group in ("attention", "convolutions", "linear layers")), groups
        assert record[engine]["call_ms"] > 0 and record[engine]["self_attention_calls"] > 0
    minidiff = record["minidiff"]
    assert sum(minidiff["groups_ms"].values()) == pytest.approx(minidiff["profiled_ms"])
    assert minidiff["longest_sequence"] == (64 // 8) ** 2  # the latent's pixels: the top level's self-attention
    assert record["openvino"]["nodes_ms"] == pytest.approx(sum(record["openvino"]["groups_ms"].values()))
    assert "attention" in capsys.readouterr().out


@pytest.mark.skipif(not (reuse_memory_available() and int8_available()),
                    reason="the +int8 rung (x86-64) on glibc's allocator")
def test_minidiff_is_profiled_under_the_rungs_allocator_setting(monkeypatch):
    # the +int8 rung is timed with reuse memory on (minidiff bench, vs_engines); profiled without it, every call
    # paid for fresh pages (its unprofiled call 2.2 s at 512 px in one run, about 1.2 s under the rung's setting)
    seen = []
    monkeypatch.setattr(engine_profile, "measure_rung", lambda *args: seen.append(memory._REUSING["on"]) or {})
    rung = next(rung for rung in engine_profile.ladder("cpu") if rung.key == "int8")
    assert engine_profile.measure(None, 1) == {}
    assert seen == [rung.reuse_memory] == [True]
    assert memory._REUSING["on"] is False  # the process's allocator as it was
