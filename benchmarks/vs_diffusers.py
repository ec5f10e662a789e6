"""minidiff's speed ladder against diffusers: on every rung, diffusers' UNet2DConditionModel with the same weights
(the keys are the same), options and inputs, its calls timed in turns with minidiff's (minidiff/bench.py).

    python benchmarks/vs_diffusers.py --config sd15 --size 256 [--steps 4] [--repeats 3] [--rungs fp32,compile]
    (the flags of `minidiff bench`; --json / --csv add diffusers_ms, diffusers_ratio, diffusers_max_dev)

Needs diffusers: pip install -e ".[parity]". Without it, minidiff's ladder runs alone and says so.
"""

import argparse
import importlib.util
import sys

from torch import nn

from minidiff.checkpoint import build, meta_model
from minidiff.cli.speed import add_bench_arguments, cmd_bench
from minidiff.config import to_diffusers
from minidiff.errors import MinidiffError

INSTALL = 'pip install -e ".[parity]"'


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel, called like minidiff's UNet: (x, t, context) -> tensor."""

    def __init__(self, config, state: dict, dtype, device):
        super().__init__()
        from diffusers import UNet2DConditionModel  # here: the module imports without diffusers

        skeleton = meta_model(UNet2DConditionModel.from_config, to_diffusers(config))
        self.model = build(skeleton, dict(state), "random weights", dtype, device)
        self.config = config  # minidiff's UNetConfig, which FastUNet exposes

    def forward(self, x, t, context, added_cond_kwargs=None):
        return self.model(x, t, context, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]


def diffusers_unet(config, state: dict, dtype, device, rung) -> DiffusersUNet:
    """The peer factory (minidiff.bench): diffusers' UNet of `config` with `state`; the bench puts it behind the
    rung's options, as it does minidiff's."""
    return DiffusersUNet(config, state, dtype, device)


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/vs_diffusers.py",
                                     description="minidiff's speed ladder with diffusers' UNet timed in turns")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    peers = {"diffusers": diffusers_unet}
    if not diffusers_available():
        print(f"diffusers is not installed ({INSTALL} to compare with it): minidiff's ladder runs alone")
        peers = {}
    try:
        return cmd_bench(args, peers)
    except MinidiffError as e:
        print(f"vs_diffusers: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
