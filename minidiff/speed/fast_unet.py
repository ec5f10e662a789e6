"""FastUNet: a UNet behind the options that change how it runs, not what it computes.

    timestep       -> a float32 device tensor made on the device (`timestep_tensor`): no host-to-device copy
    channels_last  -> NHWC memory layout for convolutions, the layout oneDNN (CPU) and cuDNN tensor cores prefer
    compile        -> torch.compile (TorchDynamo + TorchInductor, Ansel et al. 2024, "PyTorch 2")
    freeze         -> with compile: Inductor's freezing folds the weights into the compiled graph as constants
    autotune       -> with compile: Inductor's max_autotune (`AUTOTUNE_OPTIONS`)
    cuda_graphs    -> record the UNet's kernels once per input shape and replay them (`CudaGraphCall`)
"""

import torch
from torch import nn

from minidiff.errors import MinidiffError

# Inductor's options for autotune, per device type. A CPU: each matmul of the graph (int8 ones included) timed at
# compile against C++ GEMM kernels that Inductor generates for its shapes, the fastest kept, and the graph's kernels
# called from generated C++ rather than Python. Frozen SD 1.5 +int8 at 256 px on a 2-core Intel Xeon with AMX:
# 298.7 -> 278.8 ms a step (cpp_wrapper alone 285.8), compile 74 -> 204 s. A GPU: max_autotune (Triton templates).
AUTOTUNE_OPTIONS = {"cpu": {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True},
                    "cuda": {"max_autotune": True}}


def timestep_tensor(t, x: torch.Tensor) -> torch.Tensor:
    """t (a number, or a 0-d / (B,) tensor) -> float32 (B,) on x's device, made there (no host-to-device copy)."""
    batch = x.shape[0]
    if torch.is_tensor(t):
        t = t.to(x.device, torch.float32)
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t
    return torch.full((batch,), float(t), dtype=torch.float32, device=x.device)


class CudaGraphCall:
    """Capture `function(*tensors)` into a CUDA graph once per input shape and dtype, then replay it.

    The inputs are copied into static buffers that the graph reads; the output is copied out of the graph's
    static output (the next replay overwrites it). Warm-up runs on a side stream first, as CUDA graph capture
    requires (cuDNN autotuning, lazy initialisation and torch.compile all happen there, outside the graph).
    """

    def __init__(self, function, warmup_calls: int = 3):
        self.function, self.warmup_calls = function, warmup_calls
        self.graphs = {}  # (shape, dtype) per input -> (graph, static inputs, static output)

    def __call__(self, *tensors):
        key = tuple((tuple(t.shape), t.dtype, t.device, t.is_contiguous()) for t in tensors)
        if key not in self.graphs:
            self.graphs[key] = self.capture(tensors)
        graph, static_inputs, static_output = self.graphs[key]
        for buffer, value in zip(static_inputs, tensors):
            buffer.copy_(value)
        graph.replay()
        return static_output.clone()

    @torch.no_grad()
    def capture(self, tensors):
        static_inputs = [t.clone() for t in tensors]  # clone keeps the memory format (channels_last stays)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                self.function(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.function(*static_inputs)
        return graph, static_inputs, static_output


class FastUNet(nn.Module):
    """A UNet behind the speed options: timestep as a device tensor, channels_last input, compiled, graph-replayed.

    It holds the UNet as `.unet` and exposes its `config`, so a Pipeline uses it like the UNet itself.
    """

    def __init__(self, unet: nn.Module, channels_last: bool = False, compile: bool = False,
                 cuda_graphs: bool = False, compile_options: dict | None = None, freeze: bool = False,
                 autotune: bool = False):
        super().__init__()
        check_compiled(compile, freeze, autotune)
        self.unet = unet
        self.channels_last, self.freeze = channels_last, freeze
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        compile_options = dict(compile_options or {})
        if autotune and compile_options.get("backend", "inductor") == "inductor":
            device = next(unet.parameters()).device.type
            compile_options["options"] = {**AUTOTUNE_OPTIONS.get(device, {"max_autotune": True}),
                                          **compile_options.get("options", {})}
        if freeze and compile_options.get("backend", "inductor") == "inductor":
            # its own Inductor options: TorchDynamo then keeps this compiled graph apart from an unfrozen one of the
            # same UNet.forward (it reuses compiled code across instances when the backend is the same)
            compile_options["options"] = {**compile_options.get("options", {}), "freezing": True}
        # a compiled bound method (not a module attribute, so no second copy of the keys in state_dict)
        self.run = torch.compile(unet.forward, **compile_options) if compile else unet.forward
        self.graphed = CudaGraphCall(self.call) if cuda_graphs else None

    @property
    def config(self):
        return self.unet.config

    def call(self, x, t, context, *added):
        # SDXL's added conditioning arrives as plain tensors (text_embeds, time_ids): CUDA graphs copy only tensors
        kwargs = {"added_cond_kwargs": dict(zip(("text_embeds", "time_ids"), added))} if added else {}
        if not self.freeze:
            return self.run(x, t, context, **kwargs)
        # Inductor freezes only graphs compiled without autograd, and reads the flag when it compiles (the first
        # call, or a new input shape): scoped to these calls, not set for the whole process
        from torch._inductor import config as inductor_config  # imported here: seconds of import time

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.run(x, t, context, **kwargs)

    def forward(self, x, t, context, added_cond_kwargs: dict | None = None):
        added = () if added_cond_kwargs is None else (added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"])
        t = timestep_tensor(t, x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graphed is not None and x.is_cuda:
            return self.graphed(x, t, context, *added)
        return self.call(x, t, context, *added)


def check_compiled(compile: bool, freeze: bool, autotune: bool) -> None:
    """freeze and autotune act on the compiled graph: a MinidiffError without compile."""
    if freeze and not compile:
        raise MinidiffError("freeze=True freezes the weights into the compiled graph: use it with compile=True")
    if autotune and not compile:
        raise MinidiffError("autotune=True tunes the compiled graph's matmuls: use it with compile=True")


def check_cuda_graphs(device) -> None:
    if torch.device(device).type != "cuda":
        raise MinidiffError(f"cuda_graphs=True needs the model on a CUDA GPU, but it is on {device}: "
                            "drop cuda_graphs, or load with device='cuda'")
