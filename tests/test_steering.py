"""The writable step callback (minidiff.steering, minidiff.samplers): None changes nothing, a returned latent is
gone on from, a returned guidance is used from the next step; parity with diffusers is in tests/parity."""

import pytest
import torch

from minidiff.errors import InputError, SamplerError
from minidiff.samplers import SAMPLERS, sample
from minidiff.schedule import NoiseSchedule
from minidiff.steering import guidance_cutoff


def toy_model(x, t):
    return 0.1 * x + 0.01 * float(t) / 1000


def noise():
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_returning_none_or_x_changes_nothing_and_another_latent_is_gone_on_from(name):
    run = lambda callback: sample(toy_model, noise(), name, 6, generator=torch.Generator().manual_seed(1),  # noqa
                                  schedule=NoiseSchedule.sd(), callback=callback)
    plain = run(None)
    assert torch.equal(run(lambda **info: None), plain)
    assert torch.equal(run(lambda **info: info["x"]), plain)
    seen = []

    def push(step, x, **info):
        seen.append(x.clone())
        return x + 0.5 if step == 2 else None

    pushed = run(push)
    assert not torch.allclose(pushed, plain)
    replay = []  # the step after the push starts from the pushed latent: the same as a run told so by hand
    run(lambda step, x, **info: replay.append(x.clone()) or (seen[2] + 0.5 if step == 2 else None))
    assert torch.equal(replay[3], seen[3])


def test_the_callback_sees_the_guidance_and_changes_it(shapes_pipe):
    base = dict(steps=6, seed=2, progress=False, guidance_scale=5.0)
    plain = shapes_pipe("a red circle", **base)
    scales = []

    def watch(step, timestep, sigma, x, pred_x0, guidance_scale):
        scales.append(guidance_scale)

    assert torch.equal(shapes_pipe("a red circle", callback=watch, **base).latents, plain.latents)
    assert scales == [5.0] * 6
    scales.clear()
    cut = shapes_pipe("a red circle", callback=lambda **info: (scales.append(info["guidance_scale"]),
                                                               guidance_cutoff(6, 0.5)(**info))[1], **base)
    assert scales == [5.0] * 4 + [0.0] * 2 and not torch.allclose(cut.latents, plain.latents)
    # guidance off from the start, switched on after step 0: the negative prompt is encoded then
    on = shapes_pipe("a red circle", **{**base, "guidance_scale": 1.0},
                     callback=lambda step, **info: {"guidance_scale": 5.0} if step == 0 else None)
    off = shapes_pipe("a red circle", **{**base, "guidance_scale": 1.0})
    assert not torch.allclose(on.latents, off.latents)


def test_bad_returns_are_named(shapes_pipe):
    base = dict(steps=2, seed=2, progress=False)
    with pytest.raises(InputError, match="'latents'"):
        shapes_pipe("a red circle", callback=lambda **info: {"latents": info["x"]}, **base)
    with pytest.raises(InputError, match="guidance_scale must be a finite number"):
        shapes_pipe("a red circle", callback=lambda **info: {"guidance_scale": "high"}, **base)
    with pytest.raises(SamplerError, match=r"returned \(1, 4, 4, 4\)"):
        shapes_pipe("a red circle", callback=lambda **info: torch.zeros(1, 4, 4, 4), **base)
    with pytest.raises(SamplerError, match="NaN or inf"):
        shapes_pipe("a red circle", callback=lambda x, **info: x * float("nan"), **base)
    with pytest.raises(InputError, match="return None"):
        shapes_pipe("a red circle", callback=lambda **info: 3, **base)


@pytest.fixture(scope="module")
def shapes_pipe():
    from minidiff.course.viz import shapes_available
    from minidiff.pipeline import load_pipeline

    if not shapes_available():
        pytest.skip("weights/shapes is not there")
    return load_pipeline("shapes", device="cpu")
