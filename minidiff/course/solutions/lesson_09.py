"""Lesson 09, training: the denoising loss of one batch (Ho et al. 2020, alg. 1; Rombach et al. 2022, eq. 2).

Notation (course/09_train_shapes.md):
    t       -> one timestep per picture, uniform over 0 .. T - 1
    eps     -> the noise drawn, N(0, I), shaped like the latents
    loss    -> mean over every element of (eps_theta(x_t, t, c) - eps)^2
"""

import math

import torch
import torch.nn.functional as F


def diffusion_loss(unet, text_encoder, ids, latents, schedule, generator):
    """mean (eps - eps_theta(x_t, t, text_encoder(ids)))^2,  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Draw from `generator` in this order: t = torch.randint(T, (B,)), then eps = torch.randn(latents.shape).
    """
    t = torch.randint(schedule.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alpha_bar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    return F.mse_loss(unet(x_t, t, text_encoder(ids)), noise)


# --- exercises (course/09_train_shapes.md, "Exercises") ---


def exercise_09_1():
    """If the training latents x_0 were themselves N(0, I) noise, the best a model can do at t is
    E[eps | x_t] = sqrt(1 - alpha_bar_t) x_t. Its expected loss (per element) at t = 500 of SD's schedule
    (a number)."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[500])
    return 1 - (1 - a)  # E[eps^2] - E[(sqrt(1 - a) x_t)^2] with E[x_t^2] = 1


def exercise_09_2():
    """The expected loss at t = 500 of SD's schedule of a model that answers eps_hat = x_t (the noisy input
    itself), on unit-variance x_0 independent of eps (a number)."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[500])
    # x_t - eps = sqrt(a) x_0 + (sqrt(1 - a) - 1) eps
    return a + (math.sqrt(1 - a) - 1) ** 2
