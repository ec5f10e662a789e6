# Source of notebooks/07_vae.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 07: the VAE and TAESD
#
# Stable Diffusion does not denoise pixels: it denoises the 8x-smaller latents of an autoencoder (Rombach et al.
# 2022). A 512x512x3 picture becomes a 64x64x4 latent, 48 times fewer numbers, and the UNet's cost shrinks with
# it. Read beside `course/07_vae.md`, `minidiff/vae.py` and `minidiff/taesd.py`.
#
# | code name | symbol |
# |---|---|
# | `image` | $x\in[-1,1]$, (B, 3, H, W) |
# | `mean`, `logvar` | the encoder's posterior $q(z\mid x)=\mathcal N(\mu,\sigma^2)$ |
# | `latent` | $z$, (B, 4, H/8, W/8), **unscaled** |
# | `scaling_factor` | $1/\mathrm{std}(z)$ over the training set (0.18215 for SD 1.x/2.x): the UNet sees $z\cdot$ `scaling_factor` |

# %%
import copy
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from minidiff.course import shapes
from minidiff.course.notebook import use
from minidiff.course.viz import course_pipeline, image_grid, latents_to_pil, show_images, show_trace, to_pil
from minidiff.speed import vae_decode
from minidiff.taesd import TAESD
from minidiff.unet import count_parameters
from minidiff.vae import AutoencoderKL, VAEConfig

pipe = course_pipeline()
vae = pipe.vae
images, captions, _ = shapes.batch(64, seed=1)

# %% [markdown]
# ## Use it: encode, look at the latent, decode
#
# `vae.encode(image)` returns the posterior mean $\mu$ (`sample=True` draws from $q(z\mid x)$ instead);
# `vae.decode(z)` maps back. The 4 latent channels are not colours, but they are still a small picture: three of
# them shown as RGB, each stretched to its own range.

# %%
with torch.no_grad():
    z = vae.encode(images[:6])
    reconstruction = vae.decode(z)
print(f"image {tuple(images[:6].shape)} -> latent {tuple(z.shape)} -> image {tuple(reconstruction.shape)}")
print(f"mean |reconstruction - image| = {float((reconstruction.clamp(-1, 1) - images[:6]).abs().mean()):.3f} "
      f"(pixels in [-1, 1]; {pipe.source})")
show_images(to_pil(images[:6]) + latents_to_pil(z) + to_pil(reconstruction),
            ["picture (64x64)"] * 6 + [f"latent {tuple(z.shape[2:])}, ch 0-2"] * 6 + ["decoded"] * 6, columns=6,
            size=1.3, title="pictures, their latents (channels 0-2 as RGB), and the decoded latents")

# %% [markdown]
# ## The scaling factor
#
# The UNet was trained on latents of unit variance: $z\cdot s$ with $s=1/\mathrm{std}(z)$ measured over the
# training pictures (section 4.3.2 of the paper; SD's is 0.18215). Forget it, and the sampler's latents decode
# to a washed-out or saturated picture. Measure it over 64 shapes pictures and compare with the model's own:

# %%
with torch.no_grad():
    latents = vae.encode(images)
measured = 1 / float(latents.std())
print(f"1 / std(z) over 64 pictures = {measured:.4f}; the model's scaling_factor = {vae.scaling_factor:.4f}")


# your workbook's lesson_07.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(7)
my_scale_latents, my_decode_latents = mine.scale_latents, mine.decode_latents
print(mine.check("scale_latents"))
print(mine.check("decode_latents"))

# %%
result = pipe("a large white square at the top", steps=20, seed=0, progress=False)
with torch.no_grad():
    forgot = vae.decode(result.latents)  # the scaling factor not undone
show_images([result.images[0], to_pil(forgot)[0]], ["decode(latents / s)", "decode(latents): forgot s"], size=2.2,
            title=pipe.source)

# %% [markdown]
# ## TAESD: a 2.4M-parameter stand-in
#
# TAESD (Ollin Boer Bohan, 2023) is a decoder (and encoder) distilled from the SD VAE: plain convolutions and
# ReLUs, no normalisation, no attention, and it works directly on the *scaled* latents (its `scaling_factor` is
# 1). It decodes previews at every step almost for free. Sizes and cost, full SD VAE against TAESD (random
# weights: the cost of a network does not depend on its weights):

# %%
with torch.device("meta"):
    sd_vae, tiny_ae = AutoencoderKL(VAEConfig.sd()), TAESD()
    z_512 = torch.randn(1, 4, 64, 64)
flops = {}
for name, decoder in (("SD VAE", sd_vae), ("TAESD", tiny_ae)):
    with FlopCounterMode(display=False) as counter:
        decoder.decode(z_512)
    flops[name] = counter.get_total_flops()
    print(f"{name:7s} decoder {count_parameters(decoder.decoder):>11,} parameters, "
          f"{flops[name] / 1e9:7.0f} GFLOP to decode a 512x512 picture")

sd_vae, tiny_ae = AutoencoderKL(VAEConfig.sd()).eval(), TAESD().eval()
z_128 = torch.randn(1, 4, 16, 16)
for name, decoder in (("SD VAE", sd_vae), ("TAESD", tiny_ae)):
    with torch.no_grad():
        decoder.decode(z_128)  # warm-up
        start = time.perf_counter()
        decoder.decode(z_128)
    print(f"{name:7s} decodes a 128x128 picture in {1000 * (time.perf_counter() - start):.0f} ms on this CPU")
del sd_vae

# %% [markdown]
# The bundled shapes model ships no TAESD trained for *its* latents, so the preview trace below uses random
# TAESD weights: it shows how `preview="taesd"` routes the trace's decoding, not what a trained TAESD draws (with
# SD 1.5's latents, `load_pipeline("sd15", taesd="taesd")` gives real previews, lesson 11).

# %%
pipe.taesd = tiny_ae
traced = pipe("a large white square at the top", steps=20, seed=0, trace=True, preview="taesd", progress=False)
show_trace(traced.trace, title="trace decoded by TAESD (random weights: mechanics only)")

# %%
pipe.taesd = None
reference = pipe("a large white square at the top", steps=20, seed=0, trace=True, progress=False)
show_trace(reference.trace, title=f"the same run decoded by the VAE ({pipe.source})")

# %% [markdown]
# ## fp16 and the black-image bug
#
# float16 holds numbers up to 65,504. Some VAE decoders carry activations larger than that in a few channels
# (SD-XL's does on most pictures, hence its `force_upcast` flag and the retrained "fp16-fix" VAE; SD 2.x's on some
# pictures): in float16 they become `inf`, the next GroupNorm turns them into `NaN`, and `NaN` pixels are saved as
# black. To see it on our small VAE we make one layer loud: `up_blocks[-1].resnets[-1].conv2` scaled until its
# output reaches about $2\cdot10^5$. In float32 the following GroupNorm absorbs it and the picture is fine.

# %%
loud = copy.deepcopy(vae).float()
layer = loud.decoder.up_blocks[-1].resnets[-1]
largest = {}
layer.register_forward_hook(lambda module, inputs, out: largest.update(value=float(out.float().abs().max())))
conv_output = {}
probe = layer.conv2.register_forward_hook(lambda module, inputs, out: conv_output.update(value=float(out.abs().max())))
z = z_128[:, :, :8, :8]
with torch.no_grad():
    loud.decode(z)
    probe.remove()
    scale = 2e5 / conv_output["value"]
    layer.conv2.weight.mul_(scale)
    layer.conv2.bias.mul_(scale)
    fp32 = loud.decode(z)
print(f"conv2 scaled by {scale:.3g}")
print(f"float32: largest activation after it {largest['value']:.3g}, picture finite: {bool(fp32.isfinite().all())}")
half = copy.deepcopy(loud).half()
with torch.no_grad():
    raw = half.decode(z.half())  # the plain decode: no safety net
print(f"float16: largest activation {largest['value']}, NaN pixels: {float(raw.isnan().float().mean()):.0%}")
show_images(to_pil(fp32) + to_pil(raw.float()), ["float32", "float16: NaN -> black"], size=2.0)

# %% [markdown]
# `minidiff.speed.vae_decode(vae, z)`, which the pipeline decodes with, checks the float16 output once, after the
# whole decode (one device sync), and redoes it in float32 with a warning: it converts the decoder to float32
# (`decode_in_float32`), which stays so from then on, and checks that the redone picture is finite. The redone
# picture differs from the float32 one only by the float16 rounding of the weights themselves:

# %%
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter("always")
    fixed = vae_decode(half, z.half())
print("warning:", [str(w.message) for w in caught])
print(f"dtype {fixed.dtype}; max |fixed - float32| = {float((fixed - fp32).abs().max()):.4f}")

# %% [markdown]
# ## fp16 against fp32: the trace
#
# The whole pipeline in float16 (the usual GPU setting; on a CPU it is slow and only for the comparison) against
# float32, same seed:

# %%
half_pipe = course_pipeline(dtype=torch.float16)
fp16 = half_pipe("a large white square at the top", steps=20, seed=0, trace=True, progress=False)
difference = (fp16.latents.float() - reference.latents).abs()
print(f"final latents: max |fp16 - fp32| = {float(difference.max()):.3f}, mean {float(difference.mean()):.4f}")
show_trace(fp16.trace, title=f"float16 (compare with the float32 trace above): {half_pipe.source}")
image_grid([reference.images[0], fp16.images[0]], labels=["float32", "float16"], title="final pictures, seed 0",
           scale=2)

# %% [markdown]
# **Milestones:** `minidiff milestones --only vae scale_latents decode_latents half_precision`. Next: lesson 08,
# the text side.
