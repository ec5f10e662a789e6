# Source of notebooks/02_ddpm.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 02: DDPM, ancestral sampling
#
# A network $\epsilon_\theta(x_t, t)$ guesses the noise in $x_t$. DDPM (Ho et al. 2020) turns the guess into a
# clean-image estimate $\hat x_0$ and steps to $x_{t-1}$ by sampling the Gaussian posterior
# $q(x_{t-1}\mid x_t, \hat x_0)$ (eq. 6 and 7). Read beside `course/02_ddpm.md` and `sample_ddpm` in
# `minidiff/samplers.py`.
#
# | code name | symbol |
# |---|---|
# | `abar`, `abar_prev` | $\bar\alpha_t$, $\bar\alpha_{t_{prev}}$ |
# | `alpha`, `beta` | $\alpha_t=\bar\alpha_t/\bar\alpha_{t_{prev}}$, $\beta_t=1-\alpha_t$ |
# | `pred_x0` | $\hat x_0=(x_t-\sqrt{1-\bar\alpha_t}\,\epsilon_\theta)/\sqrt{\bar\alpha_t}$ |
# | `coef_x0` | $\sqrt{\bar\alpha_{t_{prev}}}\,\beta_t/(1-\bar\alpha_t)$, weight of $\hat x_0$ in $\tilde\mu_t$ |
# | `coef_xt` | $\sqrt{\alpha_t}\,(1-\bar\alpha_{t_{prev}})/(1-\bar\alpha_t)$, weight of $x_t$ in $\tilde\mu_t$ |
# | `posterior_var` | $\tilde\beta_t=\frac{1-\bar\alpha_{t_{prev}}}{1-\bar\alpha_t}\beta_t$ |

# %%
import math
import time

import torch

from minidiff.course import shapes
from minidiff.course.notebook import use
from minidiff.course.viz import DatasetEpsModel, StepRecorder, course_pipeline, image_grid, show_trace, to_pil
from minidiff.samplers import sample
from minidiff.schedule import NoiseSchedule

# %% [markdown]
# ## A perfect model to sample from
#
# Training a network takes hours (lesson 09). To see what a sampler does we need a model whose every prediction
# is right. If the data is a finite set of pictures $\{y_i\}$, the best possible prediction is known in closed
# form: Bayes' rule gives the probability that $x_t$ came from $y_i$,
# $w_i \propto \exp(-\lVert x_t-\alpha_t y_i\rVert^2 / 2\sigma_t^2)$, and then
# $\hat x_0 = \sum_i w_i y_i$, $\epsilon = (x_t - \alpha_t\hat x_0)/\sigma_t$. `DatasetEpsModel` is exactly
# that, called like a UNet: `model(x_t, t) -> eps`. Our data: 12 pictures from `minidiff.course.shapes`.

# %%
images, captions, _ = shapes.batch(12, seed=0)
model = DatasetEpsModel(images)
print(captions[:3])
image_grid(to_pil(images), columns=12, labels=[f"#{i}" for i in range(12)], title="the 12 training pictures")

# %% [markdown]
# ## Use it: `sample(model, noise, sampler="ddpm")`
#
# All 1000 steps, t = 999, 998, ..., 0, as in the paper (`steps_offset=0`: SD's default offset of 1 would
# start past the last timestep); then 50 (DDPM can skip: it jumps between the visited timesteps, with
# $\alpha_t=\bar\alpha_t/\bar\alpha_{t_{prev}}$ for the whole jump).

# %%
noise = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
samples = sample(model, noise, sampler="ddpm", steps=1000, steps_offset=0, generator=torch.Generator().manual_seed(1))
print(f"1000 DDPM steps on 8 pictures: {time.perf_counter() - start:.1f} s")
image_grid(to_pil(samples), labels=[f"sample {i}" for i in range(8)], title="DDPM, 1000 steps, 8 noises")

# %% [markdown]
# A perfect model of 12 pictures can only give back those 12 pictures: each sample is one of them. The
# distance to the nearest training picture, per sample (pixels in [-1, 1]):

# %%
nearest = torch.cdist(samples.flatten(1), images.flatten(1)).min(dim=1)
print("RMS distance to the nearest training picture:",
      [round(float(d) / math.sqrt(images[0].numel()), 4) for d in nearest.values])
print("which picture:", nearest.indices.tolist())

# %% [markdown]
# A trained network does not memorise its (millions of) pictures this way: it generalises because it cannot
# fit them exactly. Lesson 09 trains one and checks that it draws shape-colour-position combinations that were
# never in its training set.

# %% [markdown]
# ## Re-implement it: the DDPM loop in ten lines
#
# Same timesteps (`schedule.timesteps(50)`: leading spacing, 981, 961, ..., 1), same noise draws from the same
# generator, so the result must match the library's to float rounding.

# %%
# your workbook's lesson_02.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(2)
for name in ("pred_x0", "pred_eps", "ddpm_step"):
    print(mine.check(name))


def my_ddpm(model, x, timesteps, alphas_cumprod, generator):
    """The DDPM loop around your ddpm_step: a noise draw per step, in the library's order."""
    for i, t in enumerate(timesteps):
        abar = float(alphas_cumprod[t])
        abar_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = mine.ddpm_step(x, model(x, t), abar, abar_prev, noise)
    return x


schedule = NoiseSchedule.sd()
ours = my_ddpm(model, noise, schedule.timesteps(50).tolist(), schedule.alphas_cumprod,
               torch.Generator().manual_seed(1))
library = sample(model, noise, sampler="ddpm", steps=50, generator=torch.Generator().manual_seed(1))
print(f"max |mine - minidiff| after 50 DDPM steps: {float((ours - library).abs().max()):.2e} (fp32)")

# %% [markdown]
# ## What the network predicts: $\epsilon$ or $v$
#
# `my_ddpm` reads the model's output as $\epsilon$ (SD 1.x and SD 2.x's 512-pixel base models). SD 2.x's 768-pixel
# models predict the velocity of Salimans & Ho 2022 instead; with $\alpha_t=\sqrt{\bar\alpha_t}$,
# $\sigma_t=\sqrt{1-\bar\alpha_t}$:
# $$v=\alpha_t\,\epsilon-\sigma_t\,x_0,\qquad \hat x_0=\alpha_t\,x_t-\sigma_t\,v,\qquad \hat\epsilon=\sigma_t\,x_t+\alpha_t\,v$$
# ($\alpha_t^2+\sigma_t^2=1$: $(x_t, v)$ is $(x_0,\epsilon)$ rotated by an angle, and rotating back recovers them).
# The samplers only ever see $\hat x_0$ and $\hat\epsilon$: `to_x0_eps` in `minidiff/schedule.py` converts. Check the
# formulas on a real picture, and see what an error of 0.01 in the network's output does to $\hat x_0$:

# %%
from minidiff.course.viz import plot_curves  # noqa: E402
from minidiff.schedule import to_x0_eps  # noqa: E402

x0, eps = images[:1], torch.randn(images[:1].shape, generator=torch.Generator().manual_seed(3))
error = 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
for t in (999, 500, 50):
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    pred_x0, pred_eps = to_x0_eps(v, x_t, alpha, sigma, "v_prediction")
    from_eps = to_x0_eps(eps + error, x_t, alpha, sigma, "epsilon")[0]
    from_v = to_x0_eps(v + error, x_t, alpha, sigma, "v_prediction")[0]
    print(f"t = {t:3d}: max |x0 - (alpha x_t - sigma v)| = {float((pred_x0 - x0).abs().max()):.0e}, "
          f"max |eps - (sigma x_t + alpha v)| = {float((pred_eps - eps).abs().max()):.0e}; an RMS error of 0.01 "
          f"in the output gives x0 off by {rms(from_eps - x0):.4f} from eps, {rms(from_v - x0):.4f} from v")
t = torch.arange(1000)
alpha, sigma = schedule.alpha_sigma(t)
plot_curves(t.tolist(), {"eps-prediction: sigma_t / alpha_t": (sigma / alpha).tolist(),
                         "v-prediction: sigma_t": sigma.tolist()},
            "timestep t", "|error in pred_x0| / |error in the output|",
            "how an error in the network's output reaches pred_x0 (SD's schedule)", log="y", marker="-")

# %% [markdown]
# From $\hat\epsilon$ the error is multiplied by $\sigma_t/\alpha_t$, 14.6 at $t=999$; from $\hat v$ by
# $\sigma_t\le1$. At high noise $\epsilon\approx x_t/\sigma_t$ is easy to guess while the $\hat x_0$ it implies is
# poor, and there the picture's layout is decided; a schedule that ends in pure noise ($\alpha_T=0$, the fix for
# SD's leftover signal in lesson 01) cannot use $\epsilon$ at all. The `pred_eps` milestone checks the conversion
# for both prediction types.

# %% [markdown]
# ## The trace: x_inter and pred_x0
#
# `StepRecorder` is a sampler callback: after every step it keeps the new latent $x_t$ (**x_inter**) and the
# model's clean guess $\hat x_0$ (**pred_x0**). Early on, pred_x0 is the *average* of the pictures that are
# still likely (a blur of several shapes); as the noise falls, one picture wins. x_inter stays noisy to the end:
# DDPM adds fresh noise at every step.

# %%
recorder = StepRecorder()
sample(model, noise[:1], sampler="ddpm", steps=50, generator=torch.Generator().manual_seed(2), callback=recorder)
show_trace(recorder.trace(), title="DDPM, 50 steps, on the perfect model of 12 pictures")

# %% [markdown]
# ## The same on a text-to-image pipeline
#
# `Pipeline(prompt, trace=True)` records the trace and decodes both rows with the VAE. `course_pipeline()` is
# the bundled shapes model when `weights/shapes` is there, and otherwise a tiny random-weight pipeline, whose
# pictures are noise (it says which). The decoded x_inter looks darker and fainter than the pixel-space one above:
# the VAE decodes a latent shrunk by $\alpha_t$, plus noise it was never trained on (lesson 03 measures it).

# %%
pipe = course_pipeline()
result = pipe("a big red circle at the top left", sampler="ddpm", steps=50, seed=0, trace=True, progress=False)
show_trace(result.trace, title=f"DDPM, 50 steps: {pipe.source}")

# %% [markdown]
# **Milestone:** `minidiff milestones --only pred_eps` (turning a network output into $\epsilon$ and $\hat x_0$).
# Next: lesson 03, DDIM, which drops the fresh noise and needs far fewer steps.
