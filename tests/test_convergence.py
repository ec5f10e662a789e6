"""Convergence order of the deterministic samplers against the exact Gaussian ODE solution (no oracle)."""

import pytest
import torch

from minidiff.course.gaussian import GaussianEpsModel, convergence_order, convergence_study
from minidiff.schedule import NoiseSchedule

STEPS = (20, 40, 100, 200)  # divisors of 1000: every trailing grid lands on t = 199
EXPECTED_ORDER = {"ddim": 1.0, "euler": 1.0, "heun": 2.0, "dpmpp_2m": 2.0}


@pytest.fixture(scope="module")
def errors():
    return convergence_study(samplers=(*EXPECTED_ORDER, "unipc"), steps=STEPS)


@pytest.mark.parametrize("name", EXPECTED_ORDER)
def test_convergence_order(errors, name):
    order = convergence_order(STEPS, errors[name])
    assert abs(order - EXPECTED_ORDER[name]) < 0.3, f"{name}: measured order {order:.2f}, errors {errors[name]}"


def test_unipc_at_least_second_order(errors):
    """UniPC-2's corrector raises the order by one (Zhao et al. 2023, th. 3.1): measured about 2.7 here."""
    assert convergence_order(STEPS, errors["unipc"]) > 2.3, errors["unipc"]


def test_errors_shrink_with_steps(errors):
    for name, errs in errors.items():
        assert all(b < a for a, b in zip(errs, errs[1:])), f"{name}: {errs}"


def test_ideal_eps_model_is_the_posterior_mean():
    """Monte Carlo check of the closed form: E[eps | x_t] from samples near one x_t."""
    model = GaussianEpsModel(mu=0.5, s=0.8)
    schedule = NoiseSchedule.sd()
    t = 500
    gen = torch.Generator().manual_seed(0)
    x0 = 0.5 + 0.8 * torch.randn(400_000, generator=gen, dtype=torch.float64)
    eps = torch.randn(400_000, generator=gen, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, torch.full((400_000,), t))
    # regression of eps on x_t is linear for Gaussians: its slope and intercept are the closed form
    slope = ((x_t - x_t.mean()) * (eps - eps.mean())).mean() / x_t.var()
    intercept = eps.mean() - slope * x_t.mean()
    grid = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(model(grid, t), intercept + slope * grid, atol=5e-3, rtol=0)
