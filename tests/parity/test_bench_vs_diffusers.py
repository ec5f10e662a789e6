"""benchmarks/vs_diffusers.py: minidiff's ladder with diffusers' UNet as a peer, on the same weights and inputs, its
calls timed in turns with minidiff's. No timing assertions (the benchmark measures speed, tests do not)."""

import json

import pytest
import torch

import benchmarks.vs_diffusers as vs_diffusers
from minidiff.bench import TOLERANCE, bench, make_setup

QUICK = ["--config", "tiny", "--size", "64", "--steps", "1", "--repeats", "2"]


def test_diffusers_runs_interleaved_on_the_same_weights():
    header, results = bench("tiny", 64, 1, 1, 2, "cpu", rungs=["fp32", "channels_last"],
                            peers={"diffusers": vs_diffusers.diffusers_unet}, log=lambda line: None)
    assert "diffusers" in header and "interleaved" in header
    for r in results:
        theirs = r.peers["diffusers"]
        assert theirs.ms_per_step > 0 and theirs.ratio == pytest.approx(r.ms_per_step / theirs.ms_per_step)
        # the same network on the same weights: float32 agrees to rounding, within the UNet's parity tolerance
        # (minidiff sums the small maps' convolutions in another order: 1.6e-5 here, 1e-6 for SD 1.5); in bf16 (the
        # fast dtype of a CPU with bf16 instructions) the two round differently (blockwise bf16 attention)
        assert theirs.max_dev <= TOLERANCE[torch.float32 if r.dtype == "fp32" else torch.bfloat16]


def test_the_script_prints_the_table_and_summary_with_diffusers_columns(capsys, tmp_path):
    status = vs_diffusers.main([*QUICK, "--rungs", "fp32,half", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    assert "interleaved with diffusers" in lines[1] and lines[2].startswith("one UNet step: ")
    assert lines[3].split()[-10:] == ["diffusers", "ms", "ratio", "vs", "diffusers", "diffusers", "dev", "diffusers",
                                      "MB", "syncs"]
    for name in ("fp32 eager", "+bf16"):
        row = next(line for line in lines if line.startswith(name))
        assert " PASS " in row and row.split()[-6] != "-", row  # diffusers' ms is filled in
    assert lines[-2].startswith("fastest (full network, UNet ms/step): minidiff ")
    assert lines[-1].startswith("  diffusers with its own options: ")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert all(row["diffusers_ms"] > 0 and row["diffusers_max_dev"] is not None for row in rows)


def test_without_diffusers_it_names_the_extra_and_runs_the_ladder_alone(capsys, monkeypatch):
    monkeypatch.setattr(vs_diffusers, "diffusers_available", lambda: False)
    assert vs_diffusers.main([*QUICK, "--rungs", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('diffusers is not installed (pip install -e ".[parity]" to compare with it)')
    assert "minidiff alone" in out and "diffusers ms" not in out
    assert next(line for line in out.splitlines() if line.startswith("fp32 eager")).count("PASS") == 1


def test_a_bad_argument_gives_one_line(capsys):
    assert vs_diffusers.main(["--config", "sd99"]) == 2
    err = capsys.readouterr().err
    assert "vs_diffusers: error: unknown UNet config 'sd99'" in err and "Traceback" not in err


def test_sdxl_benches_against_diffusers_with_its_added_conditioning(capsys, tmp_path):
    """`--config sdxl_tiny`: SDXL's layout at a few channels (`--config sdxl` is this at full size): the pooled text
    and size ids reach both UNets, both are timed, and they agree within the UNet's parity tolerance."""
    status = vs_diffusers.main(["--config", "sdxl_tiny", "--size", "64", "--steps", "1", "--repeats", "2",
                                "--rungs", "fp32,half", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "UNet sdxl_tiny with RANDOM weights" in out and "interleaved with diffusers" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [row["rung"] for row in rows] == ["fp32 eager", "+bf16"]
    for row in rows:
        assert row["passed"] and row["ms_per_step"] > 0 and row["diffusers_ms"] > 0, row
        # float32: the same sums to rounding; bf16: the two round differently (see the first test)
        assert row["diffusers_max_dev"] <= TOLERANCE[torch.float32 if row["dtype"] == "fp32" else torch.bfloat16]
    assert make_setup("sdxl_tiny", 64, 1, 1, 1, "cpu", 0).added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
