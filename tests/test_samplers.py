"""The sampler front end: names, options, bad input, NaN reporting, early exit, callbacks (no oracle)."""

import math

import pytest
import torch

import minidiff
from minidiff.errors import SamplerError
from minidiff.samplers import SAMPLERS, sample, sample_dpmpp_2m, sample_euler, sampler_grid
from minidiff.schedule import Denoiser, NoiseSchedule

ALL_NAMES = ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_a", "heun", "lcm", "unipc"]
STOCHASTIC = ["ddpm", "euler_a", "lcm", "dpmpp_2m_sde"]
MULTISTEP = ["dpmpp_2m", "dpmpp_2m_sde", "unipc"]


def toy_model(x, t):
    return torch.tanh(x * 0.7 + t / 1000)


def noise(dtype=torch.float32):
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).to(dtype)


def test_all_nine_samplers_are_registered():
    assert sorted(minidiff.SAMPLERS) == ALL_NAMES


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(SamplerError, match="unknown sampler 'dpm'. Valid names: ddim, ddpm, ") as error:
        sample(toy_model, noise(), "dpm")
    assert all(name in str(error.value) for name in SAMPLERS)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("steps", [0, -1, 1001, 7.5])
def test_bad_step_counts(name, steps):
    with pytest.raises(SamplerError, match="steps must be an integer from 1 to 1000"):
        sample(toy_model, noise(), name, steps)


@pytest.mark.parametrize("eta", [-0.1, 1.5, "1"])
def test_bad_eta(eta):
    with pytest.raises(SamplerError, match="eta must be a number from 0"):
        sample(toy_model, noise(), "ddim", 5, eta=eta)


def test_options_a_sampler_does_not_have_are_named():
    with pytest.raises(SamplerError, match="euler has no option 'eta'"):
        sample(toy_model, noise(), "euler", 5, eta=0.5)
    with pytest.raises(SamplerError, match="ddim has no option 's_churn'; its own options are: eta"):
        sample(toy_model, noise(), "ddim", 5, s_churn=1.0)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "lcm"])
def test_karras_only_for_sigma_space_samplers(name):
    with pytest.raises(SamplerError, match=r"karras=True is for the samplers .*euler, euler_a, heun"):
        sample(toy_model, noise(), name, 5, karras=True)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("timesteps, message", [
    ([999, 500, 600], "strictly decreasing"), ([1000, 10], "from 0 to 999"), ([999, 0.5], "from 0 to 999")])
def test_bad_custom_timesteps(name, timesteps, message):
    with pytest.raises(SamplerError, match=message):
        sample(toy_model, noise(), name, timesteps=timesteps)


def test_karras_with_custom_timesteps_is_refused():
    with pytest.raises(SamplerError, match="drop one of karras=True and timesteps"):
        sample(toy_model, noise(), "euler", karras=True, timesteps=[999, 500, 1])


@pytest.mark.parametrize("name", MULTISTEP)
@pytest.mark.parametrize("options, message", [
    (dict(spacing="cosine"), "unknown timestep spacing"),
    (dict(steps=1000, spacing="leading"), "repeats timesteps"),  # 1000 // 1001 = 0: every timestep is 1
    (dict(steps=999, spacing="leading", steps_offset=1), "reaches timestep 1000, past the last one"),
])
def test_bad_multistep_grids(name, options, message):
    with pytest.raises(SamplerError, match=message):
        sample(toy_model, noise(), name, **{"steps": 10, **options})


@pytest.mark.parametrize("eta", [-1, "1"])
def test_sde_eta_must_be_a_non_negative_number(eta):
    with pytest.raises(SamplerError, match="eta must be a number >= 0"):
        sample(toy_model, noise(), "dpmpp_2m_sde", 5, eta=eta)


def test_generator_must_be_a_torch_generator():
    with pytest.raises(SamplerError, match="generator must be a torch.Generator or None, got int"):
        sample(toy_model, noise(), "dpmpp_2m_sde", 5, generator=123)


def test_lcm_steps_are_capped_by_its_distillation_grid():
    with pytest.raises(SamplerError, match="at most original_inference_steps=50"):
        sample(toy_model, noise(), "lcm", 60)


def test_noise_must_be_a_float_tensor():
    with pytest.raises(SamplerError, match="floating-point tensor"):
        sample(toy_model, [[0.0]], "euler", 5)
    with pytest.raises(SamplerError, match="floating-point tensor"):
        sample(toy_model, torch.zeros(1, 4, 8, 8, dtype=torch.long), "euler", 5)


# --- NaN / inf ---------------------------------------------------------------------------------


def broken_after(calls: int, value=float("nan")):
    """A model that returns NaN (or inf) from its (calls + 1)-th call on."""
    seen = []

    def model(x, t):
        seen.append(t)
        out = toy_model(x, t)
        return out * value if len(seen) > calls else out

    return model


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_from_the_model_names_the_step(name, value):
    # heun calls the model twice per step: its 7th call is the first of step 3 (counting from 0)
    calls, step = (7, 3) if name == "heun" else (3, 3)
    with pytest.raises(SamplerError, match=rf"NaN or inf at step {step} \(counting from 0\)"):
        sample(broken_after(calls, value), noise(), name, 8)


def test_a_sampler_called_directly_names_the_model_call():
    schedule = NoiseSchedule.sd()
    denoiser = Denoiser(broken_after(2), schedule)
    with pytest.raises(SamplerError, match="NaN or inf at model call 3, timestep"):
        sample_euler(denoiser, noise(), *schedule.sigma_grid(5))


# --- early exit, callbacks, progress -----------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("early_exit, stop_step", [(3, 2), (0.5, 3), (0.3, 1), (1.0, 7), (8, 7)])
def test_early_exit_returns_the_pred_x0_of_that_step(name, early_exit, stop_step):
    seen = []
    out = sample(toy_model, noise(), name, 8, early_exit=early_exit, generator=torch.Generator().manual_seed(1),
                 callback=lambda **info: seen.append(info))
    assert [info["step"] for info in seen] == list(range(stop_step + 1))
    assert out is seen[-1]["pred_x0"]
    full = []
    sample(toy_model, noise(), name, 8, generator=torch.Generator().manual_seed(1),
           callback=lambda **info: full.append(info))
    assert torch.equal(out, full[stop_step]["pred_x0"])  # the same step of the uninterrupted run


@pytest.mark.parametrize("early_exit", [0, 9, -1, 0.0, 1.5, True, "half"])
def test_bad_early_exit(early_exit):
    with pytest.raises(SamplerError, match="early_exit must be a fraction in"):
        sample(toy_model, noise(), "ddim", 8, early_exit=early_exit)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_callback_sees_every_step_in_vp_space(name):
    seen = []
    schedule = NoiseSchedule.sd()
    out = sample(toy_model, noise(), name, 6, spacing="trailing", callback=lambda **info: seen.append(info))
    assert [info["step"] for info in seen] == list(range(6))
    assert set(seen[0]) == {"step", "timestep", "sigma", "x", "pred_x0"}
    for info in seen:  # sigma is the k-diffusion noise level where the model was evaluated
        t = float(info["timestep"])
        assert info["sigma"] == pytest.approx(float(schedule.sigma_at(t)), rel=1e-9)
    assert seen[0]["timestep"] == 999
    assert torch.equal(out, seen[-1]["x"])


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_callback_x_is_the_vp_latent(name):
    """With a model that predicts x0 = 0, the VP latent after a step is sqrt(1 - alpha_bar) times the
    noise at the next timestep (exactly for DDIM, to O(1 / sigma_max^2) for the sigma-space samplers),
    not the k-diffusion x = x_t / alpha_t, which would be up to 14.6 times larger."""
    schedule, seen = NoiseSchedule.sd(), []
    zero_x0 = lambda x, t: torch.zeros_like(x)
    sample(zero_x0, noise(torch.float64), name, 10, spacing="trailing", prediction_type="sample",
           callback=lambda **info: seen.append(info))
    for info, next_info in zip(seen, seen[1:]):
        abar_next = float(schedule.alphas_cumprod[round(float(next_info["timestep"]))])
        torch.testing.assert_close(info["x"], math.sqrt(1 - abar_next) * noise(torch.float64), rtol=5e-3, atol=0)


def test_progress_bar_ticks_once_per_step(capsys):
    sample(toy_model, noise(), "heun", 5, progress=True)
    assert "5/5" in capsys.readouterr().err


# --- what any sampler must do ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_dtype_and_device_follow_the_input(name):
    out = sample(toy_model, noise(torch.float64), name, 4)
    assert out.dtype == torch.float64 and out.shape == (1, 4, 8, 8) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_deterministic_samplers_are_accurate_in_fp32(name):
    """fp32 against fp64 on the same noise: no step cancels x - x0 at small sigma (relative max error)."""
    for spacing in ("leading", "linspace"):
        for steps in (2, 20):
            out32 = sample(toy_model, noise(), name, steps, spacing=spacing)
            out64 = sample(toy_model, noise(torch.float64), name, steps, spacing=spacing)
            assert float((out32.double() - out64).abs().max() / out64.abs().max()) < 1e-6, (spacing, steps)


@pytest.mark.parametrize("name", STOCHASTIC + ["ddim"])
def test_the_generator_makes_stochastic_samplers_reproducible(name):
    eta = {"eta": 1.0} if name == "ddim" else {}
    run = lambda seed: sample(toy_model, noise(), name, 5, generator=torch.Generator().manual_seed(seed), **eta)
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_sde_with_eta_zero_is_the_ode_solver():
    ode = sample(toy_model, noise(), "dpmpp_2m", 10)
    sde = sample(toy_model, noise(), "dpmpp_2m_sde", 10, eta=0.0, generator=torch.Generator().manual_seed(3))
    assert float((sde - ode).abs().max() / ode.abs().max()) < 1e-6


def test_a_loop_takes_any_grid_it_is_handed():
    """The samplers are loops over the grid they get: a hand-made grid runs, and is what the model sees."""
    seen = []
    model = lambda x, t: seen.append(t) or toy_model(x, t)
    schedule = NoiseSchedule.sd()
    timesteps, sigmas = [999, 500, 20], [float(schedule.sigmas[t]) for t in (999, 500, 20)] + [0.0]
    out = sample_dpmpp_2m(Denoiser(model, schedule), noise(), timesteps, sigmas)
    assert seen == timesteps and out.shape == noise().shape
    grid = sampler_grid(schedule, "dpmpp_2m", timesteps=timesteps)
    assert grid[0].tolist() == timesteps and grid[1].tolist() == sigmas


def test_ddim_with_eta_zero_draws_no_noise():
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    sample(toy_model, noise(), "ddim", 5, generator=generator)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_k_diffusion_samplers_start_where_diffusers_does(name, spacing):
    """The UNet's first input is the noise itself for leading spacing (x = x_T / alpha_T) and alpha_T sigma_max
    times the noise = sqrt(1 - alpha_bar_T) noise for linspace and trailing (x = sigma_max noise, diffusers'
    init_noise_sigma); with a model that predicts x0 = 0, one Euler step from sigma_max to 0 lands on 0."""
    inputs = []

    def model(x_t, t):
        inputs.append(x_t)
        return torch.zeros_like(x_t)

    schedule = NoiseSchedule.sd()
    first_t = float(schedule.sigma_grid(1, spacing)[0][0])
    out = sample(model, noise(torch.float64), name, 1, spacing=spacing, prediction_type="sample")
    abar = float(schedule.alphas_cumprod[int(first_t)])
    expected = 1.0 if spacing == "leading" else math.sqrt(1 - abar)
    torch.testing.assert_close(inputs[0], expected * noise(torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_noise_is_x_t_takes_the_latent_as_it_is(name):
    """noise_is_x_t=True takes the latent as x_t at the first timestep (gaussian.py's study from x_T), as it is."""
    inputs = []
    model = lambda x_t, t: inputs.append(x_t) or torch.tanh(x_t)
    x_t = noise(torch.float64) * 0.7 + 0.2
    sample(model, x_t, name, 3, spacing="trailing", timesteps=[600, 300, 100], noise_is_x_t=True)
    torch.testing.assert_close(inputs[0], x_t, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("name", "spacing"), [("euler", "linspace"), ("heun", "linspace"), ("dpmpp_2m", "leading"),
                                             ("ddim", "trailing"), ("lcm", "leading")])
def test_first_step_runs_the_tail_of_the_grid_from_x0_noised_there(name, spacing):
    """img2img: the model first sees x0 noised to grid point 3 at that point's own (here fractional) noise level,
    then the grid's timesteps from there on; the callback counts the steps run from 0."""
    schedule, seen, steps_run = NoiseSchedule.sd(), [], []
    model = lambda x_t, t: seen.append((float(t), x_t)) or torch.tanh(x_t)
    x0 = noise(torch.float64) * 0.5 + 0.3
    eps = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sample(model, eps, name, 7, spacing=spacing, first_step=3, x0=x0, callback=lambda **i: steps_run.append(i["step"]))
    grid = sampler_grid(schedule, name, 7, spacing)
    timesteps = grid[0][3:].tolist()
    t_first = timesteps[0]
    sigma = float(grid[1][3]) if name in ("euler", "heun", "dpmpp_2m") else float(schedule.sigmas[int(t_first)])
    assert name not in ("euler", "heun") or t_first != int(t_first)  # linspace: a fractional timestep
    expected = (x0 + sigma * eps) / math.sqrt(1 + sigma**2)  # alpha x0 + sigma_vp eps
    torch.testing.assert_close(seen[0][1], expected, rtol=1e-12, atol=1e-12)
    assert [t for t, _ in seen][:: 2 if name == "heun" else 1] == timesteps
    assert steps_run == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["euler", "heun", "ddim", "euler_a"])
def test_end_step_then_first_step_from_x_t_is_the_whole_run(name):
    """Two experts (minidiff.refiner): the run stopped at end_step=3 hands over x_t, and a run from first_step=3 with
    it (noise_is_x_t) ends where the whole run does; the first part calls the model at the grid's first 3 steps."""
    model = lambda x_t, t: torch.tanh(x_t) * (1 + float(t) / 1000)
    x_T = noise(torch.float64)
    whole = sample(model, x_T, name, 7, generator=torch.Generator().manual_seed(2))
    generator, seen = torch.Generator().manual_seed(2), []
    handed = sample(lambda x_t, t: seen.append(float(t)) or model(x_t, t), x_T, name, 7, generator=generator,
                    end_step=3)
    assert seen[:: 2 if name == "heun" else 1] == sampler_grid(NoiseSchedule.sd(), name, 7, "leading")[0][:3].tolist()
    ended = sample(model, handed, name, 7, first_step=3, noise_is_x_t=True, generator=generator)
    torch.testing.assert_close(ended, whole, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(handed, whole, atol=1e-3)


@pytest.mark.parametrize(("options", "message"), [
    ({"first_step": 7, "x0": noise()}, r"first_step must be an integer from 0 to 6 \(the grid has 7 steps\), got 7"),
    ({"first_step": -1, "x0": noise()}, "first_step must be an integer from 0 to 6"),
    ({"first_step": 2.0, "x0": noise()}, "first_step must be an integer"),
    ({"first_step": 2}, "give x0, the clean latent to noise there"),
    ({"end_step": 8}, r"end_step must be an integer from 1 \(after first_step\) to 7"),
    ({"first_step": 2, "end_step": 2, "x0": noise()}, "end_step must be an integer from 3"),
    ({"first_step": 2, "x0": noise(), "noise_is_x_t": True}, "exclude each other"),
    ({"first_step": 2, "x0": torch.zeros(1, 4, 16, 16)}, r"x0 must be a latent tensor shaped like the noise"),
])
def test_bad_img2img_starts_are_named(options, message):
    with pytest.raises(SamplerError, match=message):
        sample(toy_model, noise(), "euler", 7, **options)


def test_ddpm_follows_the_closed_form_posterior_for_an_exact_model():
    """With the ideal eps for a point mass at x0 = c, every DDPM step is exact: pred_x0 == c at every step."""
    c = 0.3
    schedule = NoiseSchedule.sd()

    def model(x_t, t):
        abar = float(schedule.alphas_cumprod[int(t)])
        return (x_t - math.sqrt(abar) * c) / math.sqrt(1 - abar)

    seen = []
    out = sample(model, noise(torch.float64), "ddpm", 10, callback=lambda **i: seen.append(i["pred_x0"]))
    for pred_x0 in seen:
        torch.testing.assert_close(pred_x0, torch.full_like(pred_x0, c))
    torch.testing.assert_close(out, torch.full_like(out, c))


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_nan_on_an_accelerator_is_reported_after_the_loop_with_its_step(name, monkeypatch):
    """On a GPU the flags are kept and checked once after the loop; the first bad step is named."""
    monkeypatch.setattr(Denoiser, "_deferred", staticmethod(lambda out: True))
    calls = []
    model = broken_after(7 if name == "heun" else 3)
    counting = lambda x, t: calls.append(t) or model(x, t)
    with pytest.raises(SamplerError, match=r"NaN or inf at step 3 \(counting from 0\)"):
        sample(counting, noise(), name, 8)
    assert len(calls) == (15 if name == "heun" else 8)  # the loop ran to the end before the check
