"""Samplers: pure functions that turn noise into a clean latent, one denoising step at a time.

Every sampler has the same signature and returns the final latent x_0:

    sample_NAME(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
                generator=None, callback=None, **its_own_options)

`denoiser` is a `minidiff.schedule.Denoiser`; `x` is noise from N(0, I), used as x_T by the samplers
that step in VP space (ddpm, ddim, lcm) and scaled by sqrt(1 + sigma_max^2) = 1 / alpha_T by those
that step in k-diffusion space (euler, euler_a, heun). Each builds its time grid as the diffusers
scheduler it mirrors does, step for step. After step i it calls
    callback(step=i, timestep=t, sigma=s, x=x_inter, pred_x0=pred_x0)
with t and s = sqrt((1 - alpha_bar_t) / alpha_bar_t) where the model was evaluated, x_inter the new
latent in VP space (what the UNet sees) and pred_x0 the model's guess of the clean latent.

Notation shared by all samplers (Ho et al. 2020; Karras et al. 2022):
    abar, abar_prev   -> alpha_bar_t, alpha_bar_{t_prev}: the signal kept at this and the next timestep
    sigma, sigma_next -> sigma_i, sigma_{i+1}: k-diffusion noise levels, x = x0 + sigma eps
    pred_x0, pred_eps -> x0_theta(x_t, t), eps_theta(x_t, t)
    d                 -> dx/dsigma = (x - x0_theta) / sigma = eps_theta, the probability-flow ODE (Karras
                         eq. 4); taken as pred_eps, which avoids cancelling x - x0 at small sigma

`sample()` at the bottom is the front end: it picks a sampler by name, wraps the model, and adds
early exit, a progress bar and the NaN check, so that the samplers stay a loop and nothing else.
"""

import inspect
import math

import torch
from tqdm.auto import tqdm

from minidiff.errors import SamplerError
from minidiff.schedule import Denoiser, NoiseSchedule
from minidiff.solvers import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc  # the multistep solvers

# --- helpers -----------------------------------------------------------------------------------

SIGMA_SPACE_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")


def _no_karras(name: str, karras: bool) -> None:
    if karras:
        raise SamplerError(
            f"karras=True is for the samplers that step through noise levels ({', '.join(SIGMA_SPACE_SAMPLERS)}); "
            f"{name} steps through integer timesteps: drop karras=True or pick one of those"
        )


def _randn_like(x, generator):
    """N(0, I) noise shaped like x, drawn on the generator's device (a CPU generator gives the same
    numbers on every device), as diffusers' randn_tensor does."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _vp_timesteps(schedule: NoiseSchedule, steps, spacing, steps_offset, timesteps):
    if timesteps is not None:
        return schedule.check_custom_timesteps(timesteps)
    return schedule.timesteps(steps, spacing, steps_offset)


def _report(callback, step, t, sigma, x, pred_x0):
    if callback is not None:
        callback(step=step, timestep=t, sigma=float(sigma), x=x, pred_x0=pred_x0)


# --- samplers in VP space: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps ------------------------------


def sample_ddpm(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
                generator=None, callback=None):
    """Ancestral sampling of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7).

    Notation (the chain jumps from t to the next visited timestep t_prev; abar_prev = 1 after the last):
        alpha, beta   -> alpha_t = abar / abar_prev, beta_t = 1 - alpha_t for the jump
        coef_x0, coef_xt -> the posterior mean mu~_t(x_t, x0) = coef_x0 x0 + coef_xt x_t (eq. 7)
        posterior_var -> beta~_t = (1 - abar_prev) / (1 - abar) beta_t, the "fixed small" variance
    """
    _no_karras("ddpm", karras)
    schedule = denoiser.schedule
    ts = _vp_timesteps(schedule, steps, spacing, steps_offset, timesteps).tolist()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        abar = float(schedule.alphas_cumprod[t])
        abar_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        alpha, beta = abar / abar_prev, 1 - abar / abar_prev
        pred_x0, _ = denoiser(x, t)
        coef_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
        coef_xt = math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
        x = coef_x0 * pred_x0 + coef_xt * x
        if t > 0:
            posterior_var = max((1 - abar_prev) / (1 - abar) * beta, 1e-20)
            x = x + math.sqrt(posterior_var) * _randn_like(x, generator)
        _report(callback, i, t, schedule.sigmas[t], x, pred_x0)
    return x


def sample_ddim(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
                generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12): eta = 0 deterministic, 1 DDPM-like.

    Notation:
        a_t, a_prev -> alpha_t, alpha_{t-1} of the paper (= our abar, abar_prev; alpha_bar_0 after the last step,
                       as SD ships it with set_alpha_to_one=False)
        sigma_t     -> sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
        dir_xt      -> sqrt(1 - a_prev - sigma_t^2) eps_theta(x_t), the direction pointing to x_t
    """
    _no_karras("ddim", karras)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise SamplerError(f"ddim's eta must be a number from 0 (deterministic DDIM) to 1 (DDPM-like), got {eta!r}")
    schedule = denoiser.schedule
    ts, prev_ts = schedule.ddim_timesteps(steps, spacing, steps_offset, timesteps)
    for i, (t, t_prev) in enumerate(zip(ts.tolist(), prev_ts.tolist())):
        a_t = float(schedule.alphas_cumprod[t])
        a_prev = float(schedule.alphas_cumprod[max(t_prev, 0)])  # t_prev = -1: the end, alpha_bar_0
        # current prediction for x_0 (and the noise it implies)
        pred_x0, pred_eps = denoiser(x, t)
        # the noise level of this step, eq. 16 scaled by eta
        sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # direction pointing to x_t
        dir_xt = math.sqrt(1 - a_prev - sigma_t**2) * pred_eps
        # random noise
        noise = sigma_t * _randn_like(x, generator) if eta > 0 else 0.0
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + noise
        _report(callback, i, t, schedule.sigmas[t], x, pred_x0)
    return x


LCM_TIMESTEP_SCALING = 10.0  # c_skip, c_out are evaluated at 10 t (diffusers' LCMScheduler default)
LCM_SIGMA_DATA = 0.5


def sample_lcm(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
               generator=None, callback=None, original_inference_steps=50):
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", algorithm 1).

    The timesteps are picked from the grid the model was distilled on (`original_inference_steps` of
    them), so `spacing` and `steps_offset` do not apply.
    Notation (Song et al. 2023, consistency models, eq. 7):
        c_skip, c_out -> the boundary-condition scalings: f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t),
                         with f(x, 0) = x; evaluated at t * LCM_TIMESTEP_SCALING with sigma_data = 0.5
        denoised      -> f(x, t), the consistency function's clean estimate (reported as pred_x0)
    """
    _no_karras("lcm", karras)
    schedule = denoiser.schedule
    ts = schedule.lcm_timesteps(steps, original_inference_steps, timesteps).tolist()
    for i, t in enumerate(ts):
        pred_x0, _ = denoiser(x, t)
        scaled_t = t * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (scaled_t**2 + LCM_SIGMA_DATA**2)
        c_out = scaled_t / math.sqrt(scaled_t**2 + LCM_SIGMA_DATA**2)
        denoised = c_out * pred_x0 + c_skip * x
        if i + 1 < len(ts):  # noise the estimate back to the next timestep
            abar_prev = float(schedule.alphas_cumprod[ts[i + 1]])
            x = math.sqrt(abar_prev) * denoised + math.sqrt(1 - abar_prev) * _randn_like(x, generator)
        else:
            x = denoised
        _report(callback, i, t, schedule.sigmas[t], x, denoised)
    return x


# --- samplers in k-diffusion space: x = x_t / alpha_t = x0 + sigma eps ---------------------------


def _sigma_start(denoiser, x, steps, spacing, steps_offset, timesteps, karras):
    ts, sigmas = denoiser.schedule.sigma_grid(steps, spacing, steps_offset, timesteps, karras)
    return ts.tolist(), sigmas.tolist(), x * math.sqrt(1 + sigmas[0] ** 2)


def _to_vp(x, sigma):
    """k-diffusion x = x_t / alpha_t at noise level sigma -> the VP latent x_t."""
    return x * (1 / math.sqrt(1 + sigma**2))


def sample_euler(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
                 generator=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space...", alg. 1).

    Notation: d -> dx/dsigma = (x - D(x; sigma)) / sigma = pred_eps, with D = pred_x0 the denoiser of Karras eq. 3.
    """
    ts, sigmas, x = _sigma_start(denoiser, x, steps, spacing, steps_offset, timesteps, karras)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0, pred_eps = denoiser.at_sigma(x, sigma, t)
        d = pred_eps
        x = x + d * (sigma_next - sigma)
        _report(callback, i, t, sigma, _to_vp(x, sigma_next), pred_x0)
    return x


def sample_euler_a(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
                   generator=None, callback=None):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion;
    Song et al. 2021, "Score-Based Generative Modeling through SDEs", ancestral sampling).

    Notation:
        sigma_up   -> the std of the fresh noise: sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down -> sqrt(sigma_next^2 - sigma_up^2), where the deterministic step lands
    """
    ts, sigmas, x = _sigma_start(denoiser, x, steps, spacing, steps_offset, timesteps, karras)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0, pred_eps = denoiser.at_sigma(x, sigma, t)
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        d = pred_eps
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * _randn_like(x, generator)
        _report(callback, i, t, sigma, _to_vp(x, sigma_next), pred_x0)
    return x


def sample_heun(denoiser, x, steps, *, spacing="leading", steps_offset=1, timesteps=None, karras=False,
                generator=None, callback=None):
    """Heun's method, 2nd order, on the probability-flow ODE (Karras et al. 2022, algorithm 1).

    Two model calls per step (one on the last step, an Euler step down to sigma = 0).
    Notation: d, d_next -> dx/dsigma at (x, sigma) and at the Euler estimate (x_euler, sigma_next);
              the step follows their mean (the trapezoidal rule). pred_x0 reported is D(x; sigma).
    """
    ts, sigmas, x = _sigma_start(denoiser, x, steps, spacing, steps_offset, timesteps, karras)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0, pred_eps = denoiser.at_sigma(x, sigma, t)
        d = pred_eps
        x_euler = x + d * (sigma_next - sigma)
        if i + 1 < len(ts):
            _, d_next = denoiser.at_sigma(x_euler, sigma_next, ts[i + 1])
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        else:
            x = x_euler
        _report(callback, i, t, sigma, _to_vp(x, sigma_next), pred_x0)
    return x


# --- the registry and the front end --------------------------------------------------------------

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}

_COMMON = ("denoiser", "x", "steps", "spacing", "steps_offset", "timesteps", "karras", "generator", "callback")


class _EarlyExit(Exception):
    def __init__(self, pred_x0):
        self.pred_x0 = pred_x0


def _early_exit_steps(early_exit, n_steps: int):
    """early_exit as the number of steps to run (None: all of them)."""
    if early_exit is None:
        return None
    if isinstance(early_exit, float) and 0 < early_exit <= 1:
        return max(1, round(early_exit * n_steps))
    if isinstance(early_exit, int) and not isinstance(early_exit, bool) and 1 <= early_exit <= n_steps:
        return early_exit
    raise SamplerError(
        f"early_exit must be a fraction in (0, 1] of the steps or a number of steps from 1 to {n_steps}, "
        f"got {early_exit!r}"
    )


def _shape_checked(model):
    """model, with an output that is not shaped like its input x_t refused (it would broadcast silently)."""

    def checked(x, t):
        out = model(x, t)
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise SamplerError(f"the model returned {got} for x_t of shape {tuple(x.shape)}: it must return eps "
                               "(or v, or x0) shaped like x_t; check its output channels (out_channels)")
        return out

    return checked


@torch.no_grad()
def sample(model, noise, sampler="dpmpp_2m", steps=20, *, prediction_type="epsilon", schedule=None,
           spacing="leading", steps_offset=1, timesteps=None, karras=False, eta=None, generator=None,
           callback=None, early_exit=None, progress=False, **options):
    """Denoise `noise` (from N(0, I)) with `model(x_t, t) -> eps | v | x0` and the sampler named `sampler`.

    `early_exit` (a fraction of the steps, or a number of steps) stops after that step and returns its
    pred_x0; `progress=True` shows a bar; other keyword options go to the sampler (e.g. ddim's eta).
    """
    if sampler not in SAMPLERS:
        raise SamplerError(f"unknown sampler {sampler!r}. Valid names: {', '.join(sorted(SAMPLERS))}")
    function = SAMPLERS[sampler]
    if eta is not None:
        options["eta"] = eta
    own_options = [name for name in inspect.signature(function).parameters if name not in _COMMON]
    for name in options:
        if name not in own_options:
            raise SamplerError(
                f"{sampler} has no option {name!r}; its own options are: {', '.join(own_options) or 'none'}"
            )
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        got = noise.dtype if torch.is_tensor(noise) else type(noise).__name__
        raise SamplerError(f"noise must be a floating-point tensor such as torch.randn(1, 4, 64, 64), got {got}")
    if noise.ndim < 2 or noise.numel() == 0:
        raise SamplerError(f"noise must be a batch of latents such as torch.randn(1, 4, 64, 64), got shape "
                           f"{tuple(noise.shape)}")
    if not torch.isfinite(noise).all():
        raise SamplerError("noise holds NaN or inf: start from finite noise such as torch.randn(1, 4, 64, 64)")
    if not callable(model):
        raise SamplerError(f"model must be a function (x_t, t) -> eps (or v, or x0), got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise SamplerError(f"callback must be a function (step, timestep, sigma, x, pred_x0), got "
                           f"{type(callback).__name__}")
    for name, flag in (("karras", karras), ("progress", progress)):
        if not isinstance(flag, bool):
            raise SamplerError(f"{name} must be True or False, got {flag!r}")
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise SamplerError(f"schedule must be a minidiff NoiseSchedule (e.g. NoiseSchedule.sd()), got "
                           f"{type(schedule).__name__}")
    model = _shape_checked(model)
    schedule = schedule or NoiseSchedule.sd()
    if timesteps is not None:
        n_steps = len(schedule.check_custom_timesteps(timesteps))
    else:
        schedule.check_steps(steps)
        n_steps = steps
    stop_after = _early_exit_steps(early_exit, n_steps)

    denoiser = Denoiser(model, schedule, prediction_type)
    denoiser.step = 0
    bar = tqdm(total=stop_after or n_steps, desc=sampler, disable=not progress)

    def on_step(**info):
        bar.update(1)
        denoiser.step = info["step"] + 1  # the model calls that follow belong to the next step
        if callback is not None:
            callback(**info)
        if stop_after is not None and info["step"] + 1 == stop_after:
            raise _EarlyExit(info["pred_x0"])

    try:
        x = function(denoiser, noise, steps, spacing=spacing, steps_offset=steps_offset, timesteps=timesteps,
                     karras=karras, generator=generator, callback=on_step, **options)
    except _EarlyExit as stop:
        x = stop.pred_x0
    finally:
        bar.close()
    denoiser.check_finite()
    return x
