"""Noise schedules: the forward process q(x_t | x_0) and the grids of timesteps and noise levels samplers visit.

Notation (Ho et al. 2020, DDPM; Karras et al. 2022, EDM):
    betas[t]          -> beta_t, the variance added at training step t
    alphas_cumprod[t] -> alpha_bar_t = prod_{s<=t} (1 - beta_s)
    alpha_t, sigma_t  -> sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t): x_t = alpha_t x_0 + sigma_t eps
    sigmas[t]         -> sigma_t / alpha_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the "k-diffusion"
                         noise level: x_t / alpha_t = x_0 + sigmas[t] eps
    log_snr[t]        -> lambda_t = log(alpha_t^2 / sigma_t^2) = -2 log sigmas[t]

Timesteps run from noisy (t = 999) to clean (t = 0). The three spacings of N inference steps
over T training steps are those of the diffusers schedulers (Lin et al. 2023, table 2):
    leading   -> 0, T/N, 2T/N, ... plus steps_offset (SD 1.x/2.x ship steps_offset = 1)
    trailing  -> T-1, T-1-T/N, ...   (always starts at the noisiest step)
    linspace  -> N points evenly from 0 to T-1, rounded

Every grid a sampler steps over is laid out here, once, and handed to the sampler (as k-diffusion hands
its samplers `sigmas`): `vp_timesteps` (DDPM), `ddim_timesteps`, `lcm_timesteps`, `sigma_grid` (Euler,
Euler ancestral, Heun) and `multistep_grid` (DPM-Solver++, UniPC), each as the diffusers scheduler of
that sampler lays it out. `init_noise_sigma` says how unit noise becomes a sampler's first latent.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from minidiff.errors import SamplerError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class NoiseSchedule:
    num_train_timesteps: int = 1000  # T
    beta_start: float = 0.00085  # beta_0 (SD's value)
    beta_end: float = 0.012  # beta_{T-1} (SD's value)
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2

    def __post_init__(self):
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise SamplerError(f"num_train_timesteps must be an integer of at least 2 (SD: 1000), got {T!r}: "
                               "check scheduler/scheduler_config.json")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise SamplerError(f"{name} must be a number between 0 and 1 (SD: 0.00085 and 0.012), got {value!r}: "
                                   "check scheduler/scheduler_config.json")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise SamplerError(
                f"unknown beta_schedule {self.beta_schedule!r}: use one of {', '.join(BETA_SCHEDULES)}"
            )
        T = self.num_train_timesteps
        # float32 like the published schedulers, so the schedule is bit-for-bit the one SD shipped with
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:  # Nichol & Dhariwal 2021, the cosine schedule, each beta capped at 0.999
            alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor(
                [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                dtype=torch.float32,
            )
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).double()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_snr = -2 * self.sigmas.log()

    @classmethod
    def sd(cls) -> "NoiseSchedule":
        """The schedule every SD 1.x and 2.x model was trained with."""
        return cls(1000, 0.00085, 0.012, "scaled_linear")

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """From a diffusers `scheduler_config.json` dict (unknown keys ignored)."""
        return cls(
            config.get("num_train_timesteps", 1000),
            config.get("beta_start", 0.00085),
            config.get("beta_end", 0.012),
            config.get("beta_schedule", "scaled_linear"),
        )

    # --- the forward process -------------------------------------------------------------------

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer timesteps t."""
        alpha_bar = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long)]
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0): x_t = alpha_t x_0 + sigma_t eps, with t an int or one per batch item."""
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        alpha = alpha.to(x0.device, x0.dtype).reshape(shape)
        sigma = sigma.to(x0.device, x0.dtype).reshape(shape)
        return alpha * x0 + sigma * noise

    # --- the grids the samplers step over (each as the diffusers scheduler it mirrors lays it out) --

    def check_steps(self, steps: int) -> None:
        T = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1 or steps > T:
            raise SamplerError(f"steps must be an integer from 1 to {T} (the training timesteps), got {steps!r}")

    def _check_offset(self, steps_offset) -> None:
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
            raise SamplerError(f"steps_offset must be a non-negative integer (SD ships 1), got {steps_offset!r}")

    def _check_last(self, ts, steps: int, spacing: str, steps_offset: int) -> None:
        T = self.num_train_timesteps
        if ts.max() > T - 1:
            raise SamplerError(
                f"{spacing} spacing with steps_offset={steps_offset} and {steps} steps reaches timestep "
                f"{int(ts.max())}, past the last one ({T - 1}): use fewer steps (or, from Python, a smaller "
                "steps_offset or spacing='trailing')"
            )

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 1, rounded: bool = True):
        """The N timesteps to visit, noisiest first: int64, or float64 if `rounded=False` (DDPM, DDIM, Euler, Heun).

        The diffusers Euler and Heun schedulers do not round the linspace grid (999, 832.5, ...);
        the others (DDPM, DDIM) do. Leading and trailing grids are integers either way.
        """
        self.check_steps(steps)
        self._check_offset(steps_offset)
        T = self.num_train_timesteps
        if spacing == "leading":
            ts = np.arange(steps) * (T // steps) + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, steps)
            ts = ts.round() if rounded else ts
        else:
            raise SamplerError(f"unknown timestep spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
        self._check_last(ts, steps, spacing, steps_offset)
        ts = np.sort(ts)[::-1].copy()
        return torch.from_numpy(ts.astype(np.int64)) if rounded else torch.from_numpy(ts.astype(np.float64))

    def check_custom_timesteps(self, timesteps) -> torch.Tensor:
        """Validate a user list such as [999, 950, 900, 800, ..., 10, 5, 1]; returns int64."""
        try:
            ts = torch.as_tensor([float(t) for t in timesteps], dtype=torch.float64)
        except (TypeError, ValueError):
            raise SamplerError(f"custom timesteps must be a list of integers such as [999, 500, 1], "
                               f"got {timesteps!r}") from None
        T = self.num_train_timesteps
        if ts.numel() == 0:
            raise SamplerError("the custom timestep list is empty: give at least one timestep, e.g. [999, 500, 1]")
        if (ts != ts.round()).any() or ts.min() < 0 or ts.max() > T - 1:
            raise SamplerError(f"custom timesteps must be integers from 0 to {T - 1}, got {timesteps!r}")
        if (ts[1:] >= ts[:-1]).any():
            raise SamplerError(
                f"custom timesteps must be strictly decreasing (noisiest first), got {timesteps!r}"
            )
        return ts.long()

    def vp_timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 1, timesteps=None):
        """DDPM's grid: the N integer timesteps of `timesteps()`, or a custom list checked."""
        if timesteps is not None:
            return self.check_custom_timesteps(timesteps)
        return self.timesteps(steps, spacing, steps_offset)

    def ddim_timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 1, timesteps=None):
        """(t, t_prev) pairs of diffusers' DDIMScheduler; t_prev = -1 means "the end", alpha_bar_0.

        DDIM steps back by T // N from every timestep whatever the spacing (so with trailing or
        linspace grids t_prev can land beside, not on, the next timestep); with a custom list it
        steps to the next listed timestep.
        """
        if timesteps is not None:
            ts = self.check_custom_timesteps(timesteps)
            return ts, torch.cat([ts[1:], ts.new_tensor([-1])])
        ts = self.timesteps(steps, spacing, steps_offset)
        return ts, (ts - self.num_train_timesteps // steps).clamp(min=-1)

    def lcm_timesteps(self, steps: int, original_inference_steps: int = 50, timesteps=None) -> torch.Tensor:
        """The timesteps of diffusers' LCMScheduler: N picked evenly from the distillation grid
        (T/M - 1, 2T/M - 1, ..., T - 1) of M = original_inference_steps, noisiest first."""
        if timesteps is not None:
            return self.check_custom_timesteps(timesteps)
        T = self.num_train_timesteps
        if not isinstance(original_inference_steps, (int, np.integer)) or not 1 <= original_inference_steps <= T:
            raise SamplerError(f"original_inference_steps must be an integer from 1 to {T}, "
                               f"got {original_inference_steps!r}")
        self.check_steps(steps)
        if steps > original_inference_steps:
            raise SamplerError(
                f"lcm takes at most original_inference_steps={original_inference_steps} steps (the grid it was "
                f"distilled on), got steps={steps}: use fewer steps"
            )
        grid = (np.arange(1, original_inference_steps + 1) * (T // original_inference_steps) - 1)[::-1]
        picks = np.floor(np.linspace(0, original_inference_steps, steps, endpoint=False)).astype(np.int64)
        return torch.from_numpy(grid[picks].copy())

    def sigma_grid(self, steps: int, spacing: str = "leading", steps_offset: int = 1, timesteps=None,
                   karras: bool = False):
        """(timesteps, sigmas) of diffusers' Euler/Heun schedulers: N fractional timesteps, N + 1 sigmas
        ending with 0. karras=True respaces the N sigmas by Karras et al. 2022, eq. 5, between the
        grid's first and last, and maps them back to fractional timesteps."""
        _check_karras_custom(karras, timesteps)
        if timesteps is not None:
            ts = self.check_custom_timesteps(timesteps).double()
        else:
            ts = self.timesteps(steps, spacing, steps_offset, rounded=False)
        sigmas = self.sigma_at(ts)
        if karras:
            sigmas = self.karras_sigmas(len(ts), sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))
            ts = self.t_at(sigmas)
        return ts, torch.cat([sigmas, sigmas.new_zeros(1)])

    def multistep_grid(self, steps: int, spacing: str = "leading", steps_offset: int = 1, timesteps=None,
                       karras: bool = False):
        """(timesteps, sigmas) of diffusers' DPM-Solver++ and UniPC schedulers: N integer timesteps,
        N + 1 sigmas ending with 0 (so the last step lands on the clean prediction).

        Their leading and linspace grids split [0, T) into N + 1 pieces and drop the clean end, unlike
        DDIM's; karras=True spaces N sigmas over the whole training range (Karras et al. 2022, eq. 5)
        whatever the spacing, each evaluated at its nearest timestep.
        """
        _check_karras_custom(karras, timesteps)
        if timesteps is not None:
            ts = self.check_custom_timesteps(timesteps)
            sigmas = self.sigmas[ts]
        elif karras:
            self.check_steps(steps)
            sigmas = self.karras_sigmas(steps)
            ts = self.t_at(sigmas).round().long()
        else:
            self.check_steps(steps)
            self._check_offset(steps_offset)
            T = self.num_train_timesteps
            if spacing == "leading":  # multiples of T // (N + 1), the 0 dropped, then shifted by steps_offset
                ts = np.arange(steps, 0, -1) * (T // (steps + 1)) + steps_offset
            elif spacing == "trailing":  # from T - 1 down in steps of T / N
                ts = np.round(np.arange(T, 0, -T / steps)) - 1
            elif spacing == "linspace":  # N + 1 points evenly over [0, T - 1], the 0 dropped
                ts = np.linspace(0, T - 1, steps + 1).round()[:0:-1]
            else:
                raise SamplerError(f"unknown timestep spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
            self._check_last(ts, steps, spacing, steps_offset)
            ts = torch.from_numpy(ts.astype(np.int64))
            sigmas = self.sigmas[ts]
        if (sigmas[1:] >= sigmas[:-1]).any():
            raise SamplerError(
                f"spacing={spacing!r} with {steps} steps repeats timesteps ({ts.tolist()[-5:]} at the end): "
                "use fewer steps (or, from Python, spacing='trailing')"
            )
        return ts, torch.cat([sigmas, sigmas.new_zeros(1)])

    # --- timesteps <-> noise levels (k-diffusion's sigma space) --------------------------------

    def sigma_at(self, t) -> torch.Tensor:
        """sigmas at (possibly fractional) timesteps, linearly interpolated between integers."""
        t = torch.as_tensor(t, dtype=torch.float64)
        grid = torch.arange(self.num_train_timesteps, dtype=torch.float64)
        return torch.from_numpy(np.asarray(np.interp(t.numpy(), grid.numpy(), self.sigmas.numpy())))

    def t_at(self, sigma) -> torch.Tensor:
        """The fractional timestep of each sigma, interpolating log(sigma) (k-diffusion's sigma_to_t)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        log_sigmas = self.sigmas.log()
        # index of the training sigma just below each query, then linear interpolation in log space
        low = torch.searchsorted(log_sigmas, log_sigma, right=True).sub(1).clamp(0, len(log_sigmas) - 2)
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
        return low + w

    def karras_sigmas(self, n: int, sigma_min=None, sigma_max=None, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. 2022, eq. 5: n sigmas evenly spaced in sigma^(1/rho), largest first."""
        sigma_min = float(self.sigmas[0]) if sigma_min is None else sigma_min
        sigma_max = float(self.sigmas[-1]) if sigma_max is None else sigma_max
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (inv_max + ramp * (inv_min - inv_max)) ** rho


def _check_karras_custom(karras: bool, timesteps) -> None:
    if karras and timesteps is not None:
        raise SamplerError("karras=True makes its own sigmas and cannot follow custom timesteps: "
                           "drop one of karras=True and timesteps=[...]")


# --- where a sampler starts, and its fresh noise --------------------------------------------------


def init_noise_sigma(sigma_max: float, spacing: str) -> float:
    """The factor that turns unit noise into the first latent x = x0 + sigma_max eps of a sampler stepping
    in k-diffusion space (euler, euler_a, heun), as diffusers' Euler and Heun schedulers choose it:

        leading            -> sqrt(1 + sigma_max^2) = 1 / alpha_T: x = x_T / alpha_T, the UNet first sees the noise
        linspace, trailing -> sigma_max (k-diffusion's x = sigma_max eps, as if x0 = 0): the UNet first sees
                              alpha_T sigma_max eps = sqrt(1 - alpha_bar_T) eps, 0.9977 eps at SD's t = 999

    The samplers stepping in VP space (ddpm, ddim, lcm, dpmpp_2m, dpmpp_2m_sde, unipc) start from x_T = noise.
    """
    if spacing in ("linspace", "trailing"):
        return sigma_max
    return math.sqrt(1 + sigma_max**2)


def randn_like(x, generator=None, dtype=None):
    """N(0, I) noise shaped like x (in `dtype`, default x's), drawn on the generator's device and moved to
    x's, as diffusers' randn_tensor does: a CPU generator gives the same numbers on every device."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=dtype or x.dtype).to(x.device)


# --- what the network predicts <-> x0 and eps ---------------------------------------------------


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise SamplerError(
            f"unknown prediction_type {prediction_type!r}: use 'epsilon' (SD 1.x, SD 2.x base), "
            f"'v_prediction' (SD 2.x 768 models) or 'sample'"
        )


def to_x0_eps(model_output, x_t, alpha, sigma, prediction_type: str = "epsilon"):
    """Convert the network's output at x_t = alpha x0 + sigma eps into (pred_x0, pred_eps).

    epsilon:       out = eps            -> x0 = (x_t - sigma eps) / alpha
    v_prediction:  out = alpha eps - sigma x0 (Salimans & Ho 2022) -> x0 = alpha x_t - sigma v,
                                          eps = sigma x_t + alpha v   (alpha^2 + sigma^2 = 1)
    sample:        out = x0             -> eps = (x_t - alpha x0) / sigma
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
    if prediction_type == "sample":
        return model_output, (x_t - alpha * model_output) / sigma
    check_prediction_type(prediction_type)


class Denoiser:
    """Wraps a network `model(x_t, t) -> eps | v | x0` into (pred_x0, pred_eps) for the samplers.

    Three views of the same call:
        denoiser(x_t, t)               VP space: x_t = alpha_t x0 + sigma_t eps, t an integer timestep
        denoiser.at_sigma(x, sigma, t) k-diffusion space: x = x0 + sigma eps, so the network sees
                                       x_t = x / sqrt(1 + sigma^2); t is the timestep passed to it
        denoiser.at_level(x, t, abar)  VP space at the level alpha_bar = abar, the network asked at t
    The outputs are checked for NaN/inf: eagerly on the CPU (stop at the step that broke), on other
    devices through `check_finite()` after the loop, so that no step waits for the GPU. `step` is the
    sampler step being computed (kept up to date by `minidiff.sample`), for the error message.
    """

    def __init__(self, model, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        check_prediction_type(prediction_type)
        self.model, self.schedule, self.prediction_type = model, schedule, prediction_type
        self.step = None  # 0-based sampler step, or None when the caller does not track it
        self.calls = 0  # model calls so far
        self._finite = []  # (where, 0-dim bool tensor) per model call on non-CPU devices

    def __call__(self, x_t, t):
        alpha, sigma = (float(a) for a in self.schedule.alpha_sigma(int(t)))
        return self._convert(self.model(x_t, t), x_t, alpha, sigma, t)

    def at_sigma(self, x, sigma: float, t):
        sigma = float(sigma)
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        x_t = x * alpha
        return self._convert(self.model(x_t, t), x_t, alpha, sigma * alpha, t)

    def at_level(self, x, t, alpha_bar: float):
        """The network called at timestep t on a latent x that sits at another noise level, alpha_bar (DDIM
        inversion feeds x_{t_prev} at the t it heads to), converted with that level's alpha and sigma."""
        return self._convert(self.model(x, t), x, math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar), t)

    def _convert(self, out, x_t, alpha, sigma, t):
        self.calls += 1
        if self._deferred(out):
            self._finite.append(((self.step, self.calls, t), torch.isfinite(out).all()))
        elif not torch.isfinite(out).all():
            raise SamplerError(_nan_message(self.step, self.calls, t))
        return to_x0_eps(out, x_t, alpha, sigma, self.prediction_type)

    @staticmethod
    def _deferred(out) -> bool:
        """Check on the CPU at once; elsewhere keep the flag and check after the loop (no sync per step)."""
        return out.device.type != "cpu"

    def check_finite(self) -> None:
        """Raise if any model call produced NaN/inf (one device sync, after the loop)."""
        if self._finite and not bool(torch.stack([ok for _, ok in self._finite]).all()):
            where = next(where for where, ok in self._finite if not bool(ok))
            raise SamplerError(_nan_message(*where))


def _nan_message(step, call: int, t) -> str:
    t = float(t)
    t = int(t) if t == int(t) else round(t, 3)
    where = f"model call {call}" if step is None else f"step {step} (counting from 0)"
    return (f"the model returned NaN or inf at {where}, timestep {t}: check the weights and the dtype "
            "(fp16 overflow? try dtype=torch.float32 or bfloat16)")
