"""An exact reference for the samplers: Gaussian data, whose ideal denoiser and ODE solution are closed-form.

For data x0 ~ N(mu, s^2 I) every quantity a sampler approximates is known exactly, so the error of a
sampler with N steps can be measured against the truth instead of against another sampler.

Notation (Song et al. 2021, probability-flow ODE; Karras et al. 2022, eq. 3, in k-diffusion space):
    mu, s            -> the data mean and standard deviation
    x_t              -> alpha_t x0 + sigma_t eps                     (VP latent, what the UNet sees)
    x = x_t / alpha_t -> x0 + sigma eps, with sigma = sigma_t / alpha_t (k-diffusion space)
    ideal_eps        -> E[eps | x_t] = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)
    the ODE          -> dx/dsigma = (x - E[x0 | x]) / sigma = sigma (x - mu) / (s^2 + sigma^2)
    exact solution   -> x(sigma) - mu = (x(sigma_start) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_start^2)

A method of order p has error ~ C N^-p, so the slope of log(error) against log(N) is -p.
"""

import math

import numpy as np
import torch

from minidiff.files import atomic_save
from minidiff.schedule import NoiseSchedule


class GaussianEpsModel:
    """The ideal epsilon-predictor for x0 ~ N(mu, s^2 I): what a perfectly trained network would output."""

    def __init__(self, mu: float = 0.5, s: float = 0.8, schedule: NoiseSchedule | None = None):
        self.mu, self.s = mu, s
        self.schedule = schedule or NoiseSchedule.sd()

    def __call__(self, x_t, t):
        # fractional t (some samplers evaluate between training steps): interpolate sigma as they do
        sigma = float(self.schedule.sigma_at(float(t)))
        alpha_t, sigma_t = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        return sigma_t * (x_t - alpha_t * self.mu) / (alpha_t**2 * self.s**2 + sigma_t**2)

    def exact_x0(self, noise, sigma_start: float):
        """The exact end point (sigma = 0) of the ODE started from x = noise sqrt(1 + sigma_start^2)."""
        x_start = noise * math.sqrt(1 + sigma_start**2)
        return self.mu + (x_start - self.mu) * self.s / math.sqrt(self.s**2 + sigma_start**2)


def convergence_study(samplers=("ddim", "euler", "heun", "dpmpp_2m", "unipc"), steps=(20, 40, 100, 200),
                      probe_t: int = 199, mu=0.5, s=0.8, seed=0):
    """Error of each deterministic sampler against the exact ODE solution, for each step count.

    Every run uses "trailing" spacing, so every step count starts at t = 999 and, for step counts that
    divide 1000, lands on the same timesteps (999 - k 1000/N: 199 for N in 20, 40, 100, 200). The error
    is measured on the latent x_t the sampler reaches at `probe_t`, not on the final image: the last
    step, to sigma = 0, is one coarse first-order jump in every sampler (its size shrinks only like
    sigma(T/N)^2 ~ 1/N), and it would hide the order of the method on the rest of the trajectory.
    Returns {sampler: [max abs error at probe_t, one per step count]}.
    """
    from minidiff.samplers import sample

    model = GaussianEpsModel(mu, s)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sigma_start = float(model.schedule.sigmas[-1])
    exact = _exact_vp_at(model, noise, sigma_start, float(model.schedule.sigmas[probe_t]))
    errors = {}
    for name in samplers:
        errors[name] = []
        for n in steps:
            visited = []  # (timestep evaluated at step i, x after step i)
            record = lambda visited=visited, **info: visited.append((round(float(info["timestep"])), info["x"]))
            # every sampler from x_T = noise (not diffusers' trailing start, sigma_max noise, for euler and heun)
            sample(model, noise, sampler=name, steps=n, spacing="trailing", callback=record, noise_is_x_t=True)
            landed = {t_next: x for (_, x), (t_next, _) in zip(visited, visited[1:])}
            if probe_t not in landed:
                raise ValueError(f"{name} with {n} trailing steps never lands on t={probe_t}")
            errors[name].append(float((landed[probe_t] - exact).abs().max()))
    return errors


def _exact_vp_at(model: GaussianEpsModel, noise, sigma_start: float, sigma_end: float):
    """The exact ODE solution at noise level sigma_end, in VP space (x_t = alpha_t x), from x_T = noise."""
    x_start = noise * math.sqrt(1 + sigma_start**2)
    scale = math.sqrt(model.s**2 + sigma_end**2) / math.sqrt(model.s**2 + sigma_start**2)
    return (model.mu + (x_start - model.mu) * scale) / math.sqrt(1 + sigma_end**2)


def convergence_order(steps, errors) -> float:
    """The measured order p: minus the least-squares slope of log(error) against log(steps)."""
    slope = np.polyfit(np.log(np.asarray(steps, dtype=float)), np.log(np.asarray(errors)), 1)[0]
    return float(-slope)


def plot_convergence(errors: dict, steps, path=None):
    """Log-log plot of error against steps, one line per sampler with its measured order."""
    import matplotlib

    matplotlib.use("Agg") if path else None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, errs in errors.items():
        ax.loglog(steps, errs, "o-", label=f"{name} (order {convergence_order(steps, errs):.2f})")
    ax.set_xlabel("steps N")
    ax.set_ylabel("max |x_t - exact x_t| at the probe timestep")
    ax.set_title("Sampler error against the exact Gaussian ODE solution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if path:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
        plt.close(fig)
    return fig


def inversion_round_trip(steps=(10, 20, 40, 80, 160), spacing: str = "leading", mu=0.5, s=0.8, seed=0) -> list:
    """DDIM inversion then DDIM sampling on the same grid, with the exact Gaussian model, for each step count.

    The clean latent x0 is drawn from the data, N(mu, s^2 I), in float64; it is inverted to noise
    (minidiff.inversion.invert_ddim) and sampled back (sample(..., "ddim")) on `spacing` with steps_offset 1.
    Each inverse step asks the model at the level it comes from instead of the one it goes to, an error of the
    size of a step, so the round trip misses x0 by about C / N: order 1 (convergence_order). The exact model
    leaves nothing else to blame. Returns [max |x0 after the round trip - x0|, one per step count].
    """
    from minidiff.inversion import invert_ddim
    from minidiff.samplers import sample
    from minidiff.schedule import Denoiser

    model = GaussianEpsModel(mu, s)
    x0 = mu + s * torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    errors = []
    for n in steps:
        grid = model.schedule.ddim_timesteps(n, spacing, 1)
        noise = invert_ddim(Denoiser(model, model.schedule), x0.clone(), *grid)
        again = sample(model, noise, "ddim", n, spacing=spacing, steps_offset=1)
        errors.append(float((again - x0).abs().max()))
    return errors
