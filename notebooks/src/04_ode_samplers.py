# Source of notebooks/04_ode_samplers.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 04: the ODE view: Euler, Heun, DPM++ 2M, UniPC
#
# Divide the latent by $\alpha_t$ and it becomes the clean picture plus noise of one number's size,
# $x = x_t/\alpha_t = x_0 + \sigma\epsilon$ with $\sigma=\sigma_t/\alpha_t$ (k-diffusion's `sigmas`). Deterministic
# sampling is then an ordinary differential equation in $\sigma$, the probability-flow ODE (Song et al. 2021;
# Karras et al. 2022, eq. 4):
# $$\frac{dx}{d\sigma} = \frac{x - D(x;\sigma)}{\sigma} = \epsilon_\theta,$$
# with $D$ = pred_x0, the denoiser. A sampler is an ODE solver; a better solver needs fewer steps.
# Read beside `course/04_ode_samplers.md`, `minidiff/samplers.py`, `minidiff/solvers.py`, `minidiff/gaussian.py`.
#
# | code name | symbol |
# |---|---|
# | `sigma`, `sigma_next` | $\sigma_i$, $\sigma_{i+1}$ (the grid ends with $\sigma=0$) |
# | `d` | $dx/d\sigma=\epsilon_\theta$ |
# | `pred_x0` | $D(x;\sigma)$ |
# | `lam`, `h`, `r` (DPM++) | $\lambda=-\log\sigma=\log(\alpha_t/\sigma_t)$, the half log-SNR (lesson 01); $h_i=\lambda_{i+1}-\lambda_i$; $r_i=h_{i-1}/h_i$ |

# %%
import math

import torch
from IPython.display import display

from minidiff.course import shapes
from minidiff.course.gaussian import GaussianEpsModel, convergence_order, convergence_study, plot_convergence
from minidiff.course.notebook import use
from minidiff.course.viz import (
    DatasetEpsModel,
    StepRecorder,
    course_pipeline,
    image_grid,
    plot_curves,
    show_trace,
    to_pil,
)
from minidiff.samplers import sample

gaussian = GaussianEpsModel(mu=0.5, s=0.8)  # x0 ~ N(0.5, 0.8^2 I): the exact ODE solution is known
x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
exact_x0 = gaussian.exact_x0(x_T, float(gaussian.schedule.sigmas[-1]))

# %% [markdown]
# ## DDIM is Euler's method
#
# Take the same timesteps for both (a custom list): DDIM's update in $x_t$ and Euler's in $x=x_t/\alpha_t$ are
# the same numbers. Only the last step differs: Euler goes to $\sigma=0$, SD's DDIM to $\bar\alpha_0$.

# %%
timesteps = [999, 800, 600, 400, 200, 100, 50]
latents = {}
for name in ("ddim", "euler"):
    recorder = StepRecorder()
    sample(gaussian, x_T, sampler=name, timesteps=timesteps, callback=recorder)
    latents[name] = [s["x"] for s in recorder.steps]
print("max |DDIM - Euler| of x_inter after each step:",
      [f"{float((a - b).abs().max()):.0e}" for a, b in zip(latents["ddim"], latents["euler"])])

# %% [markdown]
# ## Re-implement it: Euler, then Heun
#
# Euler follows the slope at the start of the step; Heun (2nd order) averages it with the slope at the Euler
# estimate, one extra model call per step. The model is called on the VP latent $x/\sqrt{1+\sigma^2}$.

# %%
def slope(model, x, sigma, t):
    return model(x / math.sqrt(1 + sigma**2), t)  # dx/dsigma = eps_theta


# your workbook's lesson_04.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(4)
print(mine.check("euler_step"))


def my_euler(model, noise, timesteps, sigmas):
    """Euler on the sigma grid, each step your euler_step."""
    x = noise * math.sqrt(1 + sigmas[0] ** 2)  # x_T / alpha_T
    for i, t in enumerate(timesteps):
        x = mine.euler_step(x, slope(model, x, sigmas[i], t), sigmas[i], sigmas[i + 1])
    return x


def my_heun(model, noise, timesteps, sigmas):
    """Heun: your euler_step to the trial point, then again with the mean of the two slopes."""
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(timesteps):
        d = slope(model, x, sigmas[i], t)
        x_euler = mine.euler_step(x, d, sigmas[i], sigmas[i + 1])
        if sigmas[i + 1] == 0:  # the last step: Euler (no slope at sigma = 0)
            x = x_euler
        else:
            d_next = slope(model, x_euler, sigmas[i + 1], timesteps[i + 1])
            x = mine.euler_step(x, (d + d_next) / 2, sigmas[i], sigmas[i + 1])
    return x


ts, sigmas = gaussian.schedule.sigma_grid(20)  # diffusers' Euler/Heun grid: 20 timesteps, 21 sigmas ending in 0
for name, method in (("euler", my_euler), ("heun", my_heun)):
    ours = method(gaussian, x_T, ts.tolist(), sigmas.tolist())
    library = sample(gaussian, x_T, sampler=name, steps=20)
    print(f"{name}: max |mine - minidiff| = {float((ours - library).abs().max()):.1e}, "
          f"mean |x0 - exact| = {float((ours - exact_x0).abs().mean()):.4f} (fp64, 20 steps)")

# %% [markdown]
# ## Convergence order on the exact Gaussian reference
#
# `convergence_study` runs each deterministic sampler at 20, 40, 100 and 200 steps ("trailing" spacing, so all
# land on $t=199$) and measures the error of the latent at $t=199$ against the closed-form ODE solution. A method
# of order $p$ has error $\sim C N^{-p}$: the slope on a log-log plot is $-p$. (The last jump to $\sigma=0$ is
# left out: it is one coarse step in every sampler and would hide the order.)

# %%
steps = (20, 40, 100, 200)
errors = convergence_study(("ddim", "euler", "heun", "dpmpp_2m", "unipc"), steps)
for name, errs in errors.items():
    print(f"{name:9s} order {convergence_order(steps, errs):.2f}   error at 20 steps {errs[0]:.1e}")
fig = plot_convergence(errors, steps)

# %% [markdown]
# Heun calls the model twice per step, so per *model call* its advantage halves; DPM++ 2M and UniPC reach
# second order (UniPC's corrector more) with one call per step, by reusing the previous step's prediction.
#
# ## DPM++ 2M, one step by hand
#
# DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) is a *multistep* method, not a Heun-like one: one model call per
# step, plus the previous step's pred_x0. In $\lambda=-\log\sigma$ the ODE's linear part integrates exactly, and
# the denoiser's output is taken as linear in $\lambda$ through the last two predictions. With
# $h_i=\lambda_{i+1}-\lambda_i$ and $r_i=h_{i-1}/h_i$:
# $$D_i=\Big(1+\frac{1}{2r_i}\Big)\hat x_{0,i}-\frac{1}{2r_i}\hat x_{0,i-1},\qquad
# x_{i+1}=\frac{\sigma_{i+1}}{\sigma_i}\,x_i+\Big(1-\frac{\sigma_{i+1}}{\sigma_i}\Big)D_i\quad(e^{-h_i}=\sigma_{i+1}/\sigma_i)$$
# in $x=x_t/\alpha_t$; `minidiff/solvers.py` does the same in the VP latent and writes $D_i=D_0+\frac12 D_1$,
# $D_1=(\hat x_{0,i}-\hat x_{0,i-1})/r_i$. The first step has no previous prediction ($D_0=\hat x_{0,0}$: DDIM) and
# the last, to $\sigma=0$, returns its $\hat x_0$. Record a 10-step run and redo step 4 from what the callback saw:

# %%
recorder = StepRecorder()
sample(gaussian, x_T, sampler="dpmpp_2m", steps=10, callback=recorder)
i = 4
before, now, after = recorder.steps[i - 1], recorder.steps[i], recorder.steps[i + 1]  # at sigma_{i-1, i, i+1}
h_prev, h = math.log(before["sigma"] / now["sigma"]), math.log(now["sigma"] / after["sigma"])  # lambda = -log sigma
r = h_prev / h
D = (1 + 1 / (2 * r)) * now["pred_x0"] - 1 / (2 * r) * before["pred_x0"]
x = before["x"] * math.sqrt(1 + now["sigma"] ** 2)  # the VP latent before step i, as x = x_t / alpha_t
x_next = after["sigma"] / now["sigma"] * x + (1 - after["sigma"] / now["sigma"]) * D
my_step = x_next / math.sqrt(1 + after["sigma"] ** 2)  # back to the VP latent
print(f"step {i}: h = {h:.3f}, r = {r:.3f}, D = {1 + 1 / (2 * r):.3f} pred_x0_i - {1 / (2 * r):.3f} pred_x0_(i-1)")
print(f"max |my step - the library's x_inter| = {float((my_step - now['x']).abs().max()):.1e} (fp64)")

# %% [markdown]
# That is why DPM++ 2M is the default for 20-step generation. The `dpmpp_20` milestone checks that DPM++ 2M at 20
# steps lands as close to DDIM at 50 as DDIM itself cannot at 20; its Gaussian half, measured here (the shapes-model
# half, 70 guided UNet calls on 16 prompts, runs with `minidiff milestones --only dpmpp_20`):

# %%
ddim_50 = sample(gaussian, x_T, sampler="ddim", steps=50)
for name in ("ddim", "dpmpp_2m"):
    x_20 = sample(gaussian, x_T, sampler=name, steps=20)
    print(f"{name:8s} 20 steps: mean |x0 - DDIM 50| = {float((x_20 - ddim_50).abs().mean()):.4f}")
print(mine.check("dpmpp_2m_step"))  # your lesson_04.py step, or to do (the whole sampler: `minidiff milestones`)

# %% [markdown]
# ## Karras sigmas and custom timestep lists
#
# Where the steps go matters as much as the solver. Karras et al. 2022 (eq. 5) space the $N$ noise levels evenly
# in $\sigma^{1/\rho}$ with $\rho=7$: many small steps at low noise, where detail forms. A custom list places
# them by hand: below, the 10 steps that "Align Your Steps" (Sabour et al. 2024) optimised for SD 1.5.

# %%
default_ts, default_sigmas = gaussian.schedule.sigma_grid(10, spacing="trailing")
karras_ts, karras_sigmas = gaussian.schedule.sigma_grid(10, spacing="trailing", karras=True)
ays = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
ays_sigmas = gaussian.schedule.sigmas[ays].tolist()
plot_curves(range(10), {"trailing": default_sigmas[:10].tolist(), "karras (rho 7)": karras_sigmas[:10].tolist(),
                        "AYS list": ays_sigmas},
            "step", "sigma (log scale)", "10 noise levels, noisiest first", log="y")

# %%
print("mean |x0 - exact x0| after 10 steps (the final point, sigma = 0, last jump included):")
print(f"{'sampler':9s} {'trailing':>9s} {'karras':>9s} {'AYS list':>9s}")
for name in ("euler", "heun", "dpmpp_2m", "unipc"):
    row = [sample(gaussian, x_T, sampler=name, steps=10, spacing="trailing"),
           sample(gaussian, x_T, sampler=name, steps=10, spacing="trailing", karras=True),
           sample(gaussian, x_T, sampler=name, timesteps=ays)]
    print(f"{name:9s} " + " ".join(f"{float((x - exact_x0).abs().mean()):9.4f}" for x in row))

# %% [markdown]
# ## The trace: four solvers, ten steps, one perfect model
#
# On the perfect model of 12 pictures (lesson 02), the same $x_T$ through four solvers at 10 steps. The
# pred_x0 rows show each one's belief, step by step.

# %%
images, _, _ = shapes.batch(12, seed=0)
model = DatasetEpsModel(images.double())
noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
finals, solvers = [], ("euler", "heun", "dpmpp_2m", "unipc")
for name in solvers:
    recorder = StepRecorder()
    finals.append(sample(model, noise, sampler=name, steps=10, callback=recorder))
    display(show_trace(recorder.trace(), steps=range(10), size=1.1, title=f"{name}, 10 steps"))
image_grid(to_pil(torch.cat(finals).float()), labels=[f"{name}, 10 steps" for name in solvers],
           title="the final pictures, same x_T", scale=2)

# %% [markdown]
# And the text-to-image pipeline with DPM++ 2M on Karras sigmas (`course_pipeline()`: the shapes model if it is
# there, else random weights, labelled):

# %%
pipe = course_pipeline()
result = pipe("a small blue square in the centre", sampler="dpmpp_2m", steps=20, karras=True, seed=0,
              trace=True, progress=False)
show_trace(result.trace, title=f"DPM++ 2M, Karras sigmas, 20 steps: {pipe.source}")

# %% [markdown]
# **Milestone:** `minidiff milestones --only dpmpp_20`, and with your own solver
# `minidiff milestones --dpmpp-20 my_code.py:my_dpmpp`. Next: lesson 05, attention.
