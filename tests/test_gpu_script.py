"""benchmarks/gpu.sh, the GPU ladder against diffusers in one command: its dry run takes the same code path on the
CPU (the tiny config at 64 px), so that the script cannot rot while no GPU is lent. No timing assertions."""

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


@pytest.mark.slow  # ~40 s of CPU: six rungs of the tiny UNet with diffusers' in turns (TorchDynamo traces)
def test_the_dry_run_writes_the_table_of_every_rung(tmp_path):
    done = run("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "gpu_ladder.txt").read_text()
    assert table == done.stdout  # what it printed is what it wrote
    lines = table.splitlines()
    assert lines[0].startswith("# benchmarks/gpu.sh --dry-run, ")
    assert "-m benchmarks.vs_diffusers --device cpu" in lines[1]
    assert "interleaved with diffusers" in table and lines[-1].startswith("# ") and "exit status 0" in lines[-1]
    rows = json.loads((tmp_path / "gpu_ladder.json").read_text())
    assert [row["rung"] for row in rows] == ["fp32 eager", "+bf16", "+channels_last", "+compile", "+freeze",
                                             "+TAESD (decode)"]
    assert all(row["passed"] and row["diffusers_ms"] > 0 for row in rows)
    for row in rows:
        assert next(line for line in lines if line.startswith(row["rung"])).count(" PASS ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_ladder.json", "gpu_ladder.txt"]  # no .partial left


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
