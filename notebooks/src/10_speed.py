# Source of notebooks/10_speed.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 10: speed: the ladder, profiling, distilled models, ONNX
#
# The same numbers, computed faster: each rung of the ladder switches on one known technique and must stay within
# its dtype's tolerance of fp32 eager. Read beside `course/10_speed.md`, `minidiff/speed/`, `minidiff/bench.py`
# and `minidiff/export.py`.
#
# | rung | technique | where it pays |
# |---|---|---|
# | fp32 eager | the reference | |
# | +fp16 / +bf16 | half the bytes per number | GPUs (tensor cores); CPUs with bf16 instructions |
# | +channels_last | NHWC layout for convolutions | cuDNN, oneDNN |
# | +compile | `torch.compile`: fused kernels (TorchInductor) | GPU, and CPU with a C++ compiler |
# | +freeze | the weights become constants of the compiled graph, pre-packed once | CPU above all (oneDNN, MKL) |
# | +CUDA graphs | record the step's kernels once, replay them | GPU: no per-kernel launch cost |
# | +reuse memory | freed tensors stay in the heap (glibc `mallopt`) | CPU: no page faults for each new tensor |
# | +TAESD | a 141 GFLOP decoder instead of 2,515 (lesson 07) | everywhere |
# | BK-SDM small / tiny | a distilled UNet with blocks removed (Kim et al. 2023) | everywhere |

# %%
import importlib.util
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from minidiff import bench, measure
from minidiff.course.milestones import check
from minidiff.course.viz import course_pipeline, quiet_stderr, show_trace
from minidiff.speed import optimize
from minidiff.unet import UNet, UNetConfig, count_parameters

OUT = Path("out") / "10_speed"
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Distilled models: what removing blocks buys
#
# BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion") removes residual
# and attention blocks from SD 1.4's UNet and distils the smaller network from the full one. Counted on the meta
# device (no weights, no time), one guided UNet call at 512 px:

# %%
flops = {}
for name in ("sd15", "bk_sdm_base", "bk_sdm_small", "bk_sdm_tiny"):
    with torch.device("meta"):
        unet = UNet(getattr(UNetConfig, name)())
        x, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    with FlopCounterMode(display=False) as counter:
        unet(x, 500, context)
    flops[name] = counter.get_total_flops()
    print(f"{name:13s} {count_parameters(unet) / 1e6:6.0f}M parameters  {flops[name] / 1e12:5.2f} TFLOP per step  "
          f"SD 1.5 / this: {flops['sd15'] / flops[name]:4.2f}")

# %% [markdown]
# ## The ladder, measured
#
# `minidiff bench` (here `bench.bench`) runs every rung on the same random weights and inputs and checks each
# against fp32 eager: `max dev` is $\max|out-out_{fp32}|/\max|out_{fp32}|$ of one UNet call, PASS when under
# the dtype's tolerance. The notebook runs the miniature `tiny` UNet at 64 px so that it finishes on any CPU;
# `minidiff bench --config sd15 --size 512` on a GPU is the real measurement. The `+compile` and `+freeze` rows
# are left out, and the rungs after them, which inherit `compile`, use TorchDynamo's `eager` backend: it captures
# the graph without Inductor's C++ code generation, which takes minutes on a CPU (`minidiff bench` runs Inductor).

# %%
header, results = bench.bench("tiny", size=64, steps=2, repeats=1, log=lambda *_: None,
                              rungs=["fp32", "half", "channels_last", "taesd", "bk_small", "bk_tiny"],
                              compile_options={"backend": "eager"})
print(header)
print(measure.format_table(results))

# %% [markdown]
# Read it for the *method*, not for the CPU numbers: on a CPU without bf16 instructions the bf16 rung is emulated
# and slower, and a miniature UNet is dominated by per-operator overhead, not arithmetic. The BK-SDM rungs run
# fewer blocks and are faster everywhere.

# %% [markdown]
# ## Profiling: where a step's time goes
#
# `torch.profiler` on one UNet step (after a warm-up call), the top operators by their own time
# (`minidiff profile` writes the same table, and a chrome://tracing file):

# %%
with quiet_stderr():
    table, _ = bench.profile_unet("tiny", size=64, rows=12)
print(table)

# %% [markdown]
# ## Speed options keep the trace
#
# `optimize(pipe, channels_last=True, ...)` (or `load_pipeline(..., channels_last=True)`) changes how the numbers
# are computed, not which: same seed, same trace, up to float32 rounding (which 20 steps of a random-weight
# network can amplify a little).

# %%
pipe = course_pipeline()
prompt = "a small purple triangle at the bottom left"
plain = pipe(prompt, steps=20, seed=0, trace=True, progress=False)
optimize(pipe, channels_last=True)
fast = pipe(prompt, steps=20, seed=0, trace=True, progress=False)
print(f"max |channels_last - plain| of the final latents: {float((fast.latents - plain.latents).abs().max()):.1e}")
show_trace(fast.trace, title=f"channels_last (the same trace as without): {pipe.source}")

# %% [markdown]
# ## ONNX
#
# `minidiff export-onnx OUT_DIR` (`export_pipeline`) writes the UNet and the VAE decoder as ONNX graphs (batch, size
# and text length dynamic), for runtimes outside PyTorch, and checks each file against PyTorch with onnxruntime on
# inputs of *another* size than the export's. It needs the optional packages onnx, onnxscript and onnxruntime.
# (Export at a size where no feature map shrinks to 1x1: the exporter fixes dimensions of size 1, and the file then
# refuses other sizes.) Here the VAE decoder alone, with the two calls `export_pipeline` makes for it: the UNet's
# export took 125 s on the 2-core CPU this lesson was measured on, too long for a cell (`export_pipeline` does both).

# %%
from minidiff.export import VAEDecode, check_onnx, export_vae_decoder  # noqa: E402

if all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
    with quiet_stderr():
        path = export_vae_decoder(pipe.vae, OUT / "vae_decoder.onnx", latent_size=(16, 16))  # 128 px
        latent = torch.randn(2, pipe.vae.latent_channels, 24, 16, generator=torch.Generator().manual_seed(0))
        error = check_onnx(path, VAEDecode(pipe.vae), {"latent": latent})  # another batch and size
    print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB, exported at a 16x16 latent, checked on 2 latents of "
          f"24x16: max |onnxruntime - PyTorch| = {error:.1e}")
else:
    print("onnx, onnxscript or onnxruntime is not installed: pip install onnx onnxscript onnxruntime")

# %% [markdown]
# ## Milestones
#
# `half_precision` checks fp16 and bf16 numerics (the speed needs a GPU); `bench` runs two rungs of the ladder;
# `realtime` (one image in under a second with the shapes model) and the speed-ups need a GPU and are skipped on
# a CPU; `compile` needs a C++ compiler: `minidiff milestones --only compile`.

# %%
for name in ("half_precision", "bench", "realtime"):
    print(check(name))
