"""Lesson 01, the forward process: the noise schedule and q(x_t | x_0) (Ho et al. 2020, sec. 2).

Notation (course/01_forward_process.md):
    T                      -> num_train_timesteps (1000 for SD)
    beta_t                 -> the variance of the noise added at step t; SD's are "scaled_linear"
    alpha_bar_t            -> prod_{s <= t} (1 - beta_s): the fraction of the signal's variance left at t
    x_t                    -> sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I)
"""

import math

import torch


def betas(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """SD's "scaled_linear" betas: linear in sqrt(beta), from beta_start to beta_end, T values (float32).

    beta_t = (sqrt(beta_start) + t / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2,  t = 0 .. T - 1
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), for t = 0 .. T - 1, of the betas above."""
    return torch.cumprod(1 - betas(num_train_timesteps, beta_start, beta_end), dim=0)


def add_noise(x0, noise, alpha_bar_t):
    """q(x_t | x_0) (Ho et al. 2020, eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    alpha_bar_t: a number or a 0-dim tensor; noise: eps, shaped like x0.
    """
    return math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * noise


# --- exercises (course/01_forward_process.md, "Exercises") ---


def exercise_01_1():
    """alpha_bar_999 of SD's schedule: the fraction of x_0's variance left in x_t at the last timestep (a number)."""
    return float(alphas_cumprod()[999])


def exercise_01_2():
    """The first timestep t at which SD's signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) drops below 1:
    from there on, x_t holds more noise than signal (an int)."""
    alpha_bar = alphas_cumprod().double()
    return int((alpha_bar / (1 - alpha_bar) < 1).nonzero()[0])
