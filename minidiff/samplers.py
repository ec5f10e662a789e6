"""Samplers: pure functions that turn noise into a clean latent, one denoising step at a time.

Each sampler is a loop over a grid that the schedule lays out (`minidiff.schedule`), as k-diffusion's
samplers take `sigmas`, and returns the final latent x_0:

    sample_ddpm(denoiser, x, timesteps, *, generator=None, callback=None)
    sample_ddim(denoiser, x, timesteps, prev_timesteps, *, generator=None, callback=None, eta=0.0)
    sample_lcm(denoiser, x, timesteps, *, generator=None, callback=None)
    sample_euler, sample_euler_a, sample_heun(denoiser, x, timesteps, sigmas, *, generator=None, callback=None)
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc: the same, in `minidiff.solvers`

`denoiser` is a `minidiff.schedule.Denoiser`. `x` is the first latent: x_T in VP space for the samplers that
step there (ddpm, ddim, lcm and the multistep solvers), x = x0 + sigma_0 eps in k-diffusion space for euler,
euler_a and heun. `sampler_grid(schedule, name, steps, ...)` gives the grid of each as the diffusers scheduler
it mirrors lays it out; by hand, what `sample(model, noise, "euler", 20, spacing="trailing")` does is

    timesteps, sigmas = schedule.sigma_grid(20, spacing="trailing")
    x = noise * init_noise_sigma(float(sigmas[0]), "trailing")  # diffusers' start for Euler, trailing
    x0 = sample_euler(Denoiser(model, schedule), x, timesteps, sigmas)

After step i a sampler calls
    callback(step=i, timestep=t, sigma=s, x=x_inter, pred_x0=pred_x0)
with t and s = sqrt((1 - alpha_bar_t) / alpha_bar_t) where the model was evaluated, x_inter the new
latent in VP space (what the UNet sees) and pred_x0 the model's guess of the clean latent.
A callback that returns a tensor shaped like x_inter changes the run: the sampler goes on from that latent
(diffusers' callback_on_step_end contract); one that returns None changes nothing.

Notation shared by all samplers (Ho et al. 2020; Karras et al. 2022):
    abar, abar_prev   -> alpha_bar_t, alpha_bar_{t_prev}: the signal kept at this and the next timestep
    sigma, sigma_next -> sigma_i, sigma_{i+1}: k-diffusion noise levels, x = x0 + sigma eps
    pred_x0, pred_eps -> x0_theta(x_t, t), eps_theta(x_t, t)
    d                 -> dx/dsigma = (x - x0_theta) / sigma = eps_theta, the probability-flow ODE (Karras
                         eq. 4); taken as pred_eps, which avoids cancelling x - x0 at small sigma

`sample(model, noise, sampler, steps, ...)` at the bottom is the front end: it wraps the model, builds the
grid, scales the noise to the sampler's first latent as diffusers does (so that the same noise gives the same
picture), and adds early exit, a progress bar and the NaN check, so that the samplers stay a loop.
"""

import inspect
import math

import torch
from tqdm.auto import tqdm

from minidiff.errors import SamplerError
from minidiff.schedule import Denoiser, NoiseSchedule, init_noise_sigma, randn_like
from minidiff.solvers import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc  # the multistep solvers


def _report(callback, step, t, sigma, x, pred_x0):
    """Tell the callback about the step; returns the latent to go on from: x, or the one the callback returned."""
    if callback is None:
        return x
    changed = callback(step=step, timestep=t, sigma=float(sigma), x=x, pred_x0=pred_x0)
    return x if changed is None else changed


# --- samplers in VP space: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps ------------------------------


def sample_ddpm(denoiser, x, timesteps, *, generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7).

    Notation (the chain jumps from t to the next visited timestep t_prev; abar_prev = 1 after the last):
        alpha, beta      -> alpha_t = abar / abar_prev, beta_t = 1 - alpha_t for the jump
        coef_x0, coef_xt -> the posterior mean mu~_t(x_t, x0) = coef_x0 x0 + coef_xt x_t (eq. 7)
        posterior_var    -> beta~_t = (1 - abar_prev) / (1 - abar) beta_t, the "fixed small" variance
    """
    schedule = denoiser.schedule
    ts = torch.as_tensor(timesteps).tolist()
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
            x = x + math.sqrt(posterior_var) * randn_like(x, generator)
        x = _report(callback, i, t, schedule.sigmas[t], x, pred_x0)
    return x


def sample_ddim(denoiser, x, timesteps, prev_timesteps, *, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12): eta = 0 deterministic, 1 DDPM-like.

    Notation (each step goes from t to its t_prev; t_prev = -1 is the end):
        a_t, a_prev -> alpha_t, alpha_{t-1} of the paper (= our abar, abar_prev; alpha_bar_0 after the last step,
                       as SD ships it with set_alpha_to_one=False)
        sigma_t     -> sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
        dir_xt      -> sqrt(1 - a_prev - sigma_t^2) eps_theta(x_t), the direction pointing to x_t
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise SamplerError(f"ddim's eta must be a number from 0 (deterministic DDIM) to 1 (DDPM-like), got {eta!r}")
    schedule = denoiser.schedule
    ts, prev_ts = torch.as_tensor(timesteps).tolist(), torch.as_tensor(prev_timesteps).tolist()
    for i, (t, t_prev) in enumerate(zip(ts, prev_ts)):
        a_t = float(schedule.alphas_cumprod[t])
        a_prev = float(schedule.alphas_cumprod[max(t_prev, 0)])  # t_prev = -1: the end, alpha_bar_0
        # current prediction for x_0 (and the noise it implies)
        pred_x0, pred_eps = denoiser(x, t)
        # the noise level of this step, eq. 16 scaled by eta
        sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # direction pointing to x_t
        dir_xt = math.sqrt(1 - a_prev - sigma_t**2) * pred_eps
        # random noise
        noise = sigma_t * randn_like(x, generator) if eta > 0 else 0.0
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + noise
        x = _report(callback, i, t, schedule.sigmas[t], x, pred_x0)
    return x


LCM_TIMESTEP_SCALING = 10.0  # c_skip, c_out are evaluated at 10 t (diffusers' LCMScheduler default)
LCM_SIGMA_DATA = 0.5


def sample_lcm(denoiser, x, timesteps, *, generator=None, callback=None):
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", algorithm 1).

    The timesteps come from the grid the model was distilled on (`NoiseSchedule.lcm_timesteps`).
    Notation (Song et al. 2023, consistency models, eq. 7):
        c_skip, c_out -> the boundary-condition scalings: f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t),
                         with f(x, 0) = x; evaluated at t * LCM_TIMESTEP_SCALING with sigma_data = 0.5
        denoised      -> f(x, t), the consistency function's clean estimate (reported as pred_x0)
    """
    schedule = denoiser.schedule
    ts = torch.as_tensor(timesteps).tolist()
    for i, t in enumerate(ts):
        pred_x0, _ = denoiser(x, t)
        scaled_t = t * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (scaled_t**2 + LCM_SIGMA_DATA**2)
        c_out = scaled_t / math.sqrt(scaled_t**2 + LCM_SIGMA_DATA**2)
        denoised = c_out * pred_x0 + c_skip * x
        if i + 1 < len(ts):  # noise the estimate back to the next timestep
            abar_prev = float(schedule.alphas_cumprod[ts[i + 1]])
            x = math.sqrt(abar_prev) * denoised + math.sqrt(1 - abar_prev) * randn_like(x, generator)
        else:
            x = denoised
        x = _report(callback, i, t, schedule.sigmas[t], x, denoised)
    return x


# --- samplers in k-diffusion space: x = x_t / alpha_t = x0 + sigma eps ---------------------------


def _to_vp(x, sigma):
    """k-diffusion x = x_t / alpha_t at noise level sigma -> the VP latent x_t."""
    return x * (1 / math.sqrt(1 + sigma**2))


def _report_k(callback, step, t, sigma, sigma_next, x, pred_x0):
    """_report for the samplers in k-diffusion space: the callback sees, and may return, the VP latent x_t."""
    if callback is None:
        return x
    x_t = _to_vp(x, sigma_next)
    changed = _report(callback, step, t, sigma, x_t, pred_x0)
    return x if changed is x_t else changed * math.sqrt(1 + sigma_next**2)


def sample_euler(denoiser, x, timesteps, sigmas, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space...", alg. 1).

    Notation (N timesteps, N + 1 sigmas ending with 0; deterministic, generator unused):
        x -> x0 + sigma eps = x_t / alpha_t, the latent in k-diffusion space
        d -> dx/dsigma = (x - D(x; sigma)) / sigma = pred_eps, with D = pred_x0 the denoiser of Karras eq. 3
    """
    ts, sigmas = torch.as_tensor(timesteps).tolist(), torch.as_tensor(sigmas).tolist()
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0, pred_eps = denoiser.at_sigma(x, sigma, t)
        d = pred_eps
        x = x + d * (sigma_next - sigma)
        x = _report_k(callback, i, t, sigma, sigma_next, x, pred_x0)
    return x


def sample_euler_a(denoiser, x, timesteps, sigmas, *, generator=None, callback=None):
    """Euler ancestral sampling (k-diffusion's; Song et al. 2021, "Score-Based Generative Modeling through SDEs").

    An Euler step down to sigma_down, then fresh noise from `generator` up to sigma_next.
    Notation (x, d as in sample_euler):
        sigma_up   -> the std of the fresh noise: sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down -> sqrt(sigma_next^2 - sigma_up^2), where the deterministic step lands
    """
    ts, sigmas = torch.as_tensor(timesteps).tolist(), torch.as_tensor(sigmas).tolist()
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0, pred_eps = denoiser.at_sigma(x, sigma, t)
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        d = pred_eps
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * randn_like(x, generator)
        x = _report_k(callback, i, t, sigma, sigma_next, x, pred_x0)
    return x


def sample_heun(denoiser, x, timesteps, sigmas, *, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design...", alg. 1).

    Two model calls per step (one on the last step, an Euler step down to sigma = 0); deterministic.
    Notation (x as in sample_euler):
        d, d_next -> dx/dsigma at (x, sigma) and at the Euler estimate (x_euler, sigma_next);
                     the step follows their mean (the trapezoidal rule). pred_x0 reported is D(x; sigma).
    """
    ts, sigmas = torch.as_tensor(timesteps).tolist(), torch.as_tensor(sigmas).tolist()
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
        x = _report_k(callback, i, t, sigma, sigma_next, x, pred_x0)
    return x


# --- the registry, the grids and the front end ----------------------------------------------------

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
# the NoiseSchedule method that lays out each sampler's grid
GRIDS = {"ddpm": "vp_timesteps", "ddim": "ddim_timesteps", "lcm": "lcm_timesteps",
         "euler": "sigma_grid", "euler_a": "sigma_grid", "heun": "sigma_grid",
         "dpmpp_2m": "multistep_grid", "dpmpp_2m_sde": "multistep_grid", "unipc": "multistep_grid"}
K_DIFFUSION_SPACE = ("euler", "euler_a", "heun")  # the samplers whose x is x0 + sigma eps, not x_t
KARRAS_SAMPLERS = tuple(name for name, grid in GRIDS.items() if grid in ("sigma_grid", "multistep_grid"))
GRID_OPTIONS = {"lcm": ("original_inference_steps",)}  # options of a sampler's grid rather than its loop


def sampler_grid(schedule: NoiseSchedule, sampler: str, steps=20, spacing="leading", steps_offset=1,
                 timesteps=None, karras=False, **grid_options) -> tuple:
    """The grid `sampler` steps over: the arguments that follow (denoiser, x) in its function."""
    if karras and sampler not in KARRAS_SAMPLERS:
        raise SamplerError(
            f"karras=True is for the samplers that step through noise levels ({', '.join(KARRAS_SAMPLERS)}); "
            f"{sampler} steps through integer timesteps: drop karras=True or pick one of those"
        )
    if GRIDS[sampler] == "lcm_timesteps":  # the distillation grid: no spacing
        return (schedule.lcm_timesteps(steps, timesteps=timesteps, **grid_options),)
    if GRIDS[sampler] in ("vp_timesteps", "ddim_timesteps"):
        grid = getattr(schedule, GRIDS[sampler])(steps, spacing, steps_offset, timesteps)
    else:
        grid = getattr(schedule, GRIDS[sampler])(steps, spacing, steps_offset, timesteps, karras)
    return grid if isinstance(grid, tuple) else (grid,)


def call_grid(schedule: NoiseSchedule, sampler: str, steps: int, timesteps, options: dict) -> tuple:
    """sampler_grid for the keyword options of a sample() call (spacing, steps_offset, karras, grid options)."""
    grid_options = {name: options[name] for name in GRID_OPTIONS.get(sampler, ()) if name in options}
    return sampler_grid(schedule, sampler, steps, options.get("spacing", "leading"), options.get("steps_offset", 1),
                        timesteps, options.get("karras", False), **grid_options)


def add_noise_at(schedule: NoiseSchedule, sampler: str, grid: tuple, step: int, x0, noise):
    """x0 noised to point `step` of `sampler`'s grid, as that sampler's latent there (img2img's start), the way
    the diffusers scheduler's add_noise does it: x = x0 + sigma noise at the grid's own sigma (fractional
    timesteps and Karras sigmas included) for euler, euler_a and heun; the VP latent x_t = alpha x0 + sigma_vp
    noise for the others (alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma alpha)."""
    if GRIDS[sampler] in ("sigma_grid", "multistep_grid"):  # the grids that carry their own sigmas
        sigma = float(grid[1][step])
        x = x0 + sigma * noise
        return x if sampler in K_DIFFUSION_SPACE else x * (1 / math.sqrt(1 + sigma**2))
    return schedule.add_noise(x0, noise, int(grid[0][step]))


class _EarlyExit(Exception):
    def __init__(self, latent):
        self.latent = latent  # pred_x0 (early_exit) or x_t (end_step)


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


def _checked_latent(changed, x):
    """What a callback returned: None (go on from x), or a latent shaped like x to go on from instead."""
    if changed is None:
        return None
    if not torch.is_tensor(changed) or not changed.is_floating_point() or changed.shape != x.shape:
        got = tuple(changed.shape) if torch.is_tensor(changed) else type(changed).__name__
        raise SamplerError(f"the callback returned {got}: return None (nothing changes) or a latent shaped like its "
                           f"x, {tuple(x.shape)}, to go on from")
    if not torch.isfinite(changed).all():
        raise SamplerError("the callback returned a latent with NaN or inf: return finite values (or None)")
    return changed.to(x.device, x.dtype)


def _check_start(first_step, x0, noise, noise_is_x_t: bool, n_steps: int, end_step) -> None:
    if isinstance(first_step, bool) or not isinstance(first_step, int) or not 0 <= first_step < n_steps:
        raise SamplerError(f"first_step must be an integer from 0 to {n_steps - 1} (the grid has {n_steps} steps), "
                           f"got {first_step!r}")
    if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int)
                                 or not first_step < end_step <= n_steps):
        raise SamplerError(f"end_step must be an integer from {first_step + 1} (after first_step) to {n_steps} (the "
                           f"grid's steps), got {end_step!r}")
    if x0 is None and first_step > 0 and not noise_is_x_t:
        raise SamplerError(f"first_step={first_step} starts inside the grid: give x0, the clean latent to noise there "
                           "(img2img), or the latent there with noise_is_x_t=True, or use first_step=0")
    if x0 is not None and noise_is_x_t:
        raise SamplerError("x0 (the clean latent, noised at first_step) and noise_is_x_t=True (the noise is already "
                           "the latent x_t) exclude each other: drop one")
    if x0 is not None and (not torch.is_tensor(x0) or x0.shape != noise.shape):
        got = tuple(x0.shape) if torch.is_tensor(x0) else type(x0).__name__
        raise SamplerError(f"x0 must be a latent tensor shaped like the noise {tuple(noise.shape)}, got {got}")


@torch.no_grad()
def sample(model, noise, sampler="dpmpp_2m", steps=20, *, prediction_type="epsilon", schedule=None,
           spacing="leading", steps_offset=1, timesteps=None, karras=False, eta=None, generator=None,
           callback=None, early_exit=None, progress=False, noise_is_x_t=False, first_step=0, x0=None, end_step=None,
           **options):
    """Denoise `noise` (from N(0, I)) with `model(x_t, t) -> eps | v | x0` and the sampler named `sampler`.

    The grid comes from `steps`, `spacing` and `steps_offset`, or from a custom `timesteps` list; `karras=True`
    respaces the noise levels of the samplers in KARRAS_SAMPLERS. The noise becomes the first latent as in
    diffusers (`minidiff.schedule.init_noise_sigma`; the spacing decides it even with custom timesteps, as there);
    `noise_is_x_t=True` takes it instead as the VP latent x_t at the first timestep (at step `first_step` when
    x0 is not given: the second of two expert denoisers goes on from the first's latent, minidiff.refiner).
    `end_step=k` stops before grid step k and returns the latent x_t there (VP space; the first expert's handover).
    img2img, as diffusers' StableDiffusionImg2ImgPipeline: `first_step=k` runs the sampler's own grid from its
    step k on (diffusers' t_start; a Heun step holds both its model calls, where diffusers counts t_start * 2),
    and `x0`, the clean latent, is noised there with `noise` (`add_noise_at`). The callback's steps, `early_exit`
    and the progress bar count the steps run, from 0, as diffusers' callback does.
    `early_exit` (a fraction of the steps, or a number of steps) stops after that step and returns its pred_x0;
    `progress=True` shows a bar; other keyword options go to the sampler (e.g. ddim's eta, lcm's
    original_inference_steps).
    """
    if sampler not in SAMPLERS:
        raise SamplerError(f"unknown sampler {sampler!r}. Valid names: {', '.join(sorted(SAMPLERS))}")
    function = SAMPLERS[sampler]
    if eta is not None:
        options["eta"] = eta
    loop_options = [p.name for p in inspect.signature(function).parameters.values()
                    if p.kind is p.KEYWORD_ONLY and p.name not in ("generator", "callback")]
    own_options = loop_options + list(GRID_OPTIONS.get(sampler, ()))
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
    for name, flag in (("karras", karras), ("progress", progress), ("noise_is_x_t", noise_is_x_t)):
        if not isinstance(flag, bool):
            raise SamplerError(f"{name} must be True or False, got {flag!r}")
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise SamplerError(f"schedule must be a minidiff NoiseSchedule (e.g. NoiseSchedule.sd()), got "
                           f"{type(schedule).__name__}")
    model = _shape_checked(model)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SamplerError(f"generator must be a torch.Generator or None, got {type(generator).__name__}: "
                           "pass torch.Generator().manual_seed(seed)")
    schedule = schedule or NoiseSchedule.sd()
    grid_options = {name: options.pop(name) for name in GRID_OPTIONS.get(sampler, ()) if name in options}
    grid = sampler_grid(schedule, sampler, steps, spacing, steps_offset, timesteps, karras, **grid_options)
    _check_start(first_step, x0, noise, noise_is_x_t, len(grid[0]), end_step)

    if x0 is not None:  # img2img: the image noised to the grid point where the run starts
        x = add_noise_at(schedule, sampler, grid, first_step, x0, noise)
    elif sampler in K_DIFFUSION_SPACE:  # x = x0 + sigma eps
        sigma = float(grid[1][first_step])
        x = noise * (math.sqrt(1 + sigma**2) if noise_is_x_t else init_noise_sigma(sigma, spacing))
    else:
        x = noise
    grid = tuple(part[first_step:] for part in grid)  # sigmas keep their final 0
    n_steps = (end_step or first_step + len(grid[0])) - first_step
    stop_after = _early_exit_steps(early_exit, n_steps)

    denoiser = Denoiser(model, schedule, prediction_type)
    denoiser.step = 0
    bar = tqdm(total=stop_after or n_steps, desc=sampler, disable=not progress)

    def on_step(**info):
        bar.update(1)
        denoiser.step = info["step"] + 1  # the model calls that follow belong to the next step
        changed = _checked_latent(callback(**info), info["x"]) if callback is not None else None
        if stop_after is not None and info["step"] + 1 == stop_after:
            raise _EarlyExit(info["pred_x0"])
        if info["step"] + 1 == n_steps < len(grid[0]):  # end_step: hand over the latent x_t
            raise _EarlyExit(info["x"] if changed is None else changed)
        return changed

    try:
        x = function(denoiser, x, *grid, generator=generator, callback=on_step, **options)
    except _EarlyExit as stop:
        x = stop.latent
    finally:
        bar.close()
    denoiser.check_finite()
    return x
