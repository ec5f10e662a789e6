"""Lesson 04, ODE samplers: an Euler step, and DPM-Solver++(2M) (Lu et al. 2022), step and sampler.

Notation (course/04_ode_samplers.md):
    sigma              -> the k-diffusion noise level sqrt((1 - alpha_bar) / alpha_bar); x = x_0 + sigma eps
    d                  -> dx/dsigma = eps_theta, the slope of the probability-flow ODE (Karras et al. 2022, eq. 4)
    lambda_t           -> log(alpha_t / sigma_t) = 0.5 log(alpha_bar_t / (1 - alpha_bar_t)), the half log-SNR
    h, h_prev          -> lambda_next - lambda_t, and lambda_t - lambda_prev (the step before)
    r                  -> h_prev / h
    D0, D1             -> x_0 predicted now; (D0 - x_0 predicted at the step before) / r
"""

import math

from minidiff.course.solutions.lesson_03 import timesteps


def euler_step(x, d, sigma, sigma_next):
    """One Euler step of the ODE in k-diffusion space: x_next = x + d (sigma_next - sigma)."""
    return x + d * (sigma_next - sigma)


def _half_log_snr(alpha_bar):
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def dpmpp_2m_step(x_t, pred_x0, pred_x0_prev, alpha_bar_t, alpha_bar_next, alpha_bar_prev=None):
    """One DPM-Solver++(2M) step from t to the next timestep, in VP space (Lu et al. 2022, alg. 2, midpoint).

    x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) (D0 + D1 / 2),  D1 = (D0 - pred_x0_prev) / r
    with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). The first step (pred_x0_prev None) is first
    order, D = D0; the last (alpha_bar_next = 1.0, sigma = 0) returns D0.
    """
    if alpha_bar_next == 1:
        return pred_x0
    lam_t, lam_next = _half_log_snr(alpha_bar_t), _half_log_snr(alpha_bar_next)
    h = lam_next - lam_t
    if pred_x0_prev is None:
        d = pred_x0
    else:
        r = (lam_t - _half_log_snr(alpha_bar_prev)) / h
        d = pred_x0 + (pred_x0 - pred_x0_prev) / (2 * r)
    decay = math.sqrt(1 - alpha_bar_next) / math.sqrt(1 - alpha_bar_t)
    return decay * x_t - math.sqrt(alpha_bar_next) * math.expm1(-h) * d


def dpmpp_2m_sample(model, x_T, alphas_cumprod, steps, spacing="leading", steps_offset=1):
    """DPM-Solver++(2M) from x_T to x_0 on lesson 03's grid timesteps(steps, spacing, steps_offset).

    model(x_t, t) -> eps; x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) is D0; the step after the
    last timestep lands on sigma = 0 (alpha_bar 1.0).
    """
    grid = timesteps(steps, spacing, steps_offset, len(alphas_cumprod))
    x, previous = x_T, (None, None)
    for i, t in enumerate(grid):
        alpha_bar_t = float(alphas_cumprod[t])
        alpha_bar_next = float(alphas_cumprod[grid[i + 1]]) if i + 1 < len(grid) else 1.0
        eps = model(x, t)
        x0 = (x - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
        x = dpmpp_2m_step(x, x0, previous[0], alpha_bar_t, alpha_bar_next, previous[1])
        previous = (x0, alpha_bar_t)
    return x


# --- exercises (course/04_ode_samplers.md, "Exercises") ---


def exercise_04_1():
    """The ODE's noise level sigma = sigma_t / alpha_t = sqrt((1 - alpha_bar) / alpha_bar) at t = 999 of SD's
    schedule: the std of the noise the Euler and DPM++ samplers start from (a number)."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[999])
    return math.sqrt((1 - a) / a)


def exercise_04_2():
    """lambda_t = log(alpha_t / sigma_t) at t = 500 of SD's schedule, the time variable DPM++ steps in (a number)."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[500])
    return math.log(math.sqrt(a) / math.sqrt(1 - a))
