# Source of notebooks/05_attention.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 05: attention: naive, SDPA, sliced
#
# $$\mathrm{Attention}(Q,K,V)=\mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt d}\right)V\qquad\text{(Vaswani et al. 2017)}$$
#
# One function, `minidiff.attention.attention(q, k, v, heads)`, serves the UNet (self-attention over the latent's
# pixels, cross-attention to the prompt), the VAE's mid-block and the CLIP text encoder. Read beside
# `course/05_attention.md` and `minidiff/attention.py`.
#
# | code name | symbol | shape |
# |---|---|---|
# | `q`, `k`, `v` | $Q$, $K$, $V$ | (B, L, heads * d) in the models; (B, heads, L, d) inside |
# | `heads`, `head_dim` | $h$, $d$ | SD 1.x: 8 heads; $d$ = channels / 8 (40 at the UNet's first level) |
# | `scores` | $QK^\top/\sqrt d$ | (B, heads, L_q, L_k): **quadratic in the number of pixels** |

# %%
import functools

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from minidiff.attention import attention, naive_attention
from minidiff.course.milestones import check
from minidiff.course.notebook import use
from minidiff.course.viz import course_pipeline, median_seconds, plot_curves, quiet_stderr, show_trace
from minidiff.speed import set_attention

# %% [markdown]
# ## Re-implement it, compare it
#
# Our four lines against PyTorch's fused `scaled_dot_product_attention` (SDPA, flash or memory-efficient kernels
# where the device has them) and against the library's own `naive_attention`.

# %%
# your workbook's lesson_05.py (`minidiff course init workbook`); while it is blank, the reference
mine = use(5)
my_attention = mine.attention
generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 8, 256, 40, generator=generator) for _ in range(3))
out = my_attention(q, k, v)
print(f"max |mine - SDPA|            = {float((out - F.scaled_dot_product_attention(q, k, v)).abs().max()):.1e}")
print(f"max |mine - naive_attention| = {float((out - naive_attention(q, k, v)).abs().max()):.1e}")
print(mine.check("attention"))
print(check("attention_kernels"))

# %% [markdown]
# ## Use it: the library's layout and slicing
#
# The models keep $Q$, $K$, $V$ as (B, L, heads * d); `attention` reshapes to heads inside. `slice_size`
# computes that many queries at a time: the scores matrix never exists whole, at the cost of a loop.

# %%
tokens = lambda x: x.transpose(1, 2).flatten(2)  # (B, heads, L, d) -> (B, L, heads * d)  # noqa: E731
full = attention(tokens(q), tokens(k), tokens(v), heads=8)
sliced = attention(tokens(q), tokens(k), tokens(v), heads=8, slice_size=64)
print(f"out {tuple(full.shape)}; max |sliced - full| = {float((sliced - full).abs().max()):.1e}")

# %% [markdown]
# ## How time and memory grow with resolution
#
# The UNet's first self-attention runs over every latent pixel: a 512x512 image has a 64x64 latent, $L=4096$
# tokens, and the naive scores take $8\cdot4096^2$ floats, 512 MiB per image (twice that with guidance's batch
# of two). Below: one attention layer at the first UNet level of SD 1.5 (8 heads, $d=40$) for image sizes 128 to
# 384 px. Time is the median of three calls; memory is the peak of what PyTorch allocates during the call,
# read from the profiler's allocation events.

# %%
def peak_megabytes(function):
    """The largest total of live allocations during `function()`, from torch.profiler's memory events."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    allocations = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in events)
    live = peak = 0
    for _, change in allocations:
        live += change
        peak = max(peak, live)
    return peak / 2**20


backends = {"naive": (naive_attention, None), "SDPA": (None, None), "naive, sliced 256": (naive_attention, 256),
            "SDPA, sliced 256": (None, 256)}  # (kernel, slice_size); kernel None: SDPA
image_sizes = [128, 192, 256, 320, 384]
seconds, megabytes = {name: [] for name in backends}, {name: [] for name in backends}
for size in image_sizes:
    length = (size // 8) ** 2  # latent pixels = tokens
    x = [torch.randn(1, length, 320, generator=generator) for _ in range(3)]
    for name, (kernel, slice_size) in backends.items():
        call = functools.partial(attention, *x, heads=8, slice_size=slice_size, kernel=kernel)
        seconds[name].append(1000 * median_seconds(call))
        megabytes[name].append(peak_megabytes(call))
tokens_per_size = [(s // 8) ** 2 for s in image_sizes]
print("tokens:", tokens_per_size)
for name in backends:
    print(f"{name:18s} ms: {[round(t, 1) for t in seconds[name]]}   peak MiB: {[round(m, 1) for m in megabytes[name]]}")

# %%
plot_curves(tokens_per_size, seconds, "tokens L (latent pixels)", "ms per call", "time, one attention layer", log="xy")

# %%
plot_curves(tokens_per_size, megabytes, "tokens L (latent pixels)", "peak MiB", "memory, one attention layer", log="xy")

# %% [markdown]
# Naive attention's memory is the scores matrix, and grows like $L^2$ (slope 2 on the log-log plot): it holds
# the scores and their softmax at once. SDPA never stores them (it walks over keys in blocks and keeps running
# softmax sums, the FlashAttention idea of Dao et al. 2022), so its memory is the output's, linear in $L$.
# Slicing the naive version bounds the scores to `slice_size` rows. The *time* of all of them grows like $L^2$:
# the work is the same, only the memory traffic differs.

# %% [markdown]
# ## The same trace with every backend
#
# A backend is an implementation, not a model change: the pipeline's trace must not change. Three runs of the
# course pipeline, same seed, three backends, each put in every attention module of the pipeline's models by
# `minidiff.speed.set_attention(pipe, name, slice_size)` (a choice per model: another model keeps its own):

# %%
pipe = course_pipeline()
runs = {}
for name, (backend, slice_size) in {"SDPA": ("sdpa", None), "naive": ("naive", None), "sliced": ("sdpa", 16)}.items():
    set_attention(pipe, backend, slice_size)
    runs[name] = pipe("a green triangle at the bottom right", steps=20, seed=0, trace=True, progress=False)
set_attention(pipe)  # back to the default where the models are (on a CPU: minidiff.speed.cpu_attention)
for name in ("naive", "sliced"):
    difference = float((runs[name].latents - runs["SDPA"].latents).abs().max())
    print(f"max |{name} - SDPA| of the final latents: {difference:.1e}")
show_trace(runs["naive"].trace, title=f"naive attention (the SDPA and sliced traces are the same): {pipe.source}")

# %% [markdown]
# **Milestones:** `minidiff milestones --only attention attention_kernels`. Next: lesson 06, the UNet that all
# these attention layers live in.
