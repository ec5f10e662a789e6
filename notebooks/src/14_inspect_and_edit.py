# Source of notebooks/14_inspect_and_edit.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 14: inspect and edit
#
# Look inside a run and steer it, on the bundled shapes model: cross-attention maps, a writable step callback,
# prompt weights and long prompts, DDIM inversion, inpainting. Read beside `course/14_inspect_and_edit.md`.

# %%
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

# %% [markdown]
# ## Exercises
