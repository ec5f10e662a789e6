"""NoiseSchedule, the eps/x0/v conversions and the Denoiser, against closed forms and known SD values."""

import math

import numpy as np
import pytest
import torch

from minidiff.errors import SamplerError
from minidiff.schedule import Denoiser, NoiseSchedule, init_noise_sigma, randn_like, to_x0_eps


@pytest.fixture(scope="module")
def sd():
    return NoiseSchedule.sd()


# --- the forward process ---------------------------------------------------------------------------


def test_sd_alphas_cumprod_at_known_points(sd):
    # scaled_linear: beta_t = (sqrt(0.00085) + t/999 (sqrt(0.012) - sqrt(0.00085)))^2, alpha_bar = prod (1 - beta)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    expected = np.cumprod(1 - betas)
    for t in (0, 1, 250, 500, 999):
        assert float(sd.alphas_cumprod[t]) == pytest.approx(expected[t], rel=2e-6), t
    assert float(sd.alphas_cumprod[0]) == pytest.approx(0.99915, rel=1e-7)
    # the noise levels k-diffusion quotes for SD: sigma_min 0.0292, sigma_max 14.6146
    assert float(sd.sigmas[0]) == pytest.approx(0.0292, abs=1e-4)
    assert float(sd.sigmas[-1]) == pytest.approx(14.6146, abs=1e-4)
    torch.testing.assert_close(sd.log_snr, torch.log(sd.alphas_cumprod / (1 - sd.alphas_cumprod)))


def test_linear_and_cosine_schedules():
    linear = NoiseSchedule(1000, 0.0001, 0.02, "linear")
    assert float(linear.betas[0]) == pytest.approx(0.0001, rel=1e-6)
    assert float(linear.betas[-1]) == pytest.approx(0.02, rel=1e-6)
    cosine = NoiseSchedule(1000, beta_schedule="squaredcos_cap_v2")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):  # alpha_bar_t = f((t + 1) / T) / f(0) (Nichol & Dhariwal 2021, eq. 17)
        assert float(cosine.alphas_cumprod[t]) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-4), t


def test_from_config_reads_a_diffusers_scheduler_config():
    schedule = NoiseSchedule.from_config({"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                          "_class_name": "PNDMScheduler", "skip_prk_steps": True})
    assert (schedule.beta_start, schedule.beta_end, schedule.beta_schedule) == (0.0001, 0.02, "linear")


def test_add_noise_is_the_forward_process(sd):
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    x_t = sd.add_noise(x0, eps, t)
    for i in range(3):
        abar = float(sd.alphas_cumprod[t[i]])
        torch.testing.assert_close(x_t[i], math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * eps[i])
    torch.testing.assert_close(sd.add_noise(x0, eps, 500)[1], x_t[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(sd, prediction_type):
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for t in (10, 500, 990):
        alpha, sigma = (float(a) for a in sd.alpha_sigma(t))
        x_t = alpha * x0 + sigma * eps
        output = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
        pred_x0, pred_eps = to_x0_eps(output, x_t, alpha, sigma, prediction_type)
        torch.testing.assert_close(pred_x0, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(pred_eps, eps, rtol=1e-9, atol=1e-9)


def test_denoiser_vp_and_sigma_views_agree(sd):
    model = lambda x, t: torch.tanh(x + t / 1000)
    denoiser = Denoiser(model, sd, "v_prediction")
    x_t, t = torch.randn(1, 4, 8, 8, dtype=torch.float64), 600
    sigma = float(sd.sigmas[t])
    vp = denoiser(x_t, t)
    k = denoiser.at_sigma(x_t * math.sqrt(1 + sigma**2), sigma, t)  # x = x_t / alpha_t
    for a, b in zip(vp, k):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- the inference timesteps -------------------------------------------------------------------------


def test_the_three_spacings(sd):
    assert sd.timesteps(10, "leading").tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert sd.timesteps(10, "leading", steps_offset=0).tolist() == list(range(900, -1, -100))
    assert sd.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert sd.timesteps(10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sd.timesteps(7, "linspace").tolist() == [999, 832, 666, 500, 333, 166, 0]  # numpy rounds half to even
    assert sd.timesteps(7, "linspace", rounded=False).tolist() == [999, 832.5, 666, 499.5, 333, 166.5, 0]
    assert sd.timesteps(1, "leading").tolist() == [1] and sd.timesteps(1, "trailing").tolist() == [999]
    for spacing in ("leading", "trailing", "linspace"):
        ts = sd.timesteps(50, spacing)
        assert len(ts) == 50 and ts.dtype == torch.int64 and bool((ts[1:] < ts[:-1]).all())


def test_ddim_steps_back_by_T_over_N(sd):
    ts, prev = sd.ddim_timesteps(20, "leading")
    assert prev.tolist() == ts[1:].tolist() + [-1]  # leading: the next timestep, then the end
    ts, prev = sd.ddim_timesteps(7, "trailing")
    assert ts.tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert prev.tolist() == [857, 714, 571, 428, 286, 143, 0]  # t - 1000 // 7, as diffusers' DDIMScheduler
    ts, prev = sd.ddim_timesteps(None, timesteps=[999, 500, 20])
    assert prev.tolist() == [500, 20, -1]


def test_sigma_grid_and_karras_sigmas(sd):
    ts, sigmas = sd.sigma_grid(7, "linspace")
    assert len(ts) == 7 and len(sigmas) == 8 and float(sigmas[-1]) == 0
    assert float(ts[1]) == 832.5  # between two training steps: sigma interpolated linearly
    assert float(sigmas[1]) == pytest.approx((float(sd.sigmas[832]) + float(sd.sigmas[833])) / 2)
    ts_k, sigmas_k = sd.sigma_grid(7, "linspace", karras=True)
    assert float(sigmas_k[0]) == pytest.approx(float(sigmas[0]))  # the ramp spans the grid's own range
    assert float(sigmas_k[6]) == pytest.approx(float(sigmas[6]))
    ramp = sigmas_k[:-1] ** (1 / 7)  # Karras eq. 5: evenly spaced in sigma^(1/rho)
    torch.testing.assert_close(ramp.diff(), ramp.diff()[:1].expand(6))
    torch.testing.assert_close(sd.sigma_at(ts_k), sigmas_k[:-1], rtol=1e-3, atol=0)  # t_at inverts sigma_at
    assert float(sd.karras_sigmas(5)[0]) == pytest.approx(14.6146, abs=1e-4)


def test_multistep_grid_splits_T_into_N_plus_1_pieces(sd):
    """DPM-Solver++ / UniPC: leading and linspace drop the clean end of N + 1 points; sigmas end with 0."""
    ts, sigmas = sd.multistep_grid(10, "leading")
    assert ts.tolist() == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]  # k (1000 // 11) + 1
    assert sd.multistep_grid(10, "trailing")[0].tolist() == list(range(999, 0, -100))
    assert sd.multistep_grid(10, "linspace")[0].tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert len(sigmas) == 11 and float(sigmas[-1]) == 0
    torch.testing.assert_close(sigmas[:-1], sd.sigmas[ts])
    ts_k, sigmas_k = sd.multistep_grid(5, "trailing", karras=True)  # the whole training range, any spacing
    assert float(sigmas_k[0]) == pytest.approx(float(sd.sigmas[-1])) and float(sigmas_k[4]) == pytest.approx(
        float(sd.sigmas[0]))
    assert ts_k.tolist() == [999, 786, 427, 59, 0] == sd.multistep_grid(5, "leading", karras=True)[0].tolist()
    ts_c, sigmas_c = sd.multistep_grid(None, timesteps=[999, 500, 20])
    assert ts_c.tolist() == [999, 500, 20] and sigmas_c.tolist() == sd.sigmas[[999, 500, 20]].tolist() + [0.0]


@pytest.mark.parametrize("grid", ["sigma_grid", "multistep_grid"])
@pytest.mark.parametrize("options, message", [
    (dict(spacing="cosine"), "unknown timestep spacing"),
    (dict(steps=0), "steps must be an integer"),
    (dict(timesteps=[500, 999]), "strictly decreasing"),
    (dict(timesteps=[999, 500], karras=True), "drop one of karras=True and timesteps"),
    (dict(steps_offset=100), "reaches timestep 1000, past the last one"),
    (dict(steps_offset=-1), "steps_offset must be a non-negative integer"),
])
def test_bad_grid_options(sd, grid, options, message):
    options = {"steps": 10, **options}
    with pytest.raises(SamplerError, match=message):
        getattr(sd, grid)(**options)


def test_multistep_grid_refuses_repeated_timesteps(sd):
    with pytest.raises(SamplerError, match="repeats timesteps"):  # 1000 // 1001 = 0: every timestep is 1
        sd.multistep_grid(1000, "leading", steps_offset=1)


def test_init_noise_sigma_as_diffusers(sd):
    sigma_max = float(sd.sigmas[-1])
    assert init_noise_sigma(sigma_max, "leading") == pytest.approx(math.sqrt(1 + sigma_max**2))
    assert init_noise_sigma(sigma_max, "trailing") == init_noise_sigma(sigma_max, "linspace") == sigma_max


def test_randn_like_draws_what_the_generator_gives():
    x = torch.zeros(2, 3, dtype=torch.float64)
    seeded = lambda: torch.Generator().manual_seed(4)
    assert torch.equal(randn_like(x, seeded()), torch.randn(2, 3, generator=seeded(), dtype=torch.float64))
    in_float32 = randn_like(x, seeded(), torch.float32)  # as DPM-Solver++ SDE draws for any latent dtype
    assert torch.equal(in_float32, torch.randn(2, 3, generator=seeded()))
    assert randn_like(x).shape == x.shape and randn_like(x).dtype == torch.float64


def test_t_at_inverts_sigma_at(sd):
    t = torch.tensor([0.0, 1.0, 10.0, 499.0, 998.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sd.t_at(sd.sigma_at(t)), t)
    # half way in log sigma between two training steps is t + 1/2
    mid = (sd.sigmas[300] * sd.sigmas[301]).sqrt()
    assert float(sd.t_at(mid)) == pytest.approx(300.5)


def test_lcm_timesteps(sd):
    assert sd.lcm_timesteps(4).tolist() == [999, 759, 499, 259]  # the 4-step LCM grid
    assert sd.lcm_timesteps(1).tolist() == [999]
    assert sd.lcm_timesteps(50).tolist() == list(range(999, 0, -20))
    with pytest.raises(SamplerError, match="at most original_inference_steps=50"):
        sd.lcm_timesteps(51)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, "20", None])
def test_bad_step_counts(sd, steps):
    with pytest.raises(SamplerError, match="steps must be an integer from 1 to 1000"):
        sd.timesteps(steps)


def test_bad_spacing_offset_and_schedule(sd):
    with pytest.raises(SamplerError, match="leading, trailing, linspace"):
        sd.timesteps(10, "uniform")
    with pytest.raises(SamplerError, match="steps_offset"):
        sd.timesteps(10, "leading", steps_offset=-1)
    with pytest.raises(SamplerError, match="past the last one"):  # 999 * 1 + 1 = 1000
        sd.timesteps(1000, "leading", steps_offset=1)
    with pytest.raises(SamplerError, match="scaled_linear"):
        NoiseSchedule(beta_schedule="quadratic")


@pytest.mark.parametrize("timesteps, message", [
    ([999, 500, 500, 1], "strictly decreasing"),
    ([1, 500, 999], "strictly decreasing"),
    ([1000, 500], "from 0 to 999"),
    ([999, -1], "from 0 to 999"),
    ([999, 500.5], "from 0 to 999"),
    ([], "empty"),
    (["999", "x"], "list of integers"),
    (5, "list of integers"),
])
def test_bad_custom_timesteps(sd, timesteps, message):
    with pytest.raises(SamplerError, match=message):
        sd.check_custom_timesteps(timesteps)


def test_custom_timesteps_accepts_tensors_and_numpy(sd):
    expected = [999, 500, 1]
    assert sd.check_custom_timesteps(torch.tensor(expected)).tolist() == expected
    assert sd.check_custom_timesteps(np.array(expected)).tolist() == expected


def test_unknown_prediction_type(sd):
    with pytest.raises(SamplerError, match="v_prediction"):
        Denoiser(lambda x, t: x, sd, "v")


def test_denoiser_names_the_model_call_and_step_of_a_nan(sd):
    denoiser = Denoiser(lambda x, t: x * float("nan") if t < 500 else x, sd)
    x = torch.randn(1, 4, 8, 8)
    denoiser(x, 900)
    with pytest.raises(SamplerError, match=r"model call 2, timestep 400"):
        denoiser(x, 400)
    denoiser.step = 7
    with pytest.raises(SamplerError, match=r"step 7 \(counting from 0\), timestep 300"):
        denoiser.at_sigma(x, 1.0, 300.0)
