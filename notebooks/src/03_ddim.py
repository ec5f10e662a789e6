# Source of notebooks/03_ddim.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 03: DDIM, eta, skipping steps, x_inter against pred_x0, early exit
#
# DDIM (Song et al. 2021, eq. 12) keeps DDPM's training and changes only the sampler: it writes $x_{t_{prev}}$
# as the predicted clean image, plus the predicted noise pointing back to $x_t$, plus (optionally) fresh
# noise. Read beside `course/03_ddim.md` and `sample_ddim` in `minidiff/samplers.py`.
#
# | code name | symbol (paper: $\alpha_t$ is our $\bar\alpha_t$) |
# |---|---|
# | `a_t`, `a_prev` | $\bar\alpha_t$, $\bar\alpha_{prev}=\bar\alpha_{t_{prev}}$ ($\bar\alpha_0$ after the last step) |
# | `pred_x0` | $\hat x_0=(x_t-\sqrt{1-\bar\alpha_t}\,\epsilon_\theta)/\sqrt{\bar\alpha_t}$ |
# | `sigma_t` | $\sigma_t(\eta)=\eta\sqrt{(1-\bar\alpha_{prev})/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_{prev}}$ |
# | `dir_xt` | $\sqrt{1-\bar\alpha_{prev}-\sigma_t^2}\;\epsilon_\theta$, "the direction pointing to $x_t$" |
#
# $$x_{t_{prev}} = \sqrt{\bar\alpha_{prev}}\,\hat x_0 + \texttt{dir\_xt} + \sigma_t z$$

# %%
import math
import time

import numpy as np
import torch

from minidiff.course import shapes
from minidiff.course.gaussian import GaussianEpsModel
from minidiff.course.viz import (
    DatasetEpsModel,
    StepRecorder,
    course_pipeline,
    image_grid,
    plot_curves,
    show_images,
    show_trace,
    to_pil,
)
from minidiff.course.workbook import use
from minidiff.samplers import sample

images, _, _ = shapes.batch(12, seed=0)
model = DatasetEpsModel(images)  # the perfect denoiser of 12 pictures (lesson 02)
noise = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# %% [markdown]
# ## Use it: eta = 0 is deterministic
#
# With $\eta=0$ there is no fresh noise: the same $x_T$ always gives the same picture, whatever the generator.
# With $\eta=1$, DDIM's $\sigma_t$ equals DDPM's posterior standard deviation and the sampler is DDPM-like.

# %%
def run(eta, seed, steps=50):
    return sample(model, noise, sampler="ddim", steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed))


for eta in (0.0, 0.5, 1.0):
    a, b = run(eta, seed=1), run(eta, seed=2)
    print(f"eta = {eta}: max |run with seed 1 - run with seed 2| = {float((a - b).abs().max()):.3f}")
image_grid(to_pil(torch.cat([run(0.0, 1), run(1.0, 1), run(1.0, 2)])), columns=4)

# %% [markdown]
# Rows: $\eta=0$; $\eta=1$ with one seed; $\eta=1$ with another. Deterministic DDIM maps each $x_T$ to one
# picture, which is what makes DDIM inversion, interpolation between noises and the ODE view (lesson 04) work.

# %% [markdown]
# ## Re-implement it: one DDIM step, then the sampler
#
# `my_ddim_step` has the signature of the `ddim_step` milestone, which compares it with the library on 50
# steps and names the usual mistakes.

# %%
# your workbook's lesson_03.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(3)
my_ddim_step, my_ddim_sample = mine.ddim_step, mine.ddim_sample
for name in ("ddim_step", "timesteps", "ddim_50"):
    print(mine.check(name))
gaussian = GaussianEpsModel(mu=0.5, s=0.8)
x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
mine = my_ddim_sample(gaussian, x_T, gaussian.schedule.alphas_cumprod, 50)
library = sample(gaussian, x_T, sampler="ddim", steps=50)
print(f"max |mine - minidiff|, 50 steps on the Gaussian model: {float((mine - library).abs().max()):.1e} (fp64)")

# %% [markdown]
# ## Skipping steps: how the error falls with N
#
# On Gaussian data (`GaussianEpsModel`, lesson 04) the exact end point of the deterministic sampler is known in
# closed form, so the error of N DDIM steps can be measured against the truth. With "trailing" spacing every N
# starts at $t=999$ and ends at the noise level of $t=0$, $\sigma=\sqrt{(1-\bar\alpha_0)/\bar\alpha_0}$:
# $x(\sigma)-\mu = (x(\sigma_{max})-\mu)\sqrt{s^2+\sigma^2}/\sqrt{s^2+\sigma_{max}^2}$, in VP space
# $x_t = x(\sigma)/\sqrt{1+\sigma^2}$.

# %%
sigmas = gaussian.schedule.sigmas
sigma_max, sigma_end = float(sigmas[-1]), float(sigmas[0])
x_start = x_T * math.sqrt(1 + sigma_max**2)
exact = (gaussian.mu + (x_start - gaussian.mu) * math.sqrt(gaussian.s**2 + sigma_end**2)
         / math.sqrt(gaussian.s**2 + sigma_max**2)) / math.sqrt(1 + sigma_end**2)
step_counts = [5, 10, 20, 50, 100, 200]
errors = [float((sample(gaussian, x_T, sampler="ddim", steps=n, spacing="trailing") - exact).abs().mean())
          for n in step_counts]
for n, e in zip(step_counts, errors):
    print(f"{n:4d} steps: mean |x - exact| = {e:.5f}")
order = -(math.log(errors[-1]) - math.log(errors[2])) / (math.log(step_counts[-1]) - math.log(step_counts[2]))
print(f"measured order between 20 and 200 steps: {order:.2f} (DDIM is a first-order method: error ~ 1/N)")
plot_curves(step_counts, {"DDIM (eta = 0)": errors}, "steps N", "mean |x - exact|", "DDIM against the exact ODE "
            "solution (Gaussian data)", log="xy")

# %% [markdown]
# ## x_inter against pred_x0
#
# The trace shows DDIM's two estimates. $x_t$ (x_inter) loses its noise only at the rate the schedule allows;
# $\hat x_0$ (pred_x0) is a *clean* guess from the first step and settles long before the end. The curves
# measure it: the mean distance of each to the answer (the last step's pred_x0), step by step. x_inter never
# quite reaches it: SD's DDIM ends on $\bar\alpha_0 = 0.99915$, not 1 (diffusers' `set_alpha_to_one=False`),
# so the final latent keeps noise of standard deviation $\sqrt{1-\bar\alpha_0}=0.029$.

# %%
recorder = StepRecorder()
final = sample(model, noise[:1], sampler="ddim", steps=50, callback=recorder)
answer = recorder.steps[-1]["pred_x0"]
to_answer = {
    "x_inter": [float((s["x"] - answer).abs().mean()) for s in recorder.steps],
    "pred_x0": [float((s["pred_x0"] - answer).abs().mean()) for s in recorder.steps],
}
plot_curves(range(50), to_answer, "step", "mean |. - answer|", "DDIM 50 steps, perfect model", marker=".-")

# %%
show_trace(recorder.trace(), title="DDIM, 50 steps, eta = 0, on the perfect model of 12 pictures")

# %% [markdown]
# ## Early exit: stop at step 35 of 50 and return pred_x0
#
# If pred_x0 has settled, the last steps only polish it. `early_exit=35` (or `0.7`, a fraction) stops after
# step 35 and returns that step's pred_x0. On the perfect model:

# %%
step_35 = recorder.steps[34]["pred_x0"]
print(f"perfect model: mean |pred_x0 at step 35 - answer| = {float((step_35 - answer).abs().mean()):.5f}, "
      f"mean |pred_x0 at step 35 - final x_inter| = {float((step_35 - final).abs().mean()):.4f} (pixels in [-1, 1])")
early = sample(model, noise[:1], sampler="ddim", steps=50, early_exit=35)
print("sample(..., early_exit=35) returns it:", torch.equal(early, step_35))

# %% [markdown]
# And on the text-to-image pipeline, where each step is a UNet call (two, with guidance) and the time matters.
# The speed-up is measured, not assumed: median of three runs of each.

# %%
pipe = course_pipeline()
options = dict(sampler="ddim", steps=50, seed=0, guidance_scale=5.0, progress=False)
prompt = "a big red circle at the top left"


def timed(**extra):
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        result = pipe(prompt, **options, **extra)
        seconds.append(time.perf_counter() - start)
    return result, sorted(seconds)[1]


full, full_s = timed()
early, early_s = timed(early_exit=35)
pixels = lambda result: torch.from_numpy(np.asarray(result.images[0], dtype=np.float32))  # noqa: E731
print(f"50 steps: {full_s:.2f} s; early exit at 35: {early_s:.2f} s; speed-up {full_s / early_s:.2f}x "
      f"(the step ratio 50 / 35 is {50 / 35:.2f}x; text encoding and decoding are shared)")
print(f"mean |early - full| = {float((pixels(early) - pixels(full)).abs().mean()):.1f} of 255 per pixel channel")
show_images([full.images[0], early.images[0]], ["50 steps", "early exit at 35"], size=2.2, title=pipe.source)

# %%
traced = pipe(prompt, **options, trace=True, early_exit=35)
show_trace(traced.trace, steps=[0, 10, 20, 25, 30, 34], title=f"DDIM, early exit at step 35: {pipe.source}")

# %% [markdown]
# **Milestones:** `minidiff milestones --only ddim_step ddim_50`. Next: lesson 04, where DDIM turns out to be
# Euler's method on an ODE, and higher-order solvers need even fewer steps.
