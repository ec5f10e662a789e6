"""Data parallelism under torchrun (minidiff.distributed): 2 CPU processes (gloo) train the same steps as one
process on the same global batch, only rank 0 writes, and batch generation gives the same pictures on 1 or 2."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidiff import distributed
from minidiff.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # a hung rendezvous or collective fails the test instead of hanging CI
ADAPTER_RTOL = 2e-3  # the trained tensors and AdamW's moments, against each tensor's largest element: measured 4.6e-4
LOSS_RTOL = 1e-5  # the shards' losses and gradients are summed in another order: measured <= 7e-7 relative

SPY = """
import os, sys
from minidiff.course import train

def spy(name, write):  # records which rank called a writer, then writes as usual
    def record(*args, **kwargs):
        with open(os.path.join(sys.argv[1], "rank%s.txt" % os.environ.get("RANK", "0")), "a") as f:
            f.write(name + "\\n")
        return write(*args, **kwargs)
    return record

train.save_folder = spy("save_folder", train.save_folder)
train.write_json = spy("write_json", train.write_json)
sys.exit(train.main(sys.argv[2:]))
"""


def torchrun(args: list, processes: int = 2, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` (a free port of its own), killed whole if it hangs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # its own process group: the workers die with it
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, output)


def test_training_on_two_processes_follows_the_one_process_loss_curve(tmp_path):
    """`python -m minidiff.course.train shapes --quick` on 2 processes (each half of every batch of 8) against one
    process on the same batches: the same loss at every step of both phases; rank 0 alone saves and logs."""
    from minidiff.course import train

    one = train.train(train.TrainConfig.quick(), tmp_path / "one", progress=False, threads=None)
    (tmp_path / "spy.py").write_text(SPY)
    (tmp_path / "calls").mkdir()
    torchrun([str(tmp_path / "spy.py"), str(tmp_path / "calls"), "shapes", "--quick", "--out", str(tmp_path / "two")])

    two = json.loads((tmp_path / "two" / "train_log.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for phase in ("vae", "diffusion"):
        assert len(two["losses"][phase]) == len(one["losses"][phase]) > 0
        torch.testing.assert_close(torch.tensor(two["losses"][phase]), torch.tensor(one["losses"][phase]),
                                   rtol=LOSS_RTOL, atol=0, msg=lambda m, phase=phase: f"{phase} loss curve: {m}")
    assert sorted(p.name for p in (tmp_path / "calls").iterdir()) == ["rank0.txt"]  # rank 1 wrote nothing
    assert "save_folder" in (tmp_path / "calls" / "rank0.txt").read_text().split()
    assert (tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(("method", "word"), [("lora", []), ("textual-inversion", ["--token", "<w>"]),
                                              ("lora", ["--token", "<w>"])], ids=["lora", "word", "pivotal"])
def test_adapter_training_on_two_processes_follows_the_one_process_loss_curve(tmp_path, monkeypatch, method, word):
    """`minidiff train lora | textual-inversion | lora --token` under torchrun: 2 processes (each half of every batch
    of 4) against one on the same batches: the same loss at every step and the same trained tensors; rank 0 alone
    writes."""
    from PIL import Image
    from safetensors import safe_open

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(("red", "blue", "green", "white", "yellow", "purple")):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a <w> picture, {colour}\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread in every process: the same sums in the same order
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"{processes}" / "adapter.safetensors"
        out.parent.mkdir()
        torchrun(["-m", "minidiff", "train", method, str(data), *word, "--steps", "3", "--batch", "4",
                  "--save-every", "3", "--device", "cpu", "--out", str(out)], processes=processes)
        assert sorted(p.name for p in out.parent.iterdir()) == ["adapter.checkpoint.safetensors", "adapter.loss.png",
                                                                "adapter.safetensors"]
        with safe_open(out.with_name("adapter.checkpoint.safetensors"), "pt") as f:
            runs[processes] = {key: f.get_tensor(key) for key in f.keys() if key != "generator"}
    one, two = runs[1], runs[2]
    assert one.keys() == two.keys() and len(one["losses"]) == 3
    torch.testing.assert_close(two["losses"], one["losses"], rtol=LOSS_RTOL, atol=0)
    # the tensors after 3 AdamW steps: Adam divides by the gradient's own size, so an element whose gradient is
    # near zero moves by up to lr whatever its rounding; held relative to the largest element of each tensor
    worst = max(float((two[key] - one[key]).abs().max() / one[key].abs().max().clamp_min(1e-30)) for key in one)
    assert worst <= ADAPTER_RTOL, f"the trained tensors of 2 processes differ from one process's by {worst:.1e}"


def test_prompt_list_draws_the_same_pictures_on_one_or_two_processes(tmp_path, monkeypatch):
    """`minidiff generate --prompts FILE`: picture i has seed --seed + i wherever it is drawn, so 2 processes
    (rank 0: prompts 0 and 2, rank 1: prompt 1) write the same files as one process, pixel for pixel."""
    import numpy as np
    from PIL import Image

    from minidiff.cli import main

    (tmp_path / "prompts.txt").write_text("a small red circle in the top left\n"
                                          "a small red circle in the top left\n\n"  # a blank line is skipped
                                          "a big blue square in the middle\n")
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "2", "--seed", "7", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same sums in the same order
    try:
        assert main(["generate", "--prompts", "prompts.txt", *common, "--out", "one.png"]) == 0
        assert main(["generate", "a big blue square in the middle", "--steps", "2", "--seed", "9", "--device",
                     "cpu", "--out", "single.png"]) == 0
    finally:
        torch.set_num_threads(threads)
    run = torchrun(["-m", "minidiff", "generate", "--prompts", "prompts.txt", *common, "--out", "two.png"],
                   cwd=tmp_path)
    assert "wrote two_0.png, two_2.png" in run.stdout and "wrote two_1.png" in run.stdout

    def pixels(name):
        return np.asarray(Image.open(tmp_path / name))

    for i in range(3):
        assert np.array_equal(pixels(f"one_{i}.png"), pixels(f"two_{i}.png")), f"picture {i}"
    assert not np.array_equal(pixels("one_0.png"), pixels("one_1.png"))  # one prompt, seeds 7 and 8
    assert np.array_equal(pixels("one_2.png"), pixels("single.png"))  # the third prompt's seed is 7 + 2


# --- the module on its own, one process -------------------------------------------------------------------


def test_without_torchrun_it_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = distributed.setup("cpu")
    assert (world.rank, world.world_size, world.distributed) == (0, 1, False)
    assert distributed.is_main()
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model and distributed.unwrap(model) is model
    batch = torch.arange(6)
    assert torch.equal(distributed.shard(batch), batch)
    assert list(distributed.my_indices(3)) == [0, 1, 2]
    assert distributed.all_mean(2.5) == 2.5
    distributed.barrier()  # returns at once


def test_shards_and_jobs_of_rank_1_of_2(monkeypatch):
    monkeypatch.setattr(distributed, "_world", distributed.World(rank=1, world_size=2, local_rank=1))
    images, t = distributed.shard((torch.arange(8).view(4, 2), torch.tensor([10, 11, 12, 13])))
    assert images.tolist() == [[4, 5], [6, 7]] and t.tolist() == [12, 13]  # the second half of each, alike
    assert distributed.shard(["a", "b", "c", "d"]) == ["c", "d"]
    assert list(distributed.my_indices(5)) == [1, 3]
    assert not distributed.is_main()
    with pytest.raises(InputError, match="batch size 5 does not split over 2 processes; use a multiple of 2"):
        distributed.shard(torch.zeros(5))


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 does not fit WORLD_SIZE=2"),
    ({"WORLD_SIZE": "0"}, "RANK=0 does not fit WORLD_SIZE=0"),
])
def test_a_broken_torchrun_environment_is_named(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=message):
        distributed.world_from_env()
