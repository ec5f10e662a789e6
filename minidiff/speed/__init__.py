"""Speed options: the same numbers (within the tolerances `minidiff bench` checks), computed faster.

The model files hold the maths (nn.Conv2d, one attention function, a GEGLU feed-forward); what computes it faster
lives here and is put in place per model, never by a global switch:
    cpu_defaults   -> the CPU kernels that measured faster (kernels.py, attention_kernels.py), put in place by
                      the loaders for a model loaded on a CPU: a 3x3 conv of a small map as a matmul, the
                      feed-forward in blocks of tokens, float32 linear layers through oneDNN, bf16 attention
                      through SDPA on a CPU with AMX and blockwise on one with AVX512-BF16 alone
    set_attention  -> the attention kernel of a model's attention modules: "sdpa", "naive", "blockwise", "cpu"
    vae_decode     -> the VAE decode in tiles, and redone in float32 when float16 overflows (vae_decoding.py)
    quantize_int8  -> a model's convolutions and linear layers in 8-bit weights and activations through oneDNN
                      (int8.py; CPU; within the +int8 rung's tolerance of minidiff bench, not the same numbers)
    calibrate_int8 -> its activation scales fixed from calibration calls (static quantization; the +int8 rung)

and the options `optimize(pipe_or_unet, ...)` switches on, each a known technique:
    dtype          -> float16 / bfloat16 weights and activations (half the memory traffic); chosen at loading
    channels_last  -> NHWC memory layout for convolutions, the layout oneDNN (CPU) and cuDNN tensor cores prefer
    compile        -> torch.compile (TorchDynamo + TorchInductor, Ansel et al. 2024, "PyTorch 2"): fused kernels
                      for the UNet and the VAE decoder
    freeze         -> with compile, for inference: Inductor's freezing makes the UNet's weights constants of the
                      compiled graph, folded and pre-packed once into the layouts oneDNN / MKL compute in (without
                      it a CPU convolution reorders its weights on every call); the UNet's weights must not change
                      afterwards (optimize again after loading new ones)
    autotune       -> with compile: Inductor's max_autotune for the UNet: each matmul timed at compile against
                      kernels generated for its shape, the fastest kept; on a CPU C++ GEMM kernels (int8 ones
                      too) and the graph called from C++ (fast_unet.AUTOTUNE_OPTIONS); compiles take about 3x
    cuda_graphs    -> record the UNet's kernels once per input shape and replay them (NVIDIA CUDA Graphs): no
                      per-kernel launch cost from Python; GPU only, static shapes
    attention      -> set_attention's kernel for every model of the pipeline; attention_slice bounds the memory
                      of the attention scores by computing that many queries at a time
    vae_tile_size  -> decode the latent in overlapping tiles of this many latent pixels (bounded VAE memory)
    reuse_memory   -> CPU, Linux (glibc): freed tensors stay in the process's heap and the next step reuses them,
                      instead of returning large blocks to the kernel and faulting in fresh zeroed pages for every
                      new tensor (`reuse_freed_memory`; process-wide, like any allocator setting)

No option adds a host-device synchronisation to the denoising loop: the timestep reaches the UNet as a device
tensor filled on the device (`timestep_tensor`), never copied from the host, and a CUDA graph replay is queued
like any kernel.
"""

import torch
from torch import nn

from minidiff.clip import CLIPAttention
from minidiff.errors import MinidiffError
from minidiff.speed.attention_kernels import attention_kernel, blockwise_attention, cpu_attention
from minidiff.speed.fast_unet import CudaGraphCall, FastUNet, check_compiled, check_cuda_graphs, timestep_tensor
from minidiff.speed.int8 import calibrate_int8, int8_available, quantize_int8
from minidiff.speed.kernels import BlockedFeedForward, MatmulConv3x3, OneDNNLinear, replace_modules
from minidiff.speed.memory import reuse_freed_memory, reuse_memory_available
from minidiff.speed.vae_decoding import decode_in_float32, vae_decode
from minidiff.unet import Attention, UNet
from minidiff.vae import SpatialSelfAttention

__all__ = [
    "BlockedFeedForward", "CudaGraphCall", "FastUNet", "MatmulConv3x3", "OneDNNLinear", "attention_kernel",
    "blockwise_attention", "calibrate_int8",
    "cpu_attention", "cpu_defaults", "decode_in_float32", "int8_available", "optimize", "quantize_int8",
    "reuse_freed_memory", "reuse_memory_available",
    "set_attention", "timestep_tensor", "vae_decode",
]

# the modules that call minidiff.attention.attention with their `.kernel`
ATTENTION_MODULES = (Attention, SpatialSelfAttention, CLIPAttention)


def models_of(target) -> list:
    """The networks in `target`: itself (the plain UNet behind a FastUNet), or a Pipeline's UNet, VAE, text
    encoder and TAESD."""
    parts = [target] if isinstance(target, nn.Module) else [
        getattr(target, name, None) for name in ("unet", "vae", "text_encoder", "taesd")]
    return [part.unet if isinstance(part, FastUNet) else part for part in parts if part is not None]


def device_type(model: nn.Module) -> str | None:
    """Where the model's weights are ("cpu", "cuda", "meta", ...); None when it has none."""
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device.type


def set_attention(target, name: str | None = None, slice_size: int | None = None):
    """Choose the attention kernel of a model (or of every model of a Pipeline); returns target.

    name: "sdpa" (PyTorch's fused kernels), "naive" (the formula written out, minidiff.attention.naive_attention),
    "blockwise" (the formula a block of heads and queries at a time in reused buffers), "cpu" (cpu_attention: bf16
    SDPA with AMX, blockwise in bf16 on a CPU with AVX512-BF16 alone, half precision in float32), or None: the
    default where each model's weights are ("cpu" on a CPU, else "sdpa"). slice_size: at most this many queries at
    a time (bounds the memory of the scores).
    """
    attention_kernel(name or "sdpa", slice_size)  # MinidiffError for a bad name or slice_size, models or not
    for model in models_of(target):
        kernel = attention_kernel(name or ("cpu" if device_type(model) == "cpu" else "sdpa"), slice_size)
        for module in model.modules():
            if isinstance(module, ATTENTION_MODULES):
                module.kernel = kernel
    return target


def cpu_defaults(target):
    """Put the CPU kernels that measured faster in place, in every model of `target` whose weights are on a CPU:
        UNet: MatmulConv3x3 for its 3x3 convolutions, BlockedFeedForward for its feed-forwards
        UNet, VAE, text encoder: OneDNNLinear for their linear layers (float32 products through oneDNN),
                                 cpu_attention (bf16: SDPA with AMX, else blockwise with bf16 instructions)
    Each keeps the plain module's parameters and keys, and computes the plain way wherever it does not win
    (another device or dtype, a large map, under torch.compile). The loaders call it for a model loaded on a CPU;
    a model built from its class (`UNet(config)`) is plain. Returns target.
    """
    for model in models_of(target):
        if device_type(model) != "cpu":
            continue
        if isinstance(model, UNet):
            replace_modules(model, MatmulConv3x3)
            replace_modules(model, BlockedFeedForward)
        replace_modules(model, OneDNNLinear)
        set_attention(model, "cpu")
    return target


def optimize(target, *, channels_last: bool = False, compile: bool = False, freeze: bool = False,
             cuda_graphs: bool = False, attention: str | None = None, attention_slice: int | None = None,
             vae_tile_size: int | None = None, compile_options: dict | None = None, reuse_memory: bool = False,
             autotune: bool = False):
    """Switch on speed options for a Pipeline (returned, changed in place) or a bare UNet (returns a FastUNet).

    attention / attention_slice: set_attention(target, attention, attention_slice) when either is given (None and
    None keep each model's kernel); reuse_memory is process-wide (reuse_freed_memory: True switches it on, False
    leaves it as it is); vae_tile_size applies to a Pipeline's VAE decoding; compile also compiles a Pipeline's VAE
    decoder (in place: its keys are unchanged); freeze applies to the UNet (the decoder runs once per image).
    """
    for name, flag in (("channels_last", channels_last), ("compile", compile), ("freeze", freeze),
                       ("cuda_graphs", cuda_graphs), ("reuse_memory", reuse_memory), ("autotune", autotune)):
        if not isinstance(flag, bool):
            raise MinidiffError(f"optimize(): {name} must be True or False, got {flag!r}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise MinidiffError(f"optimize(): compile_options must be a dict of torch.compile options, got "
                            f"{type(compile_options).__name__}")
    if attention_slice is not None and (isinstance(attention_slice, bool) or not isinstance(attention_slice, int)):
        raise MinidiffError(f"optimize(): attention_slice must be a whole number of queries, got {attention_slice!r}")
    if attention is not None and not isinstance(attention, str):
        raise MinidiffError(f"optimize(): attention must be one of 'sdpa', 'naive', 'blockwise', 'cpu' or None, got "
                            f"{attention!r}")
    if getattr(target, "unet", target) is None or not isinstance(getattr(target, "unet", target), torch.nn.Module):
        raise MinidiffError(f"optimize() takes a Pipeline or a UNet, got {type(target).__name__}")
    if vae_tile_size is not None and (isinstance(vae_tile_size, bool) or not isinstance(vae_tile_size, int)
                                      or vae_tile_size < 8):
        raise MinidiffError(f"vae_tile_size is a size in latent pixels, at least 8 (64 px), got {vae_tile_size!r}")
    check_compiled(compile, freeze, autotune)
    if attention is not None or attention_slice is not None:
        set_attention(target, attention, attention_slice)
    if reuse_memory:
        reuse_freed_memory(True)
    unet = getattr(target, "unet", None)
    if unet is None or isinstance(target, FastUNet):  # a bare UNet
        target = getattr(target, "unet", target)  # optimize() again: start from the plain UNet
        if vae_tile_size is not None:
            raise MinidiffError("vae_tile_size applies to a Pipeline's VAE: call optimize(pipe, vae_tile_size=...)")
        if cuda_graphs:
            check_cuda_graphs(next(target.parameters()).device)
        return FastUNet(target, channels_last, compile, cuda_graphs, compile_options, freeze, autotune)
    if isinstance(unet, FastUNet):  # optimize() again: start from the plain UNet
        unet = unet.unet
    if cuda_graphs:
        check_cuda_graphs(next(unet.parameters()).device)
    target.unet = FastUNet(unet, channels_last, compile, cuda_graphs, compile_options, freeze, autotune)
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
