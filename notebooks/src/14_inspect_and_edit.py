# Source of notebooks/14_inspect_and_edit.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 14: inspect and edit
#
# Look inside a run and steer it, on the bundled shapes model: cross-attention maps, a writable step callback,
# prompt weights and long prompts, DDIM inversion, inpainting. Read beside `course/14_inspect_and_edit.md`.

# %%
import torch

from minidiff.course.viz import course_pipeline, image_grid

pipe = course_pipeline()
torch.manual_seed(0)

# %% [markdown]
# ## 1. Which word drew which pixels: cross-attention maps

# %% [markdown]
# `attention_maps=True` records every cross-attention layer's softmax over the text tokens, for the prompt's half of
# the batch, and sums it over heads, layers (upsampled to the latent size) and steps. Each row below: the picture,
# then one heat map per token (pale: where the token was read most).

# %%
from minidiff.images import attention_grid

prompts = ["a large red circle in the top left", "a small blue square at the bottom centre"]
result = pipe(prompts, steps=20, seed=0, progress=False, attention_maps=True)
attention_grid(result.images, result.attention_maps)

# %% [markdown]
# The hook wraps each `attn2` module's kernel and puts it back afterwards: the picture is bit-identical with and
# without it. Below, your aggregation beside the library's on the probabilities of one UNet call, then the milestone.

# %%
from minidiff.attention_maps import record_attention, token_maps
from minidiff.course.notebook import use

mine = use(14)
probs = []
with record_attention(pipe.unet, 1, 8, 8) as recorder:
    recorder.add = lambda q, k, mask=None: probs.append(((q[-1:] / q.shape[-1] ** 0.5) @ k[-1:].transpose(-2, -1))
                                                        .softmax(-1))
    pipe("a large red circle in the top left", steps=1, seed=0, progress=False)
print(f"{len(probs)} layers:", [tuple(p.shape) for p in probs])
difference = (mine.aggregate_attention(probs, 8, 8) - token_maps(probs, 8, 8)).abs().max()
print(f"yours against the library: max |diff| {float(difference):.1e}")
print(mine.check("aggregate_attention"))

# %% [markdown]
# ## 2. Steering mid-run: a writable step callback

# %% [markdown]
# A callback that returns something changes the run: a latent to go on from, or `{"guidance_scale": w}`. Here the
# guidance goes off after 40% of the steps (diffusers' SDCFGCutoffCallback), and a second callback pulls the latent
# towards its own pred_x0 halfway through.

# %%
from minidiff.steering import guidance_cutoff

prompt, base = "a large green triangle on the right", dict(steps=20, seed=3, progress=False)
full = pipe(prompt, **base)
cut = pipe(prompt, callback=guidance_cutoff(20, 0.4), **base)
scales = []


def watch(step, timestep, sigma, x, pred_x0, guidance_scale):
    scales.append(guidance_scale)
    return {"x": 0.5 * x + 0.5 * pred_x0} if step == 10 else None  # a nudge towards the clean guess


nudged = pipe(prompt, callback=watch, **base)
print("guidance seen by the callback:", scales[:3], "...")
image_grid([full.images[0], cut.images[0], nudged.images[0]], labels=["guided all the way", "cut after 40%",
                                                                       "nudged at step 10"], scale=2)

# %%
print(mine.check("guidance_cutoff_callback"))

# %% [markdown]
# ## 3. Weighting words, and prompts past 77 tokens

# %% [markdown]
# ## 4. Back to the noise: DDIM inversion

# %% [markdown]
# ## 5. Repainting part of a picture: inpainting

# %% [markdown]
# ## Exercises
