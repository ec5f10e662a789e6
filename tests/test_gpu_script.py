"""benchmarks/gpu.sh, the GPU ladder against diffusers in one command: its dry run takes the same code path on the
CPU (the tiny SD 1.5 and SDXL configs at 64 px), so that the script cannot rot while no GPU is lent. No timing
assertions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def run(*args, **env):
    environment = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=900)


@pytest.mark.slow  # ~1 min of CPU: nine rungs of the tiny UNets with diffusers' in turns (TorchDynamo traces)
def test_the_dry_run_writes_the_table_of_every_rung(tmp_path):
    done = run("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "gpu_ladder.txt").read_text()
    assert table == done.stdout  # what it printed is what it wrote
    lines = table.splitlines()
    assert lines[0].startswith("# benchmarks/gpu.sh --dry-run, ")
    assert lines[-1].startswith("# ") and lines[-1].endswith(" s in all, exit status 0")
    parts = {"SDXL": ("sdxl_tiny", "gpu_ladder_sdxl.json", ["fp32 eager", "+bf16", "+channels_last"]),
             "SD 1.5": ("tiny", "gpu_ladder.json", ["fp32 eager", "+bf16", "+channels_last", "+compile", "+freeze",
                                                    "+TAESD (decode)"])}
    starts = [lines.index(next(line for line in lines if line.startswith(f"# {name}: "))) for name in parts]
    assert starts == sorted(starts)  # SDXL first, then SD 1.5 with the time left
    ends = [start - 1 for start in starts[1:]] + [len(lines) - 1]  # a blank line between the parts; the total
    for (name, (config, json_name, rungs)), start, end in zip(parts.items(), starts, ends):
        part = lines[start:end]
        assert f"-m benchmarks.vs_diffusers --device cpu --config {config} " in part[0], part[0]
        assert part[-1].startswith(f"# {name}: ") and part[-1].endswith(" s, exit status 0")
        assert any("interleaved with diffusers" in line for line in part)
        rows = json.loads((tmp_path / json_name).read_text())
        assert [row["rung"] for row in rows] == rungs
        for row in rows:
            assert row["passed"] and row["diffusers_ms"] > 0 and row["diffusers_max_dev"] is not None, row
            assert next(line for line in part if line.startswith(row["rung"])).count(" PASS ") == 1
            # the rung's line in the log, written as it ended: what a part stopped at its limit keeps
            logged = f"  {row['rung']}: {row['ms_per_step']:.1f} ms/step, "
            assert next(line for line in part if line.startswith(logged)).count("PASS; diffusers ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_ladder.json", "gpu_ladder.txt",
                                                          "gpu_ladder_sdxl.json"]  # no .partial left


def test_without_a_gpu_it_says_so_before_it_starts(tmp_path):
    done = run("--out", str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert done.returncode != 0
    assert "sees no CUDA GPU: install a CUDA build of torch, or use --dry-run" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "gpu_ladder.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "gpu.sh: unknown argument '--bogus'"),
    (["--out"], "gpu.sh: --out needs a folder"),
])
def test_a_bad_argument_gives_one_line(args, message):
    done = run(*args)
    assert done.returncode == 2 and done.stderr.strip() == done.stderr.strip().splitlines()[0]
    assert message in done.stderr


def test_it_installs_nothing():
    commands = [line.strip() for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    # pip is only named in the message that diffusers is missing
    assert [line for line in commands if "pip " in line] == ["""sys.exit('gpu.sh: diffusers is not installed: """
                                                             """pip install -e ".[parity]"')"""]
    assert os.access(SCRIPT, os.X_OK)
