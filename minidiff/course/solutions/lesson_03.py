"""Lesson 03, DDIM: the deterministic step, the timestep grid and the whole sampler (Song et al. 2021).

Notation (course/03_ddim.md):
    alpha_bar_t, alpha_bar_prev -> alpha_bar at the timestep t and at the next timestep of the grid
                                   (alpha_bar_0 after the last step, as SD ships it: set_alpha_to_one=False)
    sigma_t                     -> eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
                                       * sqrt(1 - alpha_bar_t / alpha_bar_prev)
    grid                        -> the N timesteps the sampler visits, noisiest first
"""

import math


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    """One DDIM update from t to t_prev (Song et al. 2021, eq. 12).

    x_0    = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                  predicted x_0
    x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t noise
    eta = 0 is deterministic DDIM (no noise term); eta = 1 is DDPM-like.
    """
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    sigma_t = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - sigma_t**2) * eps
    return x_prev + sigma_t * noise if eta > 0 else x_prev


def timesteps(steps, spacing="leading", steps_offset=1, num_train_timesteps=1000):
    """The grid: `steps` integer timesteps, noisiest first, as diffusers' DDIM/DDPM schedulers space them.

    leading:  steps_offset + i (T // N), i = 0 .. N - 1           (SD: 981, 961, ..., 1 for N = 50)
    trailing: round(T - i T / N) - 1, i = 0 .. N - 1              (999, 979, ..., 19)
    linspace: round(i (T - 1) / (N - 1)), i = 0 .. N - 1          (999, 979 (978.6), ..., 0)
    """
    T, N = num_train_timesteps, steps
    if spacing == "leading":
        grid = [steps_offset + i * (T // N) for i in range(N)]
    elif spacing == "trailing":
        grid = [round(T - i * T / N) - 1 for i in range(N)]
    else:  # linspace
        grid = [round(i * (T - 1) / (N - 1)) if N > 1 else 0 for i in range(N)]
    return sorted(grid, reverse=True)


def ddim_sample(model, x_T, alphas_cumprod, steps, spacing="leading", steps_offset=1):
    """Deterministic DDIM (eta = 0) from x_T to x_0 on the grid timesteps(steps, spacing, steps_offset).

    model(x_t, t) -> eps at the timestep t the step starts from; each step lands on the grid's next timestep,
    the last on alpha_bar_0 (alphas_cumprod[0]).
    """
    grid = timesteps(steps, spacing, steps_offset, len(alphas_cumprod))
    x = x_T
    for i, t in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < len(grid) else 0
        x = ddim_step(x, model(x, t), alphas_cumprod[t], alphas_cumprod[t_prev])
    return x


def ddim_early_exit(model, x_T, alphas_cumprod, steps, stop_after, spacing="leading", steps_offset=1):
    """Deterministic DDIM on timesteps(steps, spacing, steps_offset) that stops after step `stop_after` (1 ..
    steps) and returns that step's predicted x_0, (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), not x_t:
    the picture the network already sees, without the steps that would only refine it."""
    grid = timesteps(steps, spacing, steps_offset, len(alphas_cumprod))
    x = x_T
    for i, t in enumerate(grid[:stop_after]):
        eps = model(x, t)
        alpha_bar_t = float(alphas_cumprod[t])
        x0 = (x - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
        t_prev = grid[i + 1] if i + 1 < len(grid) else 0
        x = ddim_step(x, eps, alphas_cumprod[t], alphas_cumprod[t_prev])
    return x0


# --- exercises (course/03_ddim.md, "Exercises") ---


def exercise_03_1():
    """SD's 10-step trailing grid with steps_offset 0, noisiest first (a list of ints): your timesteps()."""
    return [int(t) for t in timesteps(10, "trailing", 0)]


def exercise_03_2():
    """DDIM's sigma_t at eta = 1 for the step from t = 981 to t_prev = 961 on SD's schedule (a number):
    sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)."""
    from minidiff.schedule import NoiseSchedule

    alpha_bar = NoiseSchedule.sd().alphas_cumprod
    a_t, a_prev, eta = float(alpha_bar[981]), float(alpha_bar[961]), 1.0
    return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
