"""`minidiff bench` and `minidiff profile` on the tiny config: every rung runs and is checked against its tolerance,
a peer engine plugs in and is timed in turns on the same weights, the profile writes a trace. No timing assertions:
speed is measured by the benchmark itself, not by tests. The comparison with diffusers (benchmarks/vs_diffusers.py)
is tested in tests/parity/test_bench_vs_diffusers.py."""

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minidiff.bench import (
    TOLERANCE,
    PeerResult,
    Result,
    Rung,
    bench,
    decode,
    distilled_config,
    fast_dtype,
    ladder,
    make_setup,
    run_rung,
    vae_config,
    with_weights,
)
from minidiff.checkpoint import meta_model
from minidiff.cli import main
from minidiff.measure import count_flops, cpu_peak_flops, format_table, summary, write_results
from minidiff.speed import int8_available, reuse_memory_available
from minidiff.unet import Attention, UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

QUICK = ["--config", "tiny", "--size", "64", "--steps", "1", "--repeats", "1", "--compile-backend", "eager"]


@pytest.mark.slow  # ~20 s of CPU, mostly TorchDynamo tracing three UNets and two decoders
def test_the_bench_prints_every_rung_and_passes_on_the_tiny_config(capsys, tmp_path):
    # "eager" compile backend: TorchDynamo traces (the compile path runs) without minutes of Inductor codegen
    status = main(["bench", *QUICK, "--json", str(tmp_path / "r.json"),
                   "--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "RANDOM weights" in out
    assert "minidiff alone" in out and "diffusers ms" not in out  # `minidiff bench` compares with no other engine
    rungs = ladder("cpu")
    expected = ["fp32", "half", "channels_last", "compile", "freeze", "reuse_memory", "taesd", "bk_small", "bk_tiny"]
    if not reuse_memory_available():  # glibc's allocator only
        expected.remove("reuse_memory")
    if int8_available():  # oneDNN's int8 kernels, x86-64
        expected[expected.index("taesd"):expected.index("taesd")] = ["int8", "autotune"]
    if fast_dtype("cpu") != torch.float32:  # a CPU with bf16 instructions: every option in fp32 too
        expected.append("fp32_fast")
    assert [r.key for r in rungs] == expected
    table = out.splitlines()
    for rung in rungs:
        row = next(line for line in table if line.startswith(rung.name))
        assert " PASS " in row and "FAIL" not in row, row
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["rung"] for r in rows] == [r.name for r in rungs]
    for row, rung in zip(rows, rungs):
        assert row["passed"] and row["ms_per_step"] > 0 and row["e2e_s"] > 0 and row["peak_mb"] > 0
        if rung.tolerance is not None:
            assert row["max_dev"] <= rung.tolerance == row["tolerance"]
    assert rows[0]["max_dev"] == 0.0  # fp32 eager against itself
    assert 0 < rows[1]["max_dev"]  # bf16 does change the numbers, within its tolerance
    assert (tmp_path / "r.csv").read_text().startswith("rung,dtype,ms_per_step")


def test_a_rung_outside_its_tolerance_fails():
    setup = make_setup("tiny", 64, 1, 1, 1, "cpu", 0)
    with torch.no_grad():
        reference = UNet(setup.config)
        reference.load_state_dict(setup.state)
        reference_out = reference.eval()(setup.x, 500, setup.context)
    strict = Rung("strict", "strict bf16", torch.bfloat16, tolerance=1e-6)  # bf16 rounding alone is ~1e-2
    result = run_rung(setup, strict, reference_out, {}, {}, log=lambda line: None)
    assert result.max_dev > 1e-6 and not result.passed
    loose = dataclasses.replace(strict, tolerance=TOLERANCE[torch.bfloat16])
    assert run_rung(setup, loose, reference_out, {}, {}, log=lambda line: None).passed


def test_consecutive_rungs_share_a_unet_only_when_it_runs_the_same_way(monkeypatch):
    """The rungs' models are cached from one rung to the next: a rung that changes how the UNet runs (autotune,
    int8, freeze, ...) builds its own; one that changes only the decoder, the tolerance or the process's memory
    setting (reuse memory) reuses it."""
    setup = make_setup("tiny", 64, 1, 1, 1, "cpu", 0)
    built = []
    monkeypatch.setattr("minidiff.bench.unets", lambda setup, rung, peers, options: built.append(rung.key) or (
        lambda x, t, context: torch.zeros_like(x), {}))
    base = Rung("compile", "+compile", compile=True, tolerance=1.0)
    caches = ({}, {})
    for rung in (base, dataclasses.replace(base, key="autotune", autotune=True),
                 dataclasses.replace(base, key="reuse", autotune=True, reuse_memory=True),
                 dataclasses.replace(base, key="taesd", autotune=True, reuse_memory=True, decoder="taesd",
                                     tolerance=2.0),
                 dataclasses.replace(base, key="int8", autotune=True, int8=True)):
        run_rung(setup, rung, torch.zeros_like(setup.x), {}, {"backend": "eager"}, lambda line: None, caches)
    assert built == ["compile", "autotune", "int8"]


def test_peers_run_in_turns_on_the_same_weights_and_get_their_columns(tmp_path):
    """A peer factory plugs in: a torch module runs behind the rung's options like minidiff's UNet, any other callable
    is called as it is. Both peers here are minidiff's UNet on the weights they are handed: the same numbers."""
    built, timesteps = [], []

    def twin(config, state, dtype, device, rung):  # a module: FastUNet puts it behind the rung's options
        assert all(v.dtype == torch.float32 for v in state.values())  # the bench's fp32 weights, unchanged
        built.append(rung.key)
        return with_weights(UNet, config, state, dtype, device)

    def engine(config, state, dtype, device, rung):  # a plain callable, as an engine with its own compiler gives
        unet = with_weights(UNet, config, state, dtype, device)
        if rung.channels_last:
            unet.to(memory_format=torch.channels_last)
        return lambda x, t, context: timesteps.append(t) or unet(x, t, context)

    header, results = bench("tiny", 64, 1, 1, 2, "cpu", rungs=["fp32", "channels_last"],
                            peers={"twin": twin, "engine": engine}, log=lambda line: None)
    assert "interleaved with twin, engine" in header
    assert built == ["fp32", "channels_last"]
    assert timesteps and all(t == 500 and isinstance(t, int) for t in timesteps)
    for r in results:
        assert list(r.peers) == ["twin", "engine"]
        for peer in r.peers.values():
            assert peer.ms_per_step > 0 and peer.ratio == pytest.approx(r.ms_per_step / peer.ms_per_step)
            assert peer.max_dev == 0.0  # the same network, weights and inputs
            assert peer.fp32_dev == r.max_dev and peer.call_mb is not None and peer.call_mb >= 0
        assert [p.own_runtime for p in r.peers.values()] == [False, True]  # a module runs behind the options
        assert [p.dtype for p in r.peers.values()] == [r.dtype] * 2
    header_row = format_table(results).splitlines()[0].split()
    assert header_row[-19:] == ["twin", "ms", "ratio", "vs", "twin", "twin", "dev", "twin", "MB",
                                "engine", "ms", "ratio", "vs", "engine", "engine", "dev", "engine", "MB", "syncs"]
    comparison = summary(results).splitlines()
    assert comparison[1].startswith("  twin with its own options: ")
    # the engine is not behind minidiff's options: it is compared by the dtype it computes in
    dtypes = dict.fromkeys(r.dtype for r in results)  # fp32, then bf16 on a CPU with bf16 instructions
    assert [line.split(" (")[0] for line in comparison[2:]] == [f"  engine {dtype}" for dtype in dtypes]
    assert "its own runtime" in comparison[2] and "minidiff's fastest fp32 rung fp32 eager" in comparison[2]
    write_results(tmp_path / "r.json", results)
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["twin_ms"] == results[0].peers["twin"].ms_per_step and row["engine_max_dev"] == 0.0
    assert row["twin_ratio"] == pytest.approx(row["ms_per_step"] / row["twin_ms"])
    assert row["engine_own_runtime"] and not row["twin_own_runtime"] and row["engine_dtype"] == "fp32"


def test_the_summary_compares_the_fastest_full_network_rungs():
    def row(rung, ms, theirs, distilled=None, minidiff_options=False):
        peers = {} if theirs is None else {"diffusers": PeerResult(theirs, ms / theirs, None)}
        return Result(rung, "fp32", ms, 1000 / ms, 1.0, 1.0, 1.0, None, None, True, None, distilled,
                      minidiff_options, peers)

    results = [row("fp32 eager", 100, 100), row("+channels_last", 95, 70), row("+compile", 90, 80),
               row("+freeze", 50, 45, minidiff_options=True), row("+TAESD (decode)", 49, 46, minidiff_options=True),
               row("BK-SDM tiny", 20, 18, "tiny", True)]  # BK-SDM: another network, not compared
    assert summary(results).splitlines() == [
        "fastest (full network, UNet ms/step): minidiff +TAESD (decode) 49.0",
        "  diffusers with its own options: +channels_last 70.0; ratio 0.70",
        "  diffusers behind minidiff's options too: +freeze 45.0; ratio 1.09"]
    assert summary([row("fp32 eager", 100, None)]) == ""  # no peer: nothing to compare


def test_only_freeze_and_reuse_memory_are_minidiffs_own_options():
    own = {r.key for r in ladder("cpu") if r.minidiff_options} - {"fp32_fast"}  # fp32_fast: every option, below
    own_options = {"freeze", "taesd", "bk_small", "bk_tiny"} | ({"int8", "autotune"} if int8_available() else set())
    assert own == own_options | ({"reuse_memory"} if reuse_memory_available() else set())
    assert not any(r.minidiff_options for r in ladder("cpu") if r.key in ("fp32", "half", "channels_last", "compile"))


def test_on_a_gpu_cuda_graphs_come_before_freeze_as_an_option_diffusers_offers():
    """diffusers offers CUDA graphs itself (torch.compile's "reduce-overhead" mode): its fastest with its own
    options must be able to be the +CUDA graphs rung, so that rung comes before +freeze and carries no freeze."""
    rungs = ladder("cuda")  # the rungs only: nothing runs on the device
    keys = [r.key for r in rungs]
    assert keys[:7] == ["fp32", "half", "channels_last", "compile", "cuda_graphs", "freeze", "taesd"]
    graphs, frozen = rungs[4], rungs[5]
    assert graphs.cuda_graphs and graphs.compile and not graphs.minidiff_options and graphs.dtype == torch.float16
    assert frozen == dataclasses.replace(graphs, key="freeze", name="+freeze", freeze=True)
    assert all(r.cuda_graphs for r in rungs[5:]) and "reuse_memory" not in keys and "int8" not in keys


def test_the_fp32_rung_with_every_option_is_the_fastest_rung_in_fp32():
    rungs = {r.key: r for r in ladder("cpu")}
    if "fp32_fast" not in rungs:
        assert fast_dtype("cpu") == torch.float32  # the fast rungs already compute in fp32
        return
    fp32_fast = rungs.pop("fp32_fast")
    best = rungs["reuse_memory" if reuse_memory_available() else "freeze"]
    assert fp32_fast == dataclasses.replace(best, key="fp32_fast", name=fp32_fast.name, dtype=torch.float32,
                                            tolerance=TOLERANCE[torch.float32])
    assert ladder("cpu")[-1].key == "fp32_fast"  # last: the rungs before share their compiled UNets


def test_bk_sdm_rungs_are_the_bk_sdm_presets():
    assert distilled_config(UNetConfig.sd15(), "small") == UNetConfig.bk_sdm_small()
    assert distilled_config(UNetConfig.sd15(), "tiny") == UNetConfig.bk_sdm_tiny()


@pytest.mark.parametrize("config, vae", [("sd15", VAEConfig.sd()), ("sdxl", VAEConfig.sdxl()),
                                         ("sdxl_refiner", VAEConfig.sdxl()), ("sdxl_tiny", VAEConfig.tiny())])
def test_each_unet_decodes_with_its_own_vae(config, vae):
    assert vae_config(getattr(UNetConfig, config)()) == vae  # SDXL's latent scale 0.13025, SD's 0.18215


def test_the_end_to_end_decode_redoes_a_float16_overflow_in_float32_as_the_pipeline_does():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e5)  # beyond float16's 65504 (the "black image" of SDXL's VAE)
    vae.half()
    latents = torch.randn(1, 4, 8, 8).half() * vae.scaling_factor
    with torch.no_grad(), pytest.warns(UserWarning, match="overflowed"):
        image = decode(vae, latents)
    assert torch.isfinite(image).all() and vae.decoder.conv_in.weight.dtype == torch.float32


def test_profile_prints_the_top_operators_and_writes_a_trace(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--config", "tiny", "--size", "64", "--rows", "5", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "aten::" in out and "Self CPU" in out
    assert "traceEvents" in json.loads(trace.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temporary file left behind


@pytest.mark.parametrize("args, message", [
    (["bench", "--config", "sd99"], "unknown UNet config 'sd99'"),
    (["bench", "--config", "tiny", "--size", "100"], "multiple of 64"),
    (["bench", "--config", "tiny", "--rungs", "fp32,warp"], "unknown rung"),
    (["bench", "--config", "tiny", "--json", "/no/such/folder/r.json"], "cannot write"),
    (["profile", "--config", "tiny", "--trace", "/no/such/folder/t.json"], "cannot write"),
])
def test_bad_arguments_give_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("config", [UNetConfig.tiny(), UNetConfig.sd15(), UNetConfig.bk_sdm_tiny()])
def test_the_step_flops_equal_torchs_flop_counter(config):
    """count_flops (hooks on convolutions, linear layers and attention) against torch.utils.flop_counter, which counts
    the same operators (conv, mm, bmm, SDPA) from the dispatcher; on meta, nothing is computed."""
    unet = meta_model(UNet, config).eval()
    x, context = torch.randn(2, 4, 32, 32, device="meta"), torch.randn(2, 77, config.cross_attention_dim, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, 500, context)
    assert count_flops(unet, x, 500, context) == counter.get_total_flops() > 0
    if config == UNetConfig.sd15():  # CFG batch 2 at 256 px
        assert count_flops(unet, x, 500, context) == 360_212_889_600


def test_the_attention_flops_by_hand():
    attention = Attention(32, heads=2, context_dim=24).eval()  # inner width 32
    x, context = torch.randn(3, 10, 32), torch.randn(3, 5, 24)
    projections = 2 * 3 * (10 * 32 * 32 + 2 * 5 * 24 * 32 + 10 * 32 * 32)  # to_q, to_k and to_v, to_out
    products = 2 * 2 * 3 * 10 * 5 * 32  # Q K^T and the weights times V: 2 B N M inner each
    assert count_flops(attention, x, context) == projections + products
    itself = Attention(32, heads=2).eval()  # self-attention: 10 keys
    assert count_flops(itself, x) == 2 * 3 * (4 * 10 * 32 * 32) + 4 * 3 * 10 * 10 * 32


@pytest.mark.parametrize("flags, fp32, bf16", [
    ("fpu sse avx2 fma avx512f avx512_bf16", 64, 128),
    ("fpu sse avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", 64, 1024),
    ("fpu sse avx2 fma", 32, 32),
    ("fpu sse sse2", 8, 8),
])
def test_the_cpu_peak_follows_the_flags(flags, fp32, bf16):
    cpuinfo = f"processor\t: 0\ncpu MHz\t\t: 1500.000\nflags\t\t: {flags}\n\nprocessor\t: 1\ncpu MHz\t\t: 2000.0\n"
    peak = cpu_peak_flops(threads=3, cpuinfo=cpuinfo)
    assert peak["fp32"] == 3 * 2.0e9 * fp32 and peak["bf16"] == 3 * 2.0e9 * bf16 and peak["fp16"] == peak["fp32"]
    assert peak["basis"].startswith(f"3 cores x 2.00 GHz x {fp32} fp32 / {bf16} bf16 FLOPs per cycle")
    assert cpu_peak_flops(cpuinfo="processor\t: 0\n") == {}  # no clock: no peak
