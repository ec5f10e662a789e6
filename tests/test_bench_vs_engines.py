"""benchmarks/vs_engines.py: ONNX Runtime and OpenVINO as the bench's peers, running the ONNX export of minidiff's
UNet on the same weights and inputs, agree with minidiff's fp32 eager output within the tolerance of the dtype they
compute in; without an engine the script names the extra and runs the rest. No timing assertions."""

import numpy as np
import pytest
import torch

import benchmarks.vs_engines as vs_engines
from minidiff.bench import TOLERANCE, bench
from minidiff.measure import summary

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK = ["--config", "tiny", "--size", "64", "--steps", "1", "--repeats", "1", "--rungs", "fp32"]


@pytest.mark.slow  # ~60 s of CPU: torch.onnx.export of the tiny UNet (once for both engines)
def test_the_engines_run_in_turns_and_agree_with_fp32():
    peers = {name: factory for name, (_, factory) in vs_engines.ENGINES.items()}
    header, results = bench("tiny", 64, 1, 1, 1, "cpu", rungs=["fp32", "half"], peers=peers, log=lambda line: None)
    assert "interleaved with onnxruntime " in header and ", openvino " in header  # with their versions
    assert len(vs_engines._exports) == 1  # one export serves both engines and both rungs
    for r in results:
        assert list(r.peers) == ["onnxruntime", "openvino"] and r.passed
        for name, peer in r.peers.items():
            assert peer.own_runtime and peer.ms_per_step > 0 and peer.call_mb is not None
            # measured: onnxruntime 1.7e-5, OpenVINO f32 2.2e-5, OpenVINO bf16 3.2e-2
            assert peer.fp32_dev <= TOLERANCE[DTYPES[peer.dtype]], (r.rung, name, peer)
        assert r.peers["onnxruntime"].dtype == "fp32"  # its CPU provider's only precision here
    fp32, half = results
    assert fp32.peers["openvino"].dtype == "fp32"  # the f32 hint on the fp32 rung
    # on the bf16 rung OpenVINO is asked for bf16, and computes in it where the CPU has bf16 instructions
    assert half.peers["openvino"].dtype in ("bf16", "fp32")
    if half.peers["openvino"].dtype == "bf16":
        assert half.peers["openvino"].fp32_dev > 1e-4  # it did round to bf16
    lines = summary(results).splitlines()
    assert [line.split(" (")[0] for line in lines[1:]] == [
        "  onnxruntime fp32", *dict.fromkeys(f"  openvino {r.peers['openvino'].dtype}" for r in results)]
    assert all("its own runtime" in line for line in lines[1:])


@pytest.fixture
def add_model(tmp_path):
    """A one-node ONNX model (c = a + b): the engines' settings, without minutes of exporting a UNet."""
    onnx = pytest.importorskip("onnx")
    vector = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["a", "b"], ["c"])], "add", [vector("a"),
                                   vector("b")], [vector("c")])
    path = tmp_path / "add.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_uses_torchs_threads_and_does_not_spin(add_model, threads, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    options = vs_engines.OnnxRuntimeUNet(add_model).session.get_session_options()
    assert options.intra_op_num_threads == threads
    # spinning threads would take the cores from minidiff's call timed next
    assert all(options.get_session_config_entry(entry) == "0" for entry in vs_engines.SPINNING_ENTRIES)
    assert set(vs_engines.SPINNING_ENTRIES) == {"session.intra_op.allow_spinning", "session.inter_op.allow_spinning"}


@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_uses_torchs_threads(add_model, threads, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    engine = vs_engines.OpenVinoUNet(add_model, "f32")
    request = engine.request({"a": [4], "b": [4]})
    request.infer({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    compiled = request.get_compiled_model()
    assert compiled.get_property("INFERENCE_NUM_THREADS") == threads
    assert str(compiled.get_property("PERFORMANCE_HINT")) in ("LATENCY", "PerformanceMode.LATENCY")


def test_without_the_engines_it_names_the_extra_and_runs_the_ladder(capsys, monkeypatch):
    monkeypatch.setattr(vs_engines, "available", lambda name: False)
    assert vs_engines.main(QUICK) == 0
    out = capsys.readouterr().out
    assert out.startswith('onnxruntime and openvino not installed (pip install -e ".[engines]" to compare with them)')
    assert "minidiff alone" in out and "onnxruntime ms" not in out
    assert next(line for line in out.splitlines() if line.startswith("fp32 eager")).count("PASS") == 1


def test_one_missing_engine_is_named_and_the_other_runs(monkeypatch):
    monkeypatch.setattr(vs_engines, "available", lambda name: name != "openvino")
    ran = []
    monkeypatch.setattr(vs_engines, "cmd_bench", lambda args, peers: ran.append(list(peers)) or 0)
    assert vs_engines.main(QUICK) == 0
    assert ran == [["onnxruntime"]]


@pytest.mark.parametrize("args, message", [
    ([*QUICK, "--device", "cuda"], "the engines' peers run on the CPU, the bench runs on cuda"),
    (["--config", "sdxl", "--size", "64", "--rungs", "fp32"], "export the UNet alone, without 'text_time'"),
    (["--config", "sd99"], "unknown UNet config 'sd99'"),
])
def test_a_bad_argument_gives_one_line(capsys, args, message):  # checked before the weights are drawn
    assert vs_engines.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vs_engines: error: ") and message in err and "Traceback" not in err

