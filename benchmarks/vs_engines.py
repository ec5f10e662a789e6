"""minidiff's speed ladder against the engines CPU users pick for speed: ONNX Runtime and OpenVINO, each running the
ONNX file exported from minidiff's own UNet (minidiff/export.py) with the same weights, on the same inputs, its
calls timed in turns with minidiff's (minidiff/bench.py, peers).

    python -m benchmarks.vs_engines --config sd15 --size 256 [--images 1] [--rungs fp32,freeze,reuse_memory]
    (the flags of `minidiff bench`; --json / --csv add NAME_ms, NAME_ratio, NAME_fp32_dev, NAME_call_mb, ...)

The engines run their own runtime, not the rung's options: ONNX Runtime in float32 with every graph optimisation
(its CPU provider has no bf16 convolutions), its threads not spinning between calls (they would take the cores
from the others timed in turns); OpenVINO with its CPU defaults (latency hint), in f32 on the fp32
rung and in bf16 on the bf16 rungs (OpenVINO's own default on a CPU with bf16 instructions; the `NAME dtype`
that the JSON records is the precision OpenVINO reports it compiled for). OpenVINO's model is reshaped to the
inputs' static shapes before it is compiled, as optimum-intel does for its pipelines. Both use as many threads as
torch does. The export is made once per network (rungs with the same network share it) into a temporary folder.

Timed in turns, one engine could slow the next: measured with per-thread CPU time (/proc/self/task/*/stat) on SD 1.5
at 256 px, 2 cores, the engines' threads take no CPU while minidiff's UNet runs (ONNX Runtime with spinning off
as above; OpenVINO's TBB workers sleep). What they share with minidiff is glibc's heap: minidiff's fp32 eager call
took more page faults with the engines in the process than before they were created (one run, on a busy machine),
so compare the eager rungs with `minidiff bench` alone too; the +reuse memory rungs keep their freed memory.

Needs the `engines` extra: pip install -e ".[engines]" (onnx, onnxscript, onnxruntime, openvino). Without an
engine the ladder runs with the others, or alone, and says which extra to install.
"""

import argparse
import atexit
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from minidiff.bench import resolve_config, with_weights
from minidiff.cli.speed import add_bench_arguments, cmd_bench
from minidiff.errors import MinidiffError
from minidiff.export import export_unet
from minidiff.unet import UNet

INSTALL = 'pip install -e ".[engines]"'
OPENVINO_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# ONNX Runtime's thread pools busy-wait for work after a run unless these are "0" (tests/test_bench_vs_engines.py)
SPINNING_ENTRIES = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
_exports = {}  # (repr(config), id(state)) -> (the ONNX file, the state: kept so that its id is not reused)
_folder = None


def exported(config, state: dict) -> Path:
    """minidiff's UNet of `config` with the fp32 `state` as an ONNX file (dynamic batch, size and text length),
    exported once per network and kept in a temporary folder removed at exit."""
    global _folder
    key = (repr(config), id(state))
    if key not in _exports:
        check_config(config)
        if _folder is None:
            _folder = Path(tempfile.mkdtemp(prefix="minidiff_engines_"))
            atexit.register(shutil.rmtree, _folder, ignore_errors=True)
        unet = with_weights(UNet, config, state, torch.float32, "cpu")
        path = _folder / f"unet{len(_exports)}" / "unet.onnx"
        path.parent.mkdir()
        _exports[key] = (export_unet(unet, path, batch=2, latent_size=(16, 16)), state)
    return _exports[key][0]


def feed(x, t, context) -> dict:
    """The ONNX inputs as float32 arrays: x (B, C, h, w), t (B,), context (B, L, D)."""
    return {"x": x.float().numpy(), "t": np.full((x.shape[0],), t, dtype=np.float32),
            "context": context.float().numpy()}


class OnnxRuntimeUNet:
    """An onnxruntime session of the exported UNet, called like minidiff's: (x, t: int, context) -> tensor."""

    dtype = torch.float32

    def __init__(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        # no busy-waiting between calls: its threads would take the cores from the engines timed in turns with it
        for pool in SPINNING_ENTRIES:
            options.add_session_config_entry(pool, "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x, t, context):
        (out,) = self.session.run(None, feed(x, t, context))
        return torch.from_numpy(out)


class OpenVinoUNet:
    """OpenVINO's CPU plugin on the exported UNet, compiled for the inputs' static shapes on the first call of each
    shape; `precision` is its inference precision hint ("f32" or "bf16")."""

    def __init__(self, path: Path, precision: str):
        import openvino

        self.core, self.path, self.compiled = openvino.Core(), path, {}
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.dtype = OPENVINO_DTYPES[precision]  # until a compile says what this CPU runs

    def request(self, shapes: dict):
        key = tuple(tuple(shape) for shape in shapes.values())
        if key not in self.compiled:
            model = self.core.read_model(str(self.path))
            model.reshape(shapes)
            compiled = self.core.compile_model(model, "CPU", self.config)
            precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self.dtype = OPENVINO_DTYPES.get(precision, torch.float32)  # what it compiled for on this CPU
            self.compiled[key] = compiled.create_infer_request()
        return self.compiled[key]

    def __call__(self, x, t, context):
        inputs = feed(x, t, context)
        request = self.request({name: list(value.shape) for name, value in inputs.items()})
        request.infer(inputs)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


def onnxruntime_unet(config, state: dict, dtype, device, rung) -> OnnxRuntimeUNet:
    """The peer factory (minidiff.bench): ONNX Runtime in float32 on every rung."""
    check_cpu(device)
    return OnnxRuntimeUNet(exported(config, state))


def openvino_unet(config, state: dict, dtype, device, rung) -> OpenVinoUNet:
    """The peer factory: OpenVINO in f32 on the fp32 rung, bf16 on the others (its default on a bf16 CPU)."""
    check_cpu(device)
    return OpenVinoUNet(exported(config, state), "f32" if dtype == torch.float32 else "bf16")


def check_config(config):
    if config.addition_embed_type is not None:
        raise MinidiffError(f"the engines' peers export the UNet alone, without {config.addition_embed_type!r} "
                            "added conditioning: use an SD 1.x / 2.x config (sd15, sd21, tiny, ...)")


def check_cpu(device):
    if torch.device(device).type != "cpu":
        raise MinidiffError(f"the engines' peers run on the CPU, the bench runs on {device}: use --device cpu")


ENGINES = {  # name -> (the packages it needs, the factory)
    "onnxruntime": (("onnxruntime", "onnxscript", "onnx"), onnxruntime_unet),
    "openvino": (("openvino", "onnxscript", "onnx"), openvino_unet),
}


def available(name: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in ENGINES[name][0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_engines",
                                     description="the speed ladder with ONNX Runtime and OpenVINO timed in turns")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.device = args.device or "cpu"  # the engines' peers are CPU engines
    missing = [name for name in ENGINES if not available(name)]
    if missing:
        print(f"{' and '.join(missing)} not installed ({INSTALL} to compare with "
              f"{'them' if len(missing) > 1 else 'it'}): the ladder runs without")
    peers = {name: factory for name, (_, factory) in ENGINES.items() if name not in missing}
    try:
        if peers:  # before the bench draws the weights
            check_cpu(args.device)
            check_config(resolve_config(args.config))
        return cmd_bench(args, peers)
    except MinidiffError as e:
        print(f"vs_engines: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
