# Source of notebooks/14_inspect_and_edit.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 14: inspect and edit
#
# Look inside a run and steer it, on the bundled shapes model: cross-attention maps, a writable step callback,
# prompt weights and long prompts, DDIM inversion, inpainting. Read beside `course/14_inspect_and_edit.md`.

# %%
import numpy as np
import torch

from minidiff.course.viz import course_pipeline, image_grid, show_images

pipe = course_pipeline()
torch.manual_seed(0)

# %% [markdown]
# ## 1. Which word drew which pixels: cross-attention maps

# %% [markdown]
# ## 2. Steering mid-run: a writable step callback

# %% [markdown]
# ## 3. Weighting words, and prompts past 77 tokens

# %% [markdown]
# ## 4. Back to the noise: DDIM inversion

# %% [markdown]
# ## 5. Repainting part of a picture: inpainting
#
# A picture, a mask (white: repaint, black: keep) and a prompt. The shapes model is an ordinary 4-channel model,
# so it repaints by **latent blending** (`minidiff.inpaint`): after every step the part outside the mask is put back
# as the picture noised to the level the sampler has reached, $x_t \leftarrow m\,x_t + (1-m)(\alpha_t z_0 +
# \sigma_t\epsilon)$, and after the last step as the picture itself. Here a red circle at the top left is replaced
# by whatever the held-out prompts ask for there.

# %%
from minidiff import inpaint
from minidiff.course import shapes
from minidiff.course.inpainting import place_mask, psnr, source_picture
from minidiff.course.notebook import use

asked = [("cyan", "square"), ("white", "circle"), ("orange", "triangle")]
picture, source = source_picture("top left", asked, seed=0)
mask = place_mask("top left")
prompts = [f"a {colour} {shape} in the top left" for colour, shape in asked]
result = pipe(prompts, image=picture, mask=mask, steps=20, seed=0, progress=False)
kept = np.asarray(mask) < 128
outside = [psnr(np.asarray(image)[kept], np.asarray(picture)[kept]) for image in result.images]
show_images([picture, mask.convert("RGB"), *result.images],
            ["picture", "mask", *[f"{p.removeprefix('a ')}\nreads: {shapes.check(i).colour} {shapes.check(i).shape}"
                                 for p, i in zip(prompts, result.images)]], size=1.6)

# %%
print("PSNR of the kept pixels against the picture:", ", ".join(f"{v:.1f} dB" for v in outside))

# %% [markdown]
# Your `blend_latents` (the workbook's `lesson_14.py`) is that one line; the milestone compares it with
# `minidiff.inpaint.blend` and names the usual mistakes (the clean picture instead of the noised one, the mask
# read the wrong way round). Then the same inpainting with your blend in place of the library's:

# %%
mine = use(14)
print(mine.check("blend_latents"))
original_blend = inpaint.blend
inpaint.blend = mine.blend_latents  # minidiff.inpaint.blended looks the blend up at each call
try:
    yours = pipe(prompts[:1], image=picture, mask=mask, steps=20, seed=0, progress=False)
finally:
    inpaint.blend = original_blend
difference = np.abs(np.asarray(yours.images[0], dtype=float) - np.asarray(result.images[0], dtype=float)).max()
print(f"largest pixel difference to the library's picture: {difference:.0f} (of 255)")

# %% [markdown]
# ## Exercises
