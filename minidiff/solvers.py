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

Each is a pure loop `sample_NAME(denoiser, x, timesteps, sigmas, *, generator=None, callback=None)` over the
grid of `NoiseSchedule.multistep_grid`, that of the diffusers schedulers these mirror
(DPMSolverMultistepScheduler, UniPCMultistepScheduler): N integer timesteps noisiest first, N + 1 sigmas
ending with 0, so that the last step lands exactly on the clean prediction. x is x_T in VP space, the
noise itself (diffusers' init_noise_sigma is 1 here), and the latents stay there.
"""

import math

import torch

from minidiff.errors import SamplerError
from minidiff.schedule import randn_like

# --- helpers ------------------------------------------------------------------------------------------


def _vp(sigma: float):
    """(alpha_t, sigma_t, lambda_t) of the VP process at k-diffusion noise level sigma (sigma = 0: clean)."""
    alpha = 1.0 / math.sqrt(1.0 + sigma**2)
    lam = -math.log(sigma) if sigma > 0 else math.inf
    return alpha, sigma * alpha, lam


def _changed(returned, x):
    """The latent to go on from after a callback: x, or what the callback returned in its place."""
    return x if returned is None else returned


def _predict_x0(denoiser, x_t, sigma: float, t: int):
    """x_theta(x_t) at grid noise level sigma; on a Karras grid sigma is not exactly sigma(t), and the
    reference converts the model output with the grid's sigma while the model sees the rounded t."""
    pred_x0, _ = denoiser.at_sigma(x_t * math.sqrt(1.0 + sigma**2), sigma, t)
    return pred_x0


# --- DPM-Solver++ 2M (ODE) and 2M SDE ------------------------------------------------------------------


def _dpmpp_2m(denoiser, x, timesteps, sigmas, eta, generator, callback):
    """The shared loop: eta = 0 is the ODE solver, eta = 1 the SDE solver of the paper."""
    ts, sigmas = torch.as_tensor(timesteps).tolist(), torch.as_tensor(sigmas).tolist()
    out_dtype, work = x.dtype, torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 latents update in fp32
    previous = None  # (x_theta, h) of the step before, for the second-order difference
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred_x0 = _predict_x0(denoiser, x, sigma, t)
        # diffusers draws one N(0, I) tensor of x's shape in float32 at every step (the last one too, though
        # its coefficient is 0), after the model call; drawing the same way keeps both on the same noise
        z = randn_like(x, generator, torch.float32) if eta > 0 else None
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
        if callback is not None:  # the callback may hand back another latent to go on from
            x = _changed(callback(step=i, timestep=t, sigma=sigma, x=x, pred_x0=pred_x0), x)
    return x


def sample_dpmpp_2m(denoiser, x, timesteps, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M), multistep 2nd-order ODE solver (Lu et al. 2022, "DPM-Solver++: Fast Solver...", alg. 2).

    Step i, from sigma_i to sigma_{i+1} (the first and the last are first order, D1 = 0):
        x_{i+1} = (sigma_vp_{i+1} / sigma_vp_i) x_i - alpha_{i+1} (e^{-h} - 1) (D0 + D1 / 2)
    Notation (module docstring): x_i -> the VP latent x_t at sigma_i; alpha, sigma_vp -> alpha_t, sigma_t there;
    h -> lambda_{i+1} - lambda_i; D0 -> x_theta(x_i); D1 -> (D0 - x_theta(x_{i-1})) / r, r = h_{i-1} / h.
    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero"). Deterministic: generator unused.
    """
    return _dpmpp_2m(denoiser, x, timesteps, sigmas, 0.0, None, callback)


def sample_dpmpp_2m_sde(denoiser, x, timesteps, sigmas, *, generator=None, callback=None, eta=1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), multistep 2nd-order SDE solver (Lu et al. 2022, "DPM-Solver++: Fast Solver...", app. B).

    Step i, with z ~ N(0, I) drawn from `generator` (eta = 1: the paper and diffusers; eta = 0: the ODE solver):
        x_{i+1} = (sigma_vp_{i+1} / sigma_vp_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-(1+eta) h}) (D0 + D1 / 2)
                  + sigma_vp_{i+1} sqrt(1 - e^{-2 eta h}) z
    Notation: as sample_dpmpp_2m; z -> fresh noise, drawn in float32 at every step (the last one too, where its
    coefficient is 0) after the model call, as diffusers' DPMSolverMultistepScheduler(algorithm_type=
    "sde-dpmsolver++", ...) draws it, so that both give the same picture for the same seed; eta is k-diffusion's.
    """
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise SamplerError(f"eta must be a number >= 0 (1 = the SDE solver, 0 = the ODE solver), got {eta!r}")
    return _dpmpp_2m(denoiser, x, timesteps, sigmas, float(eta), generator, callback)


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


def sample_unipc(denoiser, x, timesteps, sigmas, *, generator=None, callback=None) -> torch.Tensor:
    """UniPC-2 with B(h) = e^{-h} - 1 (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework...").

    At step i the model's prediction m_i at x_i first corrects x_i (UniC, no extra model call), then the
    predictor (UniP) moves the corrected x_i to x_{i+1}, by the order of the previous predictor step:
        UniP-2: x_{i+1} = (sigma_vp_{i+1}/sigma_vp_i) x_i - alpha_{i+1} B(h) (m_i + D1 / 2)    (= DPM-Solver++ 2M)
        UniC-1: x_i <- (sigma_vp_i/sigma_vp_{i-1}) x_{i-1} - alpha_i B(h) (m_{i-1} + (m_i - m_{i-1}) / 2)
        UniC-2: x_i <- (sigma_vp_i/sigma_vp_{i-1}) x_{i-1} - alpha_i B(h) (m_{i-1} + rho_1 D1 + rho_2 (m_i - m_{i-1}))
    Notation (module docstring): x_i -> the VP latent at sigma_i (x_{i-1} in UniC: the corrected sample the last
    predictor started from); m_i -> x_theta(x_i); h -> lambda_i - lambda_{i-1} (UniC) or lambda_{i+1} - lambda_i
    (UniP); D1 -> (m_j - m_{j-1}) / r at the step's start j (i in UniP, i - 1 in UniC), r = h_{j-1} / h;
    rho_1, rho_2 -> `_unic_weights(h, r)`.
    The first and last predictor steps are first order. Matches diffusers' UniPCMultistepScheduler(
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True), corrector on.
    Deterministic: generator unused.
    """
    ts, sigmas = torch.as_tensor(timesteps).tolist(), torch.as_tensor(sigmas).tolist()
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
        if callback is not None:  # the callback may hand back another latent to go on from
            x = _changed(callback(step=i, timestep=t, sigma=sigmas[i], x=x, pred_x0=pred_x0), x)
    return x
