"""DDIM inversion (minidiff.inversion): the order of its round trip on the exact Gaussian model, the round trip on
the bundled shapes model from Python and from the command line, noise files and the pictures it refuses.
Parity with diffusers' DDIMInverseScheduler is in tests/parity/test_inversion.py."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from minidiff.cli import main
from minidiff.course import shapes
from minidiff.course.gaussian import convergence_order, inversion_round_trip
from minidiff.errors import InputError
from minidiff.images import psnr
from minidiff.inversion import check_opaque, invert_ddim, load_noise, save_noise
from minidiff.pipeline import load_pipeline
from minidiff.samplers import sample
from minidiff.schedule import Denoiser, NoiseSchedule

STEPS = (10, 20, 40, 80, 160)
# measured (python -c "from minidiff.course.gaussian import inversion_round_trip; print(inversion_round_trip())"),
# max |x0 after invert + generate - x0| on SD's leading grid, float64; quoted in the README and lesson 14
ROUND_TRIP = (2.412e-01, 1.166e-01, 5.734e-02, 2.671e-02, 1.331e-02)
PROMPT = "a picture of a little red disc in the top left"


def test_the_round_trip_on_the_exact_gaussian_model_is_first_order():
    errors = inversion_round_trip(STEPS)
    assert errors == pytest.approx(ROUND_TRIP, rel=1e-3)
    assert 0.9 < convergence_order(STEPS, errors) < 1.15  # measured 1.05 (leading), 1.07 (trailing)
    assert 0.9 < convergence_order(STEPS, inversion_round_trip(STEPS, spacing="trailing")) < 1.15


def test_inverting_with_the_exact_noise_level_of_the_target_would_be_exact():
    """What the first-order error comes from: with the eps of the level a step goes to (known for the Gaussian
    model from the exact ODE), the inverse step is exactly the DDIM step undone; with the level it comes from,
    it is not. One step, t_prev = 1 -> t = 21."""
    from minidiff.course.gaussian import GaussianEpsModel

    model = GaussianEpsModel()
    schedule = model.schedule
    x_t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a_t, a_prev = float(schedule.alphas_cumprod[21]), float(schedule.alphas_cumprod[1])
    eps = model(x_t, 21)
    x_prev = a_prev**0.5 * (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5 + (1 - a_prev) ** 0.5 * eps
    back = invert_ddim(Denoiser(model, schedule), x_prev, torch.tensor([21]), torch.tensor([1]))
    exact_eps_back = a_t**0.5 * (x_prev - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5 + (1 - a_t) ** 0.5 * eps
    assert torch.allclose(exact_eps_back, x_t, atol=1e-12)  # the algebra: the step undone with the same eps
    assert 1e-6 < float((back - x_t).abs().max()) < 1e-2  # the inversion asks about x_prev: close, not exact


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("shapes", device="cpu")


def test_invert_then_generate_gives_the_picture_back(pipe):
    spec = shapes.ShapeSpec("circle", "red", "top left", "small")
    picture = shapes.render(spec)
    noise = pipe.invert(picture, PROMPT, steps=50)
    assert noise.shape == (1, 4, 8, 8)  # not typical of N(0, I): its std is 0.43 (a flat background inverts flat)
    again = pipe(PROMPT, sampler="ddim", steps=50, guidance_scale=1.0, latents=noise, progress=False).images[0]
    assert psnr(again, picture) > 35  # measured 40.6 dB (the VAE alone: 41.2 dB on average)
    assert shapes.check(again) == spec
    other = pipe(PROMPT, sampler="ddim", steps=50, guidance_scale=1.0, seed=1, progress=False).images[0]
    assert psnr(other, picture) < psnr(again, picture) - 10  # not any picture of the prompt: this one


def test_the_callback_sees_every_step_climbing(pipe):
    seen = []
    pipe.invert(shapes.render(shapes.ShapeSpec("square", "blue", "centre", "large")), "a blue square", steps=5,
                callback=lambda **info: seen.append(info["timestep"]))
    assert seen == [1, 201, 401, 601, 801]  # SD's leading grid, least noisy first


def test_noise_files_round_trip_with_their_metadata(tmp_path):
    noise = torch.randn(1, 4, 8, 8)
    save_noise(tmp_path / "n.safetensors", noise, prompt="a red circle", steps=50, model="shapes", unused=None)
    loaded, metadata = load_noise(tmp_path / "n.safetensors")
    assert torch.equal(loaded, noise) and metadata == {"prompt": "a red circle", "steps": "50", "model": "shapes"}
    assert [p.name for p in tmp_path.iterdir()] == ["n.safetensors"]  # no temporary file left


def test_the_command_inverts_and_generate_regenerates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shapes.render(shapes.ShapeSpec("circle", "red", "top left", "small")).save("pic.png")
    assert main(["invert", "pic.png", "--prompt", PROMPT, "--out", "noise.safetensors", "--steps", "20",
                 "--reconstruction", "again.png", "--device", "cpu"]) == 0
    assert "round trip: PSNR" in capsys.readouterr().out
    with safe_open("noise.safetensors", "pt") as f:
        assert f.metadata()["steps"] == "20" and f.metadata()["sampler"] == "ddim"
    assert main(["generate", PROMPT, "--noise", "noise.safetensors", "--out", "regen.png", "--device", "cpu"]) == 0
    regenerated, again = np.asarray(Image.open("regen.png")), np.asarray(Image.open("again.png"))
    assert np.array_equal(regenerated, again)  # the file's sampler, steps and guidance were used


def test_pictures_with_transparency_are_refused_and_opaque_ones_taken():
    see_through = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    see_through.putpixel((3, 3), (0, 0, 0, 0))
    with pytest.raises(InputError, match="transparent pixels"):
        check_opaque(see_through)
    assert check_opaque(Image.new("RGBA", (64, 64), (255, 0, 0, 255))).mode == "RGB"
    assert check_opaque(Image.new("L", (64, 64), 128)).mode == "RGB"
    with pytest.raises(InputError, match="16/32-bit"):
        check_opaque(Image.new("I;16", (64, 64)))


def test_custom_and_linspace_grids_round_trip_too():
    """Grids diffusers' inverse scheduler lacks: the walk back is the same code, and the round trip closes."""
    from minidiff.course.gaussian import GaussianEpsModel

    model = GaussianEpsModel()
    schedule: NoiseSchedule = model.schedule
    x0 = 0.5 + 0.8 * torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for grid, options in ((schedule.ddim_timesteps(40, "linspace"), {"spacing": "linspace"}),
                          (schedule.ddim_timesteps(0, timesteps=list(range(999, 0, -25))),
                           {"timesteps": list(range(999, 0, -25))})):
        noise = invert_ddim(Denoiser(model, schedule), x0.clone(), *grid)
        again = sample(model, noise, "ddim", 40, **options)
        assert float((again - x0).abs().max()) < 0.1
