# Source of notebooks/06_unet.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 06: the UNet
#
# The network behind every pred_x0 so far: $\epsilon_\theta(x_t, t, c)$, a UNet (Ronneberger et al. 2015) of
# ResNet blocks that see the timestep, and transformer blocks that see the prompt (Rombach et al. 2022).
# Read beside `course/06_unet.md` and `minidiff/unet.py`, whose attribute names are the diffusers keys
# (`down_blocks.0.resnets.0.conv1`, `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`, ...).
#
# | code name | symbol |
# |---|---|
# | `x`, `t`, `context` | $x_t$ (B, 4, H, W), $t$, $c$ (B, 77, 768) |
# | `emb` | MLP(sinusoidal embedding of $t$), added inside every ResnetBlock |
# | `attn1`, `attn2` | self-attention over pixels; cross-attention to the text |
# | skips | each down block's outputs, concatenated to the up blocks' inputs in reverse |

# %%
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from minidiff.course.viz import StepRecorder, course_pipeline, show_trace
from minidiff.course.workbook import use
from minidiff.unet import UNet, UNetConfig, count_parameters, timestep_embedding

# %% [markdown]
# ## Use it: the presets, on the meta device
#
# A model built on `torch.device("meta")` has shapes but no numbers: SD 1.5's 860M parameters cost no memory
# and no time, and it can even run forward to propagate shapes and count operations.

# %%
presets = ("sd15", "sd21", "bk_sdm_base", "bk_sdm_small", "bk_sdm_tiny", "tiny")
for name in presets:
    with torch.device("meta"):
        unet = UNet(getattr(UNetConfig, name)())
    config = unet.config
    print(f"{name:13s} {count_parameters(unet):>13,} parameters  channels {config.block_out_channels}  "
          f"layers/block {config.layers_per_block}  mid-block {config.mid_block}  text {config.cross_attention_dim}")

# %% [markdown]
# ## Shapes through SD 1.5, and where the arithmetic goes
#
# One call of SD 1.5's UNet at 512x512 (a 64x64 latent) on the guidance batch of two, on the meta device.
# Forward hooks print what each top-level block returns; `FlopCounterMode` counts the floating-point
# operations of each op.

# %%
with torch.device("meta"):
    sd15 = UNet(UNetConfig.sd15())
    x, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
shapes = []  # (block, output shape), in the order the blocks run


def record_shape(name):
    def hook(module, inputs, out):
        out = out[0] if isinstance(out, tuple) else out  # down blocks also return their skips
        shapes.append((name, tuple(out.shape)))
    return hook


blocks = {name: m for name, m in sd15.named_children() if name not in ("down_blocks", "up_blocks")}
blocks |= {f"down_blocks.{i}": block for i, block in enumerate(sd15.down_blocks)}
blocks |= {f"up_blocks.{i}": block for i, block in enumerate(sd15.up_blocks)}
for name, module in blocks.items():
    module.register_forward_hook(record_shape(name))
with FlopCounterMode(display=False) as counter:
    sd15(x, 500, context)
for name, shape in shapes:
    print(f"{name:15s} -> {shape}")
by_op = counter.get_flop_counts()["Global"]
total = sum(by_op.values())
print(f"\n{total / 1e12:.2f} TFLOP per call (2 images), of which:",
      ", ".join(f"{str(op).split('.')[-1]} {100 * n / total:.0f}%" for op, n in by_op.items()))

# %% [markdown]
# ## Re-implement it: the timestep embedding and a ResnetBlock
#
# The timestep enters as a sinusoidal embedding (Vaswani et al. 2017), SD's order: all cosines, then all sines,
# frequencies $10000^{-i/(dim/2)}$. A ResnetBlock is GroupNorm, SiLU, 3x3 conv, plus the projected embedding,
# GroupNorm, SiLU, 3x3 conv, plus the skip (He et al. 2016).

# %%
# your workbook's lesson_06.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(6)
my_timestep_embedding, my_resblock = mine.timestep_embedding, mine.resblock
t = torch.tensor([0.0, 10.0, 999.0])
difference = float((my_timestep_embedding(t, 320) - timestep_embedding(t, 320)).abs().max())
print(f"max |mine - minidiff| timestep embedding: {difference:.1e}")
print(mine.check("timestep_embedding"))
print(mine.check("resblock"))

# %% [markdown]
# And one block of the course pipeline's own UNet, with its own weights:

# %%
pipe = course_pipeline()
unet = pipe.unet
block = unet.down_blocks[0].resnets[0]
channels = unet.config.block_out_channels[0]
x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
emb = unet.time_embedding(timestep_embedding(torch.tensor([500.0]), channels))
with torch.no_grad():
    mine = my_resblock(x, emb, block.state_dict(), groups=unet.config.norm_num_groups, eps=unet.config.norm_eps)
    theirs = block(x, emb)
print(f"down_blocks.0.resnets.0: max |mine - minidiff| = {float((mine - theirs).abs().max()):.1e} (fp32)")

# %% [markdown]
# ## The trace, one UNet call at a time
#
# Every pred_x0 in a trace is one (guided) UNet call, converted: $\hat x_0 = (x_t-\sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$
# with $\hat\epsilon=\epsilon_u + w(\epsilon_c-\epsilon_u)$ (lesson 08). Record a DDIM run, then redo step 10 by
# hand from the latent the sampler held before it:

# %%
prompt, guidance_scale = "a large yellow circle on the right", 5.0
recorder = StepRecorder()
result = pipe(prompt, sampler="ddim", steps=20, guidance_scale=guidance_scale, seed=0, callback=recorder,
              trace=True, progress=False)
step = 10
x_t, t = recorder.steps[step - 1]["x"], recorder.steps[step]["timestep"]
with torch.no_grad():
    cond, uncond = pipe.encode_prompt([prompt]), pipe.encode_prompt([""])
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).chunk(2)
eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
alpha_bar = float(pipe.schedule.alphas_cumprod[t])
pred_x0 = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
print(f"step {step} (t = {t}): max |my pred_x0 - the sampler's| = "
      f"{float((pred_x0 - recorder.steps[step]['pred_x0']).abs().max()):.1e}")
show_trace(result.trace, title=f"DDIM, 20 steps: each pred_x0 is one guided UNet call ({pipe.source})")

# %% [markdown]
# **Milestones:** `minidiff milestones --only timestep_embedding resblock unet` (the `unet` milestone builds your
# `UNet(config)` class, loads reference weights into it by the diffusers keys and compares outputs).
# Next: lesson 07, the VAE that turns the latents into pictures.
