"""Milestones of the formulas: the schedule, the prediction type, the DDIM step, the timestep embedding,
attention and the UNet's ResnetBlock.

Each `check_<name>` runs a candidate with the signature on its docstring's first line against the reference
beside it, and each `<name>_mistakes` lists what the usual mistakes give on the same inputs, with the hint
shown when a candidate's output equals one of them. See milestones.py for the machinery.

Notation (Ho et al. 2020; Song et al. 2021, DDIM):
    alpha_bar_t, alpha_bar_prev -> alpha_bar at the current timestep and at the one a step lands on
    eps, v                      -> the network's noise prediction, and the v of Salimans & Ho 2022
    sigma_t                     -> DDIM's sigma_t(eta) = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)
"""

import math

import torch
import torch.nn.functional as F

from minidiff.course.milestones.core import (
    Tolerance,
    call_candidate,
    compare,
    fixed_randn,
    milestone,
    randomized,
    signature,
)
from minidiff.course.milestones.explain import term_by_term
from minidiff.schedule import NoiseSchedule, to_x0_eps

# --- the schedule ----------------------------------------------------------------------------------------


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) of SD's "scaled_linear" betas (linear in sqrt(beta))."""
    return NoiseSchedule(num_train_timesteps, beta_start, beta_end, "scaled_linear").alphas_cumprod


def alphas_cumprod_mistakes(T, beta_start, beta_end):
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return [
        ("SD's betas are scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2, not linear in beta",
         lambda: torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0)),
        ("alpha_bar_t is the running product of (1 - beta_s), not of beta_s", lambda: torch.cumprod(betas, 0)),
        ("alpha_bar_t is the running product prod_{s<=t} (1 - beta_s) (torch.cumprod), not 1 - beta_t",
         lambda: 1 - betas),
    ]


def betas_mistakes(T, beta_start, beta_end):
    return [
        ("SD's betas are scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2, not linear in beta; "
         "reread lesson 01 (the schedules)", lambda: torch.linspace(beta_start, beta_end, T, dtype=torch.float64)),
        ("the square is missing: beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)[t] ** 2; reread lesson 01 "
         "(the schedules)", lambda: torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64)),
        ("T values from beta_start to beta_end inclusive: torch.linspace, not torch.arange's end-exclusive steps",
         lambda: (beta_start**0.5 + torch.arange(T, dtype=torch.float64) * (beta_end**0.5 - beta_start**0.5) / T) ** 2),
    ]


@milestone("schedule: SD's scaled_linear betas", lesson=1)
def check_betas(candidate=None):
    """betas(num_train_timesteps, beta_start, beta_end) -> (T,) beta_t, linear in sqrt(beta) from start to end"""
    tol = Tolerance(1e-7, 1e-5, "compared in fp64; fp32 arithmetic passes")
    for T, beta_start, beta_end in [(1000, 0.00085, 0.012), (100, 0.0001, 0.02)]:
        expected = NoiseSchedule(T, beta_start, beta_end, "scaled_linear").betas
        yours = call_candidate(candidate or (lambda *a: NoiseSchedule(*a, "scaled_linear").betas),
                               signature(check_betas), T, beta_start, beta_end)
        compare(yours, expected, tol, f"T={T}, betas {beta_start}..{beta_end}", betas_mistakes(T, beta_start, beta_end))
    return "SD's 1000 betas and a 100-step schedule within 1e-5 relative"


@milestone("schedule: alphas_cumprod", lesson=1)
def check_alphas_cumprod(candidate=None):
    """alphas_cumprod(num_train_timesteps, beta_start, beta_end) -> (T,) alpha_bar of SD's scaled_linear betas"""
    tol = Tolerance(1e-5, 0, "compared in fp64; fp32 arithmetic passes")
    for T, beta_start, beta_end in [(1000, 0.00085, 0.012), (100, 0.0001, 0.02)]:
        yours = call_candidate(candidate or alphas_cumprod, signature(check_alphas_cumprod), T, beta_start, beta_end)
        compare(yours, alphas_cumprod(T, beta_start, beta_end), tol, f"T={T}, betas {beta_start}..{beta_end}",
                alphas_cumprod_mistakes(T, beta_start, beta_end))
    return f"SD's 1000 values and a 100-step schedule within {tol.atol:g}"


def add_noise(x0, noise, alpha_bar_t):
    """q(x_t | x_0) of DDPM (Ho et al. 2020, eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * noise


def add_noise_mistakes(x0, noise, a):
    return [
        ("x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps: the coefficients are square roots (missing sqrt)",
         lambda: a * x0 + (1 - a) * noise),
        ("the coefficients of x0 and of the noise are swapped: x0 gets sqrt(alpha_bar_t), the noise "
         "sqrt(1 - alpha_bar_t)", lambda: add_noise(noise, x0, a)),
    ]


@milestone("schedule: add_noise (the forward process q(x_t | x_0))", lesson=1)
def check_add_noise(candidate=None):
    """add_noise(x0, noise, alpha_bar_t) -> x_t; alpha_bar_t a 0-dim tensor (math.sqrt and torch.sqrt both work)"""
    tol, schedule = Tolerance(1e-5, 1e-5), NoiseSchedule.sd()
    x0, noise = fixed_randn(2, 4, 8, 8, seed=1), fixed_randn(2, 4, 8, 8, seed=2)
    for t in (0, 250, 500, 999):
        a = schedule.alphas_cumprod[t]
        yours = call_candidate(candidate or add_noise, signature(check_add_noise), x0.clone(), noise.clone(), a.clone())
        terms = lambda a=a: term_by_term(candidate or add_noise, add_noise, (x0, noise, a), {0: "x0", 1: "noise"},  # noqa: E731
                                         tol)
        compare(yours, add_noise(x0, noise, a), tol, f"t={t}", add_noise_mistakes(x0, noise, a), terms)
    return f"t = 0, 250, 500, 999 within {tol.atol:g} (fp32)"


def pred_eps(model_output, x_t, alpha_bar_t, prediction_type: str = "epsilon"):
    """The noise estimate from the network's output: itself (epsilon), or sqrt(abar) v + sqrt(1 - abar) x_t (v)."""
    alpha, sigma = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    return to_x0_eps(model_output, x_t, alpha, sigma, prediction_type)[1]


def pred_eps_mistakes(output, x_t, a, prediction_type):
    return [
        (f"the model output was used as eps, but this model's prediction type is {prediction_type!r}: for "
         "v_prediction (SD 2.x 768) eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t", lambda: output),
        ("that is the predicted x0 (sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v), not eps: check the prediction "
         "type's formula", lambda: to_x0_eps(output, x_t, math.sqrt(a), math.sqrt(1 - a), prediction_type)[0]),
    ]


@milestone("prediction type: eps from an eps- or a v-prediction model", lesson=2)
def check_pred_eps(candidate=None):
    """pred_eps(model_output, x_t, alpha_bar_t, prediction_type) -> eps, for "epsilon" and "v_prediction" models"""
    return _check_prediction(candidate or pred_eps, signature(check_pred_eps), pred_eps, pred_eps_mistakes,
                             Tolerance(1e-5, 1e-5))


def pred_x0(model_output, x_t, alpha_bar_t, prediction_type: str = "epsilon"):
    """The clean-image estimate from the network's output (eps or v), by minidiff.schedule.to_x0_eps."""
    return to_x0_eps(model_output, x_t, math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t), prediction_type)[0]


def pred_x0_mistakes(output, x_t, a, prediction_type):
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    section = "reread lesson 02 (the prediction types)"
    return [
        (f"this model predicts {prediction_type!r}, and yours treats its output as eps: for v_prediction "
         f"x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v; {section}", lambda: (x_t - sigma * output) / alpha),
        (f"sign: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), the noise is subtracted; {section}",
         lambda: (x_t + sigma * output) / alpha),
        (f"missing sqrt: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t); {section}",
         lambda: (x_t - (1 - a) * output) / a),
        (f"the coefficients are swapped: x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v; {section}",
         lambda: sigma * x_t - alpha * output),
    ]


@milestone("prediction type: x_0 from an eps- or a v-prediction model", lesson=2)
def check_pred_x0(candidate=None):
    """pred_x0(model_output, x_t, alpha_bar_t, prediction_type) -> x_0, for "epsilon" and "v_prediction" models"""
    return _check_prediction(candidate or pred_x0, signature(check_pred_x0), pred_x0, pred_x0_mistakes,
                             Tolerance(1e-4, 1e-5))


def _check_prediction(candidate, expected_signature, reference, mistakes, tol) -> str:
    """candidate(model_output, x_t, alpha_bar_t, prediction_type) against reference, eps and v models, 3 timesteps."""
    schedule = NoiseSchedule.sd()
    output, x_t = fixed_randn(1, 4, 8, 8, seed=3), fixed_randn(1, 4, 8, 8, seed=4)
    for prediction_type in ("epsilon", "v_prediction"):
        for t in (999, 500, 20):
            a = schedule.alphas_cumprod[t]
            yours = call_candidate(candidate, expected_signature, output.clone(), x_t.clone(), a.clone(),
                                   prediction_type)
            terms = lambda a=a, kind=prediction_type: term_by_term(  # noqa: E731
                candidate, reference, (output, x_t, a, kind), {0: "model_output", 1: "x_t"}, tol)
            compare(yours, reference(output, x_t, a, prediction_type), tol, f"{prediction_type}, t={t}",
                    mistakes(output, x_t, a, prediction_type), terms)
    return f"epsilon and v_prediction at t = 999, 500, 20 within {tol.atol:g} (fp32)"


# --- DDIM ------------------------------------------------------------------------------------------------


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta: float = 0.0, noise=None):
    """One DDIM update from t to t_prev (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12)."""
    # predicted x_0
    pred_x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    # sigma_t(eta) of eq. 16: 0 is deterministic DDIM, 1 is DDPM-like
    sigma_t = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    # direction pointing to x_t
    dir_xt = math.sqrt(1 - alpha_bar_prev - sigma_t**2) * eps
    x_prev = math.sqrt(alpha_bar_prev) * pred_x0 + dir_xt
    # random noise
    return x_prev + sigma_t * noise if eta > 0 else x_prev


def _ddim_with(x_t, eps, a_t, a_prev, eta, noise, root_t=math.sqrt, root_1mt=math.sqrt, root_prev=math.sqrt,
               root_dir=math.sqrt, sigma_in_dir=True, with_noise=True):
    """ddim_step with one term changed: the known mistakes."""
    pred_x0 = (x_t - root_1mt(1 - a_t) * eps) / root_t(a_t)
    sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = root_prev(a_prev) * pred_x0 + root_dir(1 - a_prev - (sigma_t**2 if sigma_in_dir else 0)) * eps
    return x_prev + sigma_t * noise if eta > 0 and with_noise else x_prev


def ddim_step_mistakes(*args):
    same = lambda a: a  # noqa: E731 (a "root" that forgets to take the root)
    return [
        ("missing sqrt: the x0 term is sqrt(alpha_bar_prev) * pred_x0, not alpha_bar_prev * pred_x0",
         lambda: _ddim_with(*args, root_prev=same)),
        ("missing sqrt: the direction pointing to x_t is sqrt(1 - alpha_bar_prev - sigma_t^2) * eps",
         lambda: _ddim_with(*args, root_dir=same)),
        ("missing sqrt: pred_x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) divides by the sqrt of "
         "alpha_bar_t", lambda: _ddim_with(*args, root_t=same)),
        ("missing sqrt: pred_x0 subtracts sqrt(1 - alpha_bar_t) * eps, not (1 - alpha_bar_t) * eps",
         lambda: _ddim_with(*args, root_1mt=same)),
        ("eta is ignored: with eta > 0, sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - "
         "alpha_bar_t / alpha_bar_prev) comes off the direction term, sqrt(1 - alpha_bar_prev - sigma_t^2) eps, and "
         "sigma_t * noise is added", lambda: _ddim_with(*args, sigma_in_dir=False, with_noise=False)),
        ("with eta > 0 the direction term is sqrt(1 - alpha_bar_prev - sigma_t^2) eps: sigma_t^2 is missing",
         lambda: _ddim_with(*args, sigma_in_dir=False)),
        ("with eta > 0 the step adds sigma_t * noise (eq. 12's random noise term), which is missing",
         lambda: _ddim_with(*args, with_noise=False)),
    ]


@milestone("DDIM step (Song et al. 2021, eq. 12)", lesson=3)
def check_ddim_step(candidate=None):
    """ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None) -> x_prev; alpha_bars as 0-dim tensors

    Checked along SD's 50-step DDIM trajectory (leading spacing, steps_offset 1; the last step lands on
    alpha_bar_0) of the exact Gaussian model, each step from the reference's x_t, then three steps with eta = 1.
    """
    from minidiff.course.gaussian import GaussianEpsModel

    candidate, call = candidate or ddim_step, signature(check_ddim_step)
    tol, model = Tolerance(1e-5, 1e-5), GaussianEpsModel()
    schedule = model.schedule
    x, largest = fixed_randn(1, 4, 8, 8, seed=5), 0.0
    timesteps, previous = schedule.ddim_timesteps(50)
    for i, (t, t_prev) in enumerate(zip(timesteps.tolist(), previous.tolist())):
        eps = model(x, t)
        a_t, a_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[max(t_prev, 0)]
        expected = ddim_step(x, eps, a_t, a_prev)
        yours = call_candidate(candidate, call, x.clone(), eps.clone(), a_t.clone(), a_prev.clone())
        terms = lambda x=x, eps=eps, a_t=a_t, a_prev=a_prev: term_by_term(  # noqa: E731
            candidate, ddim_step, (x, eps, a_t, a_prev), {0: "x_t", 1: "eps"}, tol)
        error = compare(yours, expected, tol, f"step {i} (t={t})", ddim_step_mistakes(x, eps, a_t, a_prev, 0.0, None),
                        terms)
        largest, x = max(largest, error), expected
    x = fixed_randn(1, 4, 8, 8, seed=6)
    for i, t in enumerate((981, 501, 21)):
        eps, noise = model(x, t), fixed_randn(1, 4, 8, 8, seed=7 + i)
        a_t, a_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t - 20]
        yours = call_candidate(candidate, call, x.clone(), eps.clone(), a_t.clone(), a_prev.clone(), eta=1.0,
                               noise=noise.clone())
        terms = lambda x=x, eps=eps, a_t=a_t, a_prev=a_prev, noise=noise: term_by_term(  # noqa: E731
            lambda *a: candidate(*a[:4], eta=1.0, noise=a[4]), lambda *a: ddim_step(*a[:4], 1.0, a[4]),
            (x, eps, a_t, a_prev, noise), {0: "x_t", 1: "eps", 4: "noise"}, tol, "the noise's coefficient is sigma_t")
        compare(yours, ddim_step(x, eps, a_t, a_prev, 1.0, noise), tol, f"eta=1, t={t} -> {t - 20}",
                ddim_step_mistakes(x, eps, a_t, a_prev, 1.0, noise), terms)
    return f"50 steps (eta 0) and 3 steps (eta 1), largest |diff| {largest:.1e} <= {tol.atol:g} (fp32)"


# --- the UNet's parts ------------------------------------------------------------------------------------


def timestep_embedding_mistakes(t, dim):
    from minidiff.unet import timestep_embedding

    cos, sin = timestep_embedding(t, dim).chunk(2, dim=-1)
    return [
        ("sin and cos are swapped: SD's embedding puts the cosines first, cat([cos, sin]) (flip_sin_to_cos=True "
         "in the UNet config)", lambda: torch.cat([sin, cos], dim=-1)),
        ("cos and sin are interleaved; SD concatenates them: all the cosines, then all the sines",
         lambda: torch.stack([cos, sin], dim=-1).flatten(1)),
        ("the frequency exponent divides by dim/2 - 1 (freq_shift=1); SD's is -log(10000) i / (dim/2) (freq_shift=0)",
         lambda: timestep_embedding(t, dim, freq_shift=1)),
    ]


@milestone("timestep embedding (sinusoidal, Vaswani et al. 2017, in SD's order)", lesson=6)
def check_timestep_embedding(candidate=None):
    """timestep_embedding(t, dim) -> (B, dim); t (B,) float; SD's cat([cos, sin]), frequencies 10000^(-i/(dim/2))"""
    from minidiff.unet import timestep_embedding

    tol = Tolerance(1e-3, 0, "fp32, whose sin/cos of t = 999 are good to ~1e-4")
    t = torch.tensor([0.0, 1.0, 10.0, 250.5, 999.0])
    for dim in (320, 32):
        yours = call_candidate(candidate or timestep_embedding, signature(check_timestep_embedding), t.clone(), dim)
        compare(yours, timestep_embedding(t, dim), tol, f"dim={dim}", timestep_embedding_mistakes(t, dim))
    return f"t = 0, 1, 10, 250.5, 999 at dim 320 and 32 within {tol.atol:g} (fp32)"


def _attention_with(q, k, v, axis: int = -1, scale=None):
    """softmax(Q K^T * scale) V, the softmax over `axis`: the formula (axis -1, scale 1/sqrt(d)) and its mistakes."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=axis) @ v


def _library_attention(q, k, v):
    """minidiff.attention.attention (SDPA) on (B, heads, L, d) tensors."""
    from minidiff.attention import attention

    batch, heads, length, head_dim = q.shape
    # (B, heads, L, d) -> (B, L, heads * d) and back
    flat = lambda x: x.transpose(1, 2).reshape(batch, x.shape[2], heads * head_dim)  # noqa: E731
    return attention(flat(q), flat(k), flat(v), heads).view(batch, length, heads, head_dim).transpose(1, 2)


def attention_mistakes(q, k, v):
    return [
        ("softmax over the wrong axis: normalise over the keys, the last axis of Q K^T (B, heads, L_q, L_k), "
         "softmax(dim=-1), so that each query's weights sum to 1", lambda: _attention_with(q, k, v, axis=-2)),
        ("softmax over the wrong axis (the heads): use softmax(dim=-1), over the keys",
         lambda: _attention_with(q, k, v, axis=1)),
        ("the scores are not scaled: divide Q K^T by sqrt(d), d the head dimension",
         lambda: _attention_with(q, k, v, scale=1.0)),
        ("the scores are divided by d; the scale is 1/sqrt(d)",
         lambda: _attention_with(q, k, v, scale=1 / q.shape[-1])),
    ]


@milestone("attention: softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017)", lesson=5)
def check_attention(candidate=None):
    """attention(q, k, v) -> (B, heads, L_q, d) on q (B, heads, L_q, d) and k, v (B, heads, L_k, d)"""
    tol = Tolerance(1e-5, 1e-4)
    for name, length_k in (("self-attention", 16), ("cross-attention", 7)):
        q = fixed_randn(2, 3, 16, 8, seed=10)
        k, v = fixed_randn(2, 3, length_k, 8, seed=11), fixed_randn(2, 3, length_k, 8, seed=12)
        yours = call_candidate(candidate or _library_attention, signature(check_attention), q.clone(), k.clone(),
                               v.clone())
        compare(yours, _attention_with(q.double(), k.double(), v.double()), tol, name, attention_mistakes(q, k, v))
    return f"self- and cross-attention against the fp64 formula within {tol.atol:g} (fp32)"


def resblock(x, emb, params: dict, groups: int = 32, eps: float = 1e-5, silu_emb=True, emb_after="conv1", skip=True):
    """The UNet's ResnetBlock (He et al. 2016, plus the timestep) as a function of diffusers-keyed params.

    silu_emb, emb_after and skip exist for the milestone's known mistakes; the defaults are SD's block.
    """
    p = params
    h = F.conv2d(F.silu(F.group_norm(x, groups, p["norm1.weight"], p["norm1.bias"], eps)), p["conv1.weight"],
                 p["conv1.bias"], padding=1)
    time = F.linear(F.silu(emb) if silu_emb else emb, p["time_emb_proj.weight"], p["time_emb_proj.bias"])
    h = h + time[:, :, None, None] if emb_after == "conv1" else h
    h = F.conv2d(F.silu(F.group_norm(h, groups, p["norm2.weight"], p["norm2.bias"], eps)), p["conv2.weight"],
                 p["conv2.bias"], padding=1)
    h = h + time[:, :, None, None] if emb_after == "conv2" else h
    shortcut = F.conv2d(x, p["conv_shortcut.weight"], p["conv_shortcut.bias"]) if "conv_shortcut.weight" in p else x
    return shortcut + h if skip else h


def resblock_mistakes(x, emb, params):
    return [
        ("the timestep embedding goes through SiLU before time_emb_proj: time_emb_proj(silu(emb))",
         lambda: resblock(x, emb, params, silu_emb=False)),
        ("the timestep embedding is added after conv1 (before norm2), not after conv2",
         lambda: resblock(x, emb, params, emb_after="conv2")),
        ("the skip connection is missing: return x + h (x through conv_shortcut when the channels change)",
         lambda: resblock(x, emb, params, skip=False)),
    ]


@milestone("UNet ResnetBlock (He et al. 2016, with the timestep embedding)", lesson=6)
def check_resblock(candidate=None):
    """resblock(x, emb, params) -> (B, C_out, H, W); params with diffusers keys; GroupNorm(32 groups, eps 1e-5)

    params holds norm1, conv1, time_emb_proj, norm2, conv2 (weight and bias each: "norm1.weight", ...) and, when
    the block changes the channel count, conv_shortcut (a 1x1 conv on the skip path).
    """
    from minidiff.unet import ResnetBlock, UNetConfig

    tol = Tolerance(1e-4, 1e-4)
    x, emb = fixed_randn(2, 64, 8, 8, seed=13), fixed_randn(2, 128, seed=14)
    for channels_out in (96, 64):
        with torch.random.fork_rng():
            torch.manual_seed(15)
            block = randomized(ResnetBlock(64, channels_out, 128, UNetConfig()), 16)
        params = {key: value.detach().clone() for key, value in block.state_dict().items()}
        with torch.no_grad():
            expected = block(x, emb)
        yours = call_candidate(candidate or resblock, signature(check_resblock), x.clone(), emb.clone(), dict(params))
        where = f"64 -> {channels_out} channels" + (" (conv_shortcut)" if channels_out != 64 else "")
        compare(yours, expected, tol, where, resblock_mistakes(x, emb, params))
    return f"64 -> 96 (with conv_shortcut) and 64 -> 64 channels within {tol.atol:g} (fp32)"
