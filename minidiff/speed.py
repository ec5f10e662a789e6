"""Speed options: the same numbers (within the tolerances `minidiff bench` checks), computed faster.

Each option is a known technique, switched on by `optimize(pipe_or_unet, ...)`:
    dtype          -> float16 / bfloat16 weights and activations (half the memory traffic); chosen at loading
    channels_last  -> NHWC memory layout for convolutions, the layout oneDNN (CPU) and cuDNN tensor cores prefer
    compile        -> torch.compile (TorchDynamo + TorchInductor, Ansel et al. 2024, "PyTorch 2"): fused kernels
                      for the UNet and the VAE decoder
    freeze         -> with compile, for inference: Inductor's freezing makes the UNet's weights constants of the
                      compiled graph, folded and pre-packed once into the layouts oneDNN / MKL compute in (without
                      it a CPU convolution reorders its weights on every call); the UNet's weights must not change
                      afterwards (optimize again after loading new ones)
    cuda_graphs    -> record the UNet's kernels once per input shape and replay them (NVIDIA CUDA Graphs): no
                      per-kernel launch cost from Python; GPU only, static shapes
    attention      -> "sdpa" (PyTorch's fused kernels, the default) or "naive"; attention_slice bounds the memory
                      of the attention scores by computing that many queries at a time
    vae_tile_size  -> decode the latent in overlapping tiles of this many latent pixels (bounded VAE memory)
    reuse_memory   -> CPU, Linux (glibc): freed tensors stay in the process's heap and the next step reuses them,
                      instead of returning large blocks to the kernel and faulting in fresh zeroed pages for every
                      new tensor (`reuse_freed_memory`; process-wide, like any allocator setting)

No option adds a host-device synchronisation to the denoising loop: the timestep reaches the UNet as a device
tensor filled on the device (`timestep_tensor`), never copied from the host, and a CUDA graph replay is queued
like any kernel.
"""

import ctypes
import platform

import torch
from torch import nn

from minidiff.attention import set_attention_backend
from minidiff.errors import MinidiffError


def timestep_tensor(t, x: torch.Tensor) -> torch.Tensor:
    """t (a number, or a 0-d / (B,) tensor) -> float32 (B,) on x's device, made there (no host-to-device copy)."""
    batch = x.shape[0]
    if torch.is_tensor(t):
        t = t.to(x.device, torch.float32)
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t
    return torch.full((batch,), float(t), dtype=torch.float32, device=x.device)


# glibc's mallopt parameters (malloc.h) and their default values
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_REUSING = {"on": False}  # whether reuse_freed_memory(True) is in effect in this process


def reuse_memory_available() -> bool:
    """reuse_freed_memory works here: Linux with glibc."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reuse_freed_memory(enable: bool = True) -> None:
    """Keep freed CPU memory in the process for the next tensors (True), or give it back to the kernel (False).

    glibc serves each large allocation (a feature map of a few MB) with fresh pages from the kernel and returns
    them when the tensor is freed, so every UNet step pays a page fault and the zeroing of every page again: a
    third of an eager fp32 step at 256 px on a 2-core CPU. With `enable`, large blocks come from the heap (no
    mmap) and the heap is never trimmed: the resident memory stays at its peak, and the next step reuses it (a
    UNet's steps, which free their tensors together, run in the same memory; a program that frees one large
    block at a time among live small ones can fragment the heap and grow it instead).
    Process-wide. False after True restores glibc's default thresholds (fixed ones: glibc's dynamic threshold
    stays off) and gives the kept memory back (malloc_trim); asking for the state in effect changes nothing.
    """
    if not reuse_memory_available():
        raise MinidiffError(f"reuse_memory tunes glibc's allocator (Linux), not the one of "
                            f"{platform.system()} {platform.libc_ver()[0]}: drop reuse_memory")
    if enable == _REUSING["on"]:
        return  # an untouched process keeps glibc's own (dynamic) thresholds
    libc = ctypes.CDLL(None)
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1} if enable else _GLIBC_DEFAULTS
    for parameter, value in settings.items():
        if libc.mallopt(parameter, value) != 1:
            raise MinidiffError(f"glibc refused mallopt({parameter}, {value}): drop reuse_memory")
    if not enable:
        libc.malloc_trim(0)  # give back what the heap kept so far
    _REUSING["on"] = enable


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
                 cuda_graphs: bool = False, compile_options: dict | None = None, freeze: bool = False):
        super().__init__()
        if freeze and not compile:
            raise MinidiffError("freeze=True freezes the weights into the compiled graph: use it with compile=True")
        self.unet = unet
        self.channels_last, self.freeze = channels_last, freeze
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        compile_options = dict(compile_options or {})
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
        t = timestep_tensor(t, x)
        added = () if added_cond_kwargs is None else (added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graphed is not None and x.is_cuda:
            return self.graphed(x, t, context, *added)
        return self.call(x, t, context, *added)


def check_cuda_graphs(device) -> None:
    if torch.device(device).type != "cuda":
        raise MinidiffError(f"cuda_graphs=True needs the model on a CUDA GPU, but it is on {device}: "
                            "drop cuda_graphs, or load with device='cuda'")


def optimize(target, *, channels_last: bool = False, compile: bool = False, freeze: bool = False,
             cuda_graphs: bool = False, attention: str = "sdpa", attention_slice: int | None = None,
             vae_tile_size: int | None = None, compile_options: dict | None = None, reuse_memory: bool = False):
    """Switch on speed options for a Pipeline (returned, changed in place) or a bare UNet (returns a FastUNet).

    attention / attention_slice and reuse_memory are global (minidiff.attention.set_attention_backend,
    reuse_freed_memory: reuse_memory=True switches it on, False leaves it as it is); vae_tile_size applies to
    a Pipeline's VAE decoding; compile also compiles a Pipeline's VAE decoder (in place: its keys are unchanged);
    freeze applies to the UNet (the decoder runs once per image).
    """
    for name, flag in (("channels_last", channels_last), ("compile", compile), ("freeze", freeze),
                       ("cuda_graphs", cuda_graphs), ("reuse_memory", reuse_memory)):
        if not isinstance(flag, bool):
            raise MinidiffError(f"optimize(): {name} must be True or False, got {flag!r}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise MinidiffError(f"optimize(): compile_options must be a dict of torch.compile options, got "
                            f"{type(compile_options).__name__}")
    if attention_slice is not None and (isinstance(attention_slice, bool) or not isinstance(attention_slice, int)):
        raise MinidiffError(f"optimize(): attention_slice must be a whole number of queries, got {attention_slice!r}")
    if not isinstance(attention, str):
        raise MinidiffError(f"optimize(): attention must be 'sdpa' or 'naive', got {attention!r}")
    if getattr(target, "unet", target) is None or not isinstance(getattr(target, "unet", target), nn.Module):
        raise MinidiffError(f"optimize() takes a Pipeline or a UNet, got {type(target).__name__}")
    set_attention_backend(attention, attention_slice)
    if reuse_memory:
        reuse_freed_memory(True)
    if vae_tile_size is not None and (isinstance(vae_tile_size, bool) or not isinstance(vae_tile_size, int)
                                      or vae_tile_size < 8):
        raise MinidiffError(f"vae_tile_size is a size in latent pixels, at least 8 (64 px), got {vae_tile_size!r}")
    unet = getattr(target, "unet", None)
    if unet is None or isinstance(target, FastUNet):  # a bare UNet
        target = getattr(target, "unet", target)  # optimize() again: start from the plain UNet
        if vae_tile_size is not None:
            raise MinidiffError("vae_tile_size applies to a Pipeline's VAE: call optimize(pipe, vae_tile_size=...)")
        if cuda_graphs:
            check_cuda_graphs(next(target.parameters()).device)
        return FastUNet(target, channels_last, compile, cuda_graphs, compile_options, freeze)
    if isinstance(unet, FastUNet):  # optimize() again: start from the plain UNet
        unet = unet.unet
    if cuda_graphs:
        check_cuda_graphs(next(unet.parameters()).device)
    target.unet = FastUNet(unet, channels_last, compile, cuda_graphs, compile_options, freeze)
    for decoder in (target.vae, target.taesd):
        if decoder is None:
            continue
        if channels_last:
            decoder.to(memory_format=torch.channels_last)
        if compile:
            inner = decoder.decoder
            inner.compile(**(compile_options or {}))  # nn.Module.compile: in place, same state_dict keys
    target.vae_tile_size = vae_tile_size
    return target
