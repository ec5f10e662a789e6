# Source of notebooks/14_inspect_and_edit.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 14: inspect and edit
#
# Look inside a run and steer it, on the bundled shapes model: cross-attention maps, a writable step callback,
# prompt weights and long prompts, DDIM inversion, inpainting. Read beside `course/14_inspect_and_edit.md`.

# %%
import torch

from minidiff.course.viz import course_pipeline, show_images

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
# DDIM run backwards: `pipe.invert(picture, prompt)` climbs SD's 50-step grid from the picture's latent to the
# noise that DDIM turns back into it. Below: a rendered picture of a held-out prompt, its noise, and DDIM 50 from
# that noise; then the same climb seen step by step through the callback (x_inter above, pred_x0 below).

# %%
import numpy as np

from minidiff.course import shapes
from minidiff.course.evaluate import held_out_prompts
from minidiff.course.gaussian import convergence_order, inversion_round_trip
from minidiff.course.notebook import use
from minidiff.course.viz import latents_to_pil
from minidiff.images import from_pil, psnr

prompt, spec = held_out_prompts(3)[2]
picture = shapes.render(spec, np.random.default_rng(4))
climb = []
noise = pipe.invert(picture, prompt, steps=50, callback=lambda **info: climb.append(info))
again = pipe(prompt, sampler="ddim", steps=50, guidance_scale=1.0, latents=noise, progress=False).images[0]
fresh = pipe(prompt, sampler="ddim", steps=50, guidance_scale=1.0, seed=1, progress=False).images[0]
print(f"{prompt!r}: round trip {psnr(again, picture):.1f} dB, checker {shapes.check(again) == spec}; "
      f"a fresh seed, same prompt: {psnr(fresh, picture):.1f} dB; noise std {float(noise.std()):.2f}")
show_images([picture, latents_to_pil(noise)[0].resize((64, 64), 0), again, fresh],
            ["the picture", "its noise (ch. 0-2)", "DDIM 50 from it", "DDIM 50, seed 1"])

# %%
chosen = [0, 10, 20, 30, 40, 49]
decoded = [pipe.finish(climb[i]["x"], [], None).images[0] for i in chosen]
predicted = [pipe.finish(climb[i]["pred_x0"], [], None).images[0] for i in chosen]
show_images(decoded + predicted, [f"t={climb[i]['timestep']}" for i in chosen] * 2, columns=len(chosen))

# %% [markdown]
# The order of the round trip, measured on the exact Gaussian model: each doubling of the steps halves the error.

# %%
steps = (10, 20, 40, 80, 160)
errors = inversion_round_trip(steps)
print(", ".join(f"{n}: {e:.3f}" for n, e in zip(steps, errors)), f"-> order {convergence_order(steps, errors):.2f}")

# %% [markdown]
# Write `ddim_inverse_step` and `ddim_invert` in your workbook's `lesson_14.py`; the milestones compare them with
# `minidiff.inversion.invert_ddim` and name the usual mistakes.

# %%
mine = use(14)
for name in ("ddim_inverse_step", "ddim_invert"):
    print(mine.check(name))
with torch.no_grad():
    context = pipe.encode_prompt([prompt])
    x_0 = pipe.vae.encode(from_pil(picture)) * pipe.vae.scaling_factor  # the posterior mean
    x_T = mine.ddim_invert(lambda x, t: pipe.unet(x, t, context), x_0, pipe.schedule.alphas_cumprod, 50)
print(f"max |mine - pipe.invert|: {float((x_T - noise).abs().max()):.1e}")


# %% [markdown]
# ## 5. Repainting part of a picture: inpainting

# %% [markdown]
# ## Exercises
