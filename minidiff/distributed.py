"""Data-parallel training and generation under `torchrun`: one process per device, each with its shard.

The contract, for every training entry point that uses this module:

- `torchrun --nproc_per_node N ...` starts N copies of the same command with RANK, WORLD_SIZE and LOCAL_RANK in
  the environment. Without them (a plain `python ...`) the process is rank 0 of a world of 1 and nothing here
  talks to anything: the same code runs unchanged on one process.
- **Same global batch.** Every rank draws the *whole* global batch (data indices, timesteps, noise) from the
  same seed, so all ranks hold the same numbers, and then keeps only its slice: `shard(x)` is rows
  [rank * B / N, (rank + 1) * B / N) of a global batch of B rows (B must be a multiple of N). Each rank's loss
  is the mean over its B / N rows; DistributedDataParallel (`wrap`) averages the gradients over the N ranks, and
  the mean of N equal-sized means is the mean over all B rows. So the step equals one process's step on the
  whole batch, up to the order of floating-point sums (about 1e-6 relative in float32). DDP averages only what
  flows through its own forward, so what is wrapped is the loss with its networks (`LossModule`).
- **Rank 0 writes.** Checkpoints, logs and pictures that are not per-rank are written only where `is_main()`;
  `barrier()` makes the others wait for it when they must read what it wrote.
- **Generation** splits a list of jobs by index: rank r takes jobs r, r + N, r + 2N, ... (`my_indices`). Each
  job carries its own seed, so the pictures do not depend on N.

Process groups: gloo on CPU, NCCL when the device is CUDA; `setup` starts one only when WORLD_SIZE > 1 and
`teardown` ends it.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minidiff.errors import InputError


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, how many processes there are, and its device index on the machine."""

    rank: int = 0        # 0 .. world_size - 1; rank 0 writes the files
    world_size: int = 1  # number of processes; 1 without torchrun
    local_rank: int = 0  # rank on this machine: the CUDA device index

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer; torchrun sets it, "
                         f"unset it to run as one process") from None


def world_from_env() -> World:
    """The World that torchrun described in RANK / WORLD_SIZE / LOCAL_RANK; one process when they are unset."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"RANK={rank} does not fit WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE; "
                         f"start several processes with torchrun, not by setting these by hand")
    return World(rank, world_size, local_rank)


_world = World()


def setup(device: str | torch.device = "cpu") -> World:
    """Read the environment and, under torchrun with WORLD_SIZE > 1, join the process group (gloo on CPU, NCCL on
    CUDA, where this rank also takes GPU LOCAL_RANK). Returns the World; calling it again returns the same one."""
    global _world
    _world = world_from_env()
    if _world.distributed and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            if _world.local_rank >= torch.cuda.device_count():
                raise InputError(f"process {_world.local_rank} of this machine has no GPU of its own (there are "
                                 f"{torch.cuda.device_count()}): NCCL takes one GPU per process, so start at most "
                                 f"that many (--nproc_per_node)")
            torch.cuda.set_device(_world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=_world.rank, world_size=_world.world_size)
    return _world


def teardown() -> None:
    """Leave the process group (if one was started) so the process exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> World:
    """The World set by the last `setup` (one process before any)."""
    return _world


def rank() -> int:
    return _world.rank


def world_size() -> int:
    return _world.world_size


def is_main() -> bool:
    """True on the process that writes checkpoints and logs (rank 0; the only process without torchrun)."""
    return _world.rank == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for on one process)."""
    if dist.is_initialized():
        dist.barrier()


def check_divisible(global_batch: int, what: str = "batch size") -> None:
    """A global batch must split into equal shards, else the averaged gradient is not the whole batch's."""
    if global_batch % _world.world_size:
        raise InputError(f"{what} {global_batch} does not split over {_world.world_size} processes; "
                         f"use a multiple of {_world.world_size} (or another --nproc_per_node)")


def shard(batch):
    """This rank's rows of a global batch drawn identically on every rank: a tensor, or a list/tuple of tensors
    (sliced alike), or a plain list. Rows [rank * B/N, (rank + 1) * B/N)."""
    if isinstance(batch, tuple):
        return tuple(shard(item) for item in batch)
    size = len(batch)
    check_divisible(size)
    per_rank = size // _world.world_size
    return batch[_world.rank * per_rank:(_world.rank + 1) * per_rank]


def my_indices(count: int) -> range:
    """The jobs 0 .. count - 1 this rank does when they are dealt out in turn: r, r + N, r + 2N, ..."""
    return range(_world.rank, count, _world.world_size)


class LossModule(nn.Module):
    """A loss over some networks, as one module whose forward is the loss: what `wrap` puts in DDP. DDP averages
    the gradients only of parameters reached through the wrapped module's forward (a network called directly,
    outside it, would train on its own shard's gradient alone), so the loss and every network it trains go in:
    `wrap(LossModule(lambda x, t: my_loss(unet, x, t), unet=unet))(x_shard, t_shard).backward()`."""

    def __init__(self, loss, **networks: nn.Module):
        super().__init__()
        self.loss = loss
        self.networks = nn.ModuleDict(networks)  # registered, so DDP sees (and syncs) their parameters

    def forward(self, *args, **kwargs):
        return self.loss(*args, **kwargs)


def wrap(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `module` when distributed (gradients averaged over ranks in backward),
    else the module itself. Only parameters with requires_grad take part (a LoRA's, a new embedding's).
    `find_unused_parameters=True` when some trainable parameters get no gradient in a step. Call `unwrap` to
    reach the plain module for saving."""
    if not _world.distributed:
        return module
    device_ids = [_world.local_rank] if next(module.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a `wrap`: its state_dict has the module's own keys (no `module.` prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def all_mean(value: float) -> float:
    """The mean of a number over all ranks (e.g. each rank's loss on its shard -> the global batch's loss)."""
    if not dist.is_initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / _world.world_size
