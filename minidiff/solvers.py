"""Multistep solvers of the diffusion ODE/SDE: DPM-Solver++ 2M, DPM-Solver++ 2M SDE and UniPC-2.

Each reuses the clean-image predictions of earlier steps instead of calling the model twice per step,
so that 20 steps give what a first-order sampler needs 50 or more for.

Notation (Lu et al. 2022, DPM-Solver++, arXiv:2211.01095; Zhao et al. 2023, UniPC, arXiv:2302.04867):
    sigma            -> the k-diffusion noise level sqrt((1 - alpha_bar) / alpha_bar), one per grid point
    alpha, sigma_vp  -> alpha_t, sigma_t of x_t = alpha_t x_0 + sigma_t eps: 1 / sqrt(1 + sigma^2), sigma alpha
    lam              -> lambda_t = log(alpha_t / sigma_t) = -log(sigma), the half log-SNR
    h                -> h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0, the step length in lambda
    r                -> r_i = h_{i-1} / h_i, the ratio of the previous step to this one
    pred_x0          -> x_theta(x_t, t), the data prediction; D0 = x_theta at this step
    D1               -> (D0 - previous x_theta) / r, the first difference that makes the step 2nd order
    z                -> fresh N(0, I) noise (SDE only)
    m                -> UniPC's name for the data predictions x_theta at the grid points
    B_h              -> B(h) = e^{-h} - 1, UniPC's "bh2" choice of the B(h) in its update
    rho_1, rho_2     -> the UniC corrector weights, from a 2x2 linear system in h and r

The time grid is the one of the diffusers schedulers these mirror (DPMSolverMultistepScheduler,
UniPCMultistepScheduler): N timesteps noisiest first, each with its sigma, and a final sigma of 0, so
the last step lands exactly on the clean prediction. Their "leading" and "linspace" grids split
[0, T) into N + 1 pieces and drop the clean end, unlike DDIM's.
"""

import math

import numpy as np
import torch

from minidiff.errors import SamplerError

SPACINGS = ("leading", "trailing", "linspace")


# --- the time grid ------------------------------------------------------------------------------------


def _multistep_grid(schedule, steps, spacing="leading", steps_offset=1, timesteps=None, karras=False):
    """(timesteps, sigmas): N int timesteps noisiest first and N + 1 float sigmas ending in 0.

    (Could move into schedule.py as NoiseSchedule.multistep_timesteps.)
    """
    if timesteps is not None:
        if karras:
            raise SamplerError("custom timesteps and karras=True cannot be combined: pass one or the other")
        ts = schedule.check_custom_timesteps(timesteps)
        sigmas = schedule.sigmas[ts]
    elif karras:
        # Karras et al. 2022 sigmas over the whole training range, each evaluated at its nearest timestep
        schedule.check_steps(steps)
        sigmas = schedule.karras_sigmas(steps)
        ts = schedule.t_at(sigmas).round().long()
    else:
        schedule.check_steps(steps)
        T = schedule.num_train_timesteps
        if spacing == "leading":  # multiples of T // (N + 1), the 0 dropped, then shifted by steps_offset
            ts = np.arange(steps, 0, -1) * (T // (steps + 1)) + steps_offset
        elif spacing == "trailing":  # from T - 1 down in steps of T / N
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
        elif spacing == "linspace":  # N + 1 points evenly over [0, T - 1], the 0 dropped
            ts = np.linspace(0, T - 1, steps + 1).round()[:0:-1]
        else:
            raise SamplerError(f"unknown timestep spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
        ts = torch.from_numpy(ts.astype(np.int64))
        if ts.min() < 0 or ts.max() > T - 1:
            raise SamplerError(
                f"steps_offset={steps_offset} puts timesteps outside 0..{T - 1} with {steps} steps: "
                "use steps_offset=1 (SD) or 0"
            )
        sigmas = schedule.sigmas[ts]
    if len(sigmas) > 1 and (sigmas[1:] >= sigmas[:-1]).any():
        raise SamplerError(
            f"spacing={spacing!r} with {steps} steps repeats timesteps ({ts.tolist()[-5:]} at the end): "
            "use fewer steps (or, from Python, spacing='trailing')"
        )
    return ts.tolist(), sigmas.tolist() + [0.0]


def _vp(sigma: float):
    """(alpha_t, sigma_t, lambda_t) of the VP process at k-diffusion noise level sigma (sigma = 0: clean)."""
    alpha = 1.0 / math.sqrt(1.0 + sigma**2)
    lam = -math.log(sigma) if sigma > 0 else math.inf
    return alpha, sigma * alpha, lam


def _predict_x0(denoiser, x_t, sigma: float, t: int):
    """x_theta(x_t) at grid noise level sigma; on a Karras grid sigma is not exactly sigma(t), and the
    reference converts the model output with the grid's sigma while the model sees the rounded t."""
    pred_x0, _ = denoiser.at_sigma(x_t * math.sqrt(1.0 + sigma**2), sigma, t)
    return pred_x0


def _noise_like(x, generator):
    """N(0, I) in float32, drawn on the generator's device (CPU generators give device-independent results)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SamplerError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


# --- DPM-Solver++ 2M (ODE) and 2M SDE ------------------------------------------------------------------


def _dpmpp_2m(denoiser, x, ts, sigmas, eta, generator, callback):
    """The shared loop: eta = 0 is the ODE solver, eta = 1 the SDE solver of the paper."""
    out_dtype, work = x.dtype, torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 latents update in fp32
    previous = None  # (x_theta, h) of the step before, for the second-order difference
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0 = _predict_x0(denoiser, x, sigma, t)
        # diffusers draws one N(0, I) tensor of x's shape in float32 at every step (the last one too, though
        # its coefficient is 0), after the model call; drawing the same way keeps both on the same noise
        z = _noise_like(x, generator) if eta > 0 else None
        if sigma_next == 0:
            # the final step: lambda -> inf and every coefficient but that of D0 vanishes, x_0 = D0
            x = pred_x0.to(out_dtype)
        else:
            _, sigma_vp, lam = _vp(sigma)
            alpha_next, sigma_vp_next, lam_next = _vp(sigma_next)
            h = lam_next - lam
            D0 = pred_x0.to(work)
            if previous is None:  # first step: no history, first order (DDIM)
                D = D0
            else:
                pred_x0_prev, h_prev = previous
                r = h_prev / h
                D1 = (D0 - pred_x0_prev) / r
                D = D0 + 0.5 * D1  # "midpoint" second-order correction
            # x_{t} = sigma_t/sigma_s e^{-eta h} x_s + alpha_t (1 - e^{-(1+eta) h}) D + sigma_t sqrt(1 - e^{-2 eta h}) z
            x_next = (sigma_vp_next / sigma_vp * math.exp(-eta * h)) * x.to(work)  # decay of the current sample
            x_next = x_next + (alpha_next * -math.expm1(-(1 + eta) * h)) * D  # pull towards the data prediction
            if eta > 0:
                x_next = x_next + (sigma_vp_next * math.sqrt(-math.expm1(-2 * eta * h))) * z  # fresh noise
            x = x_next.to(out_dtype)
            previous = (D0, h)
        if callback is not None:
            callback(step=i, timestep=t, sigma=sigma, x=x, pred_x0=pred_x0)
    return x


def sample_dpmpp_2m(
    denoiser,
    x,
    steps,
    *,
    spacing="leading",
    steps_offset=1,
    timesteps=None,
    karras=False,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order data-prediction ODE solver (Lu et al. 2022, alg. 2).

    Step i (from sigma_i to sigma_{i+1}; the first and the last are first order):
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (D0 + D1 / 2)
    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero"). Deterministic: generator unused.
    """
    ts, sigmas = _multistep_grid(denoiser.schedule, steps, spacing, steps_offset, timesteps, karras)
    return _dpmpp_2m(denoiser, x, ts, sigmas, 0.0, None, callback)


def sample_dpmpp_2m_sde(
    denoiser,
    x,
    steps,
    *,
    spacing="leading",
    steps_offset=1,
    timesteps=None,
    karras=False,
    generator=None,
    callback=None,
    eta: float = 1.0,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), the multistep second-order data-prediction SDE solver (Lu et al. 2022, app. B).

    Step i, with z ~ N(0, I) drawn from `generator` (eta = 1: the paper and diffusers; eta = 0: the ODE solver):
        x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-(1+eta) h}) (D0 + D1 / 2)
                  + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z
    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", ...) noise for noise when
    both get a generator with the same seed; eta is k-diffusion's (sample_dpmpp_2m_sde).
    """
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise SamplerError(f"eta must be a number >= 0 (1 = the SDE solver, 0 = the ODE solver), got {eta!r}")
    ts, sigmas = _multistep_grid(denoiser.schedule, steps, spacing, steps_offset, timesteps, karras)
    return _dpmpp_2m(denoiser, x, ts, sigmas, float(eta), generator, callback)


# --- UniPC ---------------------------------------------------------------------------------------------


def _unic_weights(h: float, r: float):
    """UniC-2 weights (rho_1, rho_2) for B(h) = e^{-h} - 1 ("bh2"), Zhao et al. 2023 eq. 8 / app. C.

    Solves [[1, 1], [r_1, 1]] rho = [b_1, b_2] with the paper's r_1 = -r (the earlier point lies behind) and
    b_k = k! (-h) phi_{k+1}(-h) / B(h), where phi_1(z) = (e^z - 1) / z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z.
    """
    hh = -h  # the data-prediction form integrates over -lambda
    phi_1 = math.expm1(hh) / hh
    phi_2 = (phi_1 - 1) / hh
    phi_3 = (phi_2 - 0.5) / hh
    B_h = math.expm1(hh)
    b_1, b_2 = hh * phi_2 / B_h, 2 * hh * phi_3 / B_h
    rho_1 = (b_1 - b_2) / (1 + r)
    return rho_1, b_1 - rho_1


def sample_unipc(
    denoiser,
    x,
    steps,
    *,
    spacing="leading",
    steps_offset=1,
    timesteps=None,
    karras=False,
    generator=None,
    callback=None,
) -> torch.Tensor:
    """UniPC-2, a unified predictor-corrector multistep solver with B(h) = e^{-h} - 1 (Zhao et al. 2023).

    At step i the model's prediction m_i at x_i first corrects x_i (UniC, no extra model call), then the
    predictor (UniP) moves the corrected x_i to x_{i+1}. With p the order of the previous predictor step:
        UniP-2:  x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} B(h) (m_i + D1 / 2)      (= DPM-Solver++ 2M)
        UniC-1:  x_i <- (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i B(h) (m_{i-1} + (m_i - m_{i-1}) / 2)
        UniC-2:  x_i <- (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i B(h) (m_{i-1} + rho_1 D1 + rho_2 (m_i - m_{i-1}))
    where x_{i-1} is the corrected sample the last predictor started from and D1 the difference at i - 1.
    The first and last predictor steps are first order. Matches diffusers' UniPCMultistepScheduler(
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True), corrector on.
    Deterministic: generator unused.
    """
    ts, sigmas = _multistep_grid(denoiser.schedule, steps, spacing, steps_offset, timesteps, karras)
    out_dtype, work = x.dtype, torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 latents update in fp32
    n = len(ts)
    alphas, sigmas_vp, lams = zip(*(_vp(s) for s in sigmas))
    m = []  # m_j = x_theta at the grid points visited so far (the last three: the corrector needs m_{i-2})
    x_start, order = None, 0  # the corrected sample the last predictor started from, and that step's order
    for i, t in enumerate(ts):
        pred_x0 = _predict_x0(denoiser, x, sigmas[i], t)
        m = (m + [pred_x0.to(work)])[-3:]

        if i > 0:  # UniC: redo the step x_{i-1} -> x_i with m_i, which the predictor did not know
            h = lams[i] - lams[i - 1]
            B_h = math.expm1(-h)
            if order == 1:
                correction = m[-2] + 0.5 * (m[-1] - m[-2])
            else:
                r = (lams[i - 1] - lams[i - 2]) / h
                D1 = (m[-2] - m[-3]) / r
                rho_1, rho_2 = _unic_weights(h, r)
                correction = m[-2] + rho_1 * D1 + rho_2 * (m[-1] - m[-2])
            x = (sigmas_vp[i] / sigmas_vp[i - 1] * x_start - (alphas[i] * B_h) * correction).to(out_dtype)

        # UniP: first order at the first step (no history) and at the last (lower_order_final), else second
        order = min(2, n - i, len(m))
        x_start = x.to(work)
        if sigmas[i + 1] == 0:
            x = pred_x0.to(out_dtype)  # the final step: lambda -> inf leaves x_0 = m_i
        else:
            h = lams[i + 1] - lams[i]
            B_h = math.expm1(-h)
            D = m[-1]
            if order == 2:
                r = (lams[i] - lams[i - 1]) / h
                D = m[-1] + 0.5 * (m[-1] - m[-2]) / r
            x = (sigmas_vp[i + 1] / sigmas_vp[i] * x_start - (alphas[i + 1] * B_h) * D).to(out_dtype)
        if callback is not None:
            callback(step=i, timestep=t, sigma=sigmas[i], x=x, pred_x0=pred_x0)
    return x
