# Source of notebooks/01_forward_process.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 01: the forward process and noise schedules
#
# Diffusion models learn to undo one fixed, known corruption: Gaussian noise added in 1000 small steps.
# This notebook **uses** `minidiff.schedule`, **re-implements** `alphas_cumprod` and `add_noise` in a few lines,
# and **compares** the numbers. Read it beside `course/01_forward_process.md` and `minidiff/schedule.py`.
#
# | code name | symbol | meaning |
# |---|---|---|
# | `betas[t]` | $\beta_t$ | variance added at training step $t$ |
# | `alphas_cumprod[t]` | $\bar\alpha_t=\prod_{s\le t}(1-\beta_s)$ | signal kept after $t$ steps |
# | `alpha_t, sigma_t` | $\sqrt{\bar\alpha_t},\ \sqrt{1-\bar\alpha_t}$ | $x_t=\alpha_t x_0+\sigma_t\epsilon$ |
# | `log_snr[t]` | $\lambda_t=\log\frac{\bar\alpha_t}{1-\bar\alpha_t}$ | log signal-to-noise ratio |

# %%
import torch

from minidiff.course import shapes
from minidiff.course.viz import plot_schedules, show_images, show_trace, to_pil
from minidiff.course.workbook import use
from minidiff.pipeline import TraceStep
from minidiff.schedule import NoiseSchedule

_ = torch.manual_seed(0)

# %% [markdown]
# ## Use it: the schedule Stable Diffusion was trained with
#
# SD 1.x and 2.x use `scaled_linear`: $\sqrt{\beta_t}$ linear from $\sqrt{0.00085}$ to $\sqrt{0.012}$ over
# $T=1000$ steps. DDPM's original `linear` schedule and the `squaredcos_cap_v2` (cosine) schedule of
# Nichol & Dhariwal 2021 are plotted beside it.

# %%
schedules = {
    "SD scaled_linear": NoiseSchedule.sd(),
    "DDPM linear": NoiseSchedule(1000, 0.0001, 0.02, "linear"),
    "cosine": NoiseSchedule(beta_schedule="squaredcos_cap_v2"),
}
for name, schedule in schedules.items():
    a = schedule.alphas_cumprod
    print(f"{name:17s} alpha_bar_0 = {a[0]:.5f}   alpha_bar_499 = {a[499]:.4f}   alpha_bar_999 = {a[999]:.2e}"
          f"   signal left at t=999: alpha_t = {a[999].sqrt():.4f}")
plot_schedules(schedules)

# %% [markdown]
# SD's schedule keeps $\alpha_{999}=\sqrt{\bar\alpha_{999}}\approx 0.068$ of the image at the last step: the
# noisiest training input is not pure noise. Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
# Steps are Flawed") show the consequence: a model trained so never learns to generate from pure noise the
# overall brightness that leaks through, which is why SD struggles with very dark or very bright images.

# %% [markdown]
# ## Re-implement it: alphas_cumprod and add_noise
#
# $\beta_t = \big(\sqrt{\beta_0} + \tfrac{t}{T-1}(\sqrt{\beta_{T-1}}-\sqrt{\beta_0})\big)^2$,
# $\bar\alpha_t = \prod_{s\le t}(1-\beta_s)$ and
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$.

# %%
# your workbook's lesson_01.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(1)
my_alphas_cumprod, my_add_noise = mine.alphas_cumprod, mine.add_noise

library = NoiseSchedule.sd().alphas_cumprod
print("max |mine - minidiff| alphas_cumprod:", float((my_alphas_cumprod().double() - library).abs().max()))
print(mine.check("betas"))
print(mine.check("alphas_cumprod"))
print(mine.check("add_noise"))

# %% [markdown]
# ## Compare: noising a picture
#
# One 64x64 picture from the shapes dataset (`minidiff.course.shapes`), noised at six timesteps, with our function
# and with the library's `NoiseSchedule.add_noise`. (SD noises its 64x64x4 *latents*, lesson 07; pixels are
# easier to look at.)

# %%
x0 = shapes.to_tensor(shapes.render(shapes.ShapeSpec("circle", "red", "centre")))[None]
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
schedule = NoiseSchedule.sd()
timesteps = [0, 100, 250, 500, 750, 999]
noised = [schedule.add_noise(x0, noise, t) for t in timesteps]
mine = [my_add_noise(x0, noise, schedule.alphas_cumprod[t].float()) for t in timesteps]
print("max |mine - minidiff| over the six x_t:", max(float((a - b).abs().max()) for a, b in zip(mine, noised)))
show_images([to_pil(x)[0] for x in noised], [f"t = {t}" for t in timesteps], title="x_t = alpha_t x0 + sigma_t eps")

# %% [markdown]
# ## How much is left? SNR in numbers
#
# The signal-to-noise ratio $\bar\alpha_t/(1-\bar\alpha_t)$ falls below 1 (signal and noise of equal power)
# at the timestep printed below. At $t=999$ SD's schedule still lets the average brightness through: with the
# same noise, an all-white and an all-black picture give $x_{999}$ whose means differ by $2\alpha_{999}$.

# %%
for name, schedule in schedules.items():
    crossing = int((schedule.log_snr < 0).nonzero()[0])
    print(f"{name:17s} SNR = 1 at t = {crossing}; log SNR from {schedule.log_snr[0]:.1f} to {schedule.log_snr[-1]:.1f}")
schedule = NoiseSchedule.sd()
for t in (500, 999):
    white, black = (schedule.add_noise(torch.full_like(x0, v), noise, t).mean() for v in (1.0, -1.0))
    print(f"t = {t}: mean of x_t, all-white picture {white:+.3f}, all-black {black:+.3f}, "
          f"difference {white - black:.3f} = 2 alpha_t = {2 * schedule.alpha_sigma(t)[0]:.3f}")

# %% [markdown]
# ## The trace view, forward
#
# The course's signature picture puts the latent $x_t$ (**x_inter**, top) above the clean image the model
# believes in (**pred_x0**, bottom). Run forward with the *true* noise, pred_x0 is exact:
# $x_0 = (x_t - \sigma_t\epsilon)/\alpha_t$. A network sees only $x_t$ and must *guess* $\epsilon$; lessons
# 02 to 04 show how samplers walk back from $x_{999}$ with that guess.

# %%
forward = []
for step, t in enumerate(timesteps[::-1]):
    x_t = NoiseSchedule.sd().add_noise(x0, noise, t)
    alpha, sigma = (float(v) for v in NoiseSchedule.sd().alpha_sigma(t))
    forward.append(TraceStep(step, t, to_pil(x_t), to_pil((x_t - sigma * noise) / alpha)))
show_trace(forward, title="x_t (top) and (x_t - sigma_t eps) / alpha_t with the true eps (bottom)")

# %% [markdown]
# **Milestones:** `minidiff milestones --only alphas_cumprod add_noise`, or from Python
# `check("add_noise", my_add_noise)` as above. Next: lesson 02, DDPM ancestral sampling.
