"""Lesson 02, DDPM: what the network's output means, and one step of ancestral sampling (Ho et al. 2020).

Notation (course/02_ddpm.md):
    alpha_bar_t, alpha_bar_prev -> alpha_bar at the timestep t and at the one the step lands on (1.0 after the last)
    alpha_t, beta_t             -> alpha_bar_t / alpha_bar_prev and 1 - alpha_t: the whole jump's
    eps, v                      -> the network's noise prediction; v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
    mu~_t, beta~_t              -> the posterior q(x_prev | x_t, x_0)'s mean and variance (eq. 6-7)
"""

import math


def pred_x0(model_output, x_t, alpha_bar_t, prediction_type="epsilon"):
    """The clean-image estimate x_0 from the network's output.

    epsilon:      x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    v_prediction: x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v
    """
    alpha, sigma = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    return alpha * x_t - sigma * model_output


def pred_eps(model_output, x_t, alpha_bar_t, prediction_type="epsilon"):
    """The noise estimate eps from the network's output.

    epsilon:      eps = the output itself
    v_prediction: eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t
    """
    if prediction_type == "epsilon":
        return model_output
    return math.sqrt(alpha_bar_t) * model_output + math.sqrt(1 - alpha_bar_t) * x_t


def ddpm_step(x_t, eps, alpha_bar_t, alpha_bar_prev, noise):
    """One ancestral DDPM step from t to t_prev (Ho et al. 2020, eq. 6-7): x_prev = mu~_t + sqrt(beta~_t) z.

    alpha_t = alpha_bar_t / alpha_bar_prev,  beta_t = 1 - alpha_t
    x_0     = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    mu~_t   = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x_0
              + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
    beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t     (a variance: the noise z is scaled by its sqrt)
    After the last step alpha_bar_prev = 1.0, so beta~_t = 0 and no noise is added.
    """
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    mean = (math.sqrt(alpha_bar_prev) * beta_t / (1 - alpha_bar_t)) * x0 + (
        math.sqrt(alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return mean + math.sqrt(variance) * noise


# --- exercises (course/02_ddpm.md, "Exercises") ---


def exercise_02_1():
    """The variance beta_tilde_500 of DDPM's posterior q(x_499 | x_500, x_0) on SD's schedule (a number):
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}."""
    from minidiff.schedule import NoiseSchedule

    alpha_bar = NoiseSchedule.sd().alphas_cumprod
    a_t, a_prev = float(alpha_bar[500]), float(alpha_bar[499])
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def exercise_02_2():
    """The v-prediction target at t = 500 of SD's schedule for x_0 = 1 and eps = 0 (a number):
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[500])
    x0, eps = 1.0, 0.0
    return math.sqrt(a) * eps - math.sqrt(1 - a) * x0
