"""Inpainting (minidiff.inpaint) from Python and from the command line, on the tiny random-weight model: the mask's
preparation, the kept part left exactly as the picture's latents, the trace read as diffusers' latents, and
`minidiff generate --image --mask`. Parity with diffusers: tests/parity/test_inpaint.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import inpaint
from minidiff.cli import main
from minidiff.pipeline import load_pipeline
from tests.parity.test_pipeline import make_image


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return load_pipeline(tiny_sd[0], device="cpu", dtype=torch.float32)


def left_half_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :29] = 200  # 29 px: the edge falls inside the 4th latent column; 200 > 127.5 is "repaint"
    return Image.fromarray(mask)


def test_the_mask_is_cut_at_one_half_and_shrunk_by_nearest_neighbour():
    pixels = inpaint.mask_pixels(left_half_mask(), 64, 64)
    assert set(pixels.unique().tolist()) == {0.0, 1.0} and pixels[0, 0, :, :29].all() and not pixels[0, 0, :, 29:].any()
    latent = inpaint.latent_mask(pixels)
    assert latent.shape == (1, 1, 8, 8)
    assert latent[0, 0, :, :4].all() and not latent[0, 0, :, 4:].any()  # column 3 samples pixel 24: repainted
    assert inpaint.mask_pixels(Image.new("RGB", (64, 64), (100, 100, 100)), 64, 64).sum() == 0  # grey 100 < 127.5


def test_the_kept_part_is_the_pictures_latents_and_the_mask_matters(pipe):
    options = dict(steps=4, seed=3, image=make_image(), height=64, width=64, progress=False, trace=True)
    result = pipe("a red circle", mask=left_half_mask(), **options)
    picture = pipe.encode_image(make_image(), 64, 64, torch.Generator().manual_seed(3))
    kept = inpaint.latent_mask(inpaint.mask_pixels(left_half_mask(), 64, 64)).expand_as(picture) == 0
    assert torch.equal(result.latents[kept], picture[kept])
    assert (result.latents[~kept] - picture[~kept]).abs().max() > 0.1
    everything = pipe("a red circle", mask=Image.new("L", (64, 64), 255), **options)
    assert not torch.allclose(everything.latents[kept], picture[kept])  # all repainted: nothing kept
    assert len(result.trace) == 4 and result.trace[-1].pred_x0[0].size == (64, 64)


def test_the_trace_shows_the_picture_outside_the_mask(pipe):
    """x_inter outside the mask is the picture at the next call's level (diffusers' blended latents), and after the
    last step the picture's own latents; pred_x0 outside the mask is the picture."""
    records = []
    job_seen = []
    original = inpaint.Inpainting.trace_view

    def spy(self, recorded):
        job_seen.append(self)
        original(self, recorded)
        records.extend(recorded)

    inpaint.Inpainting.trace_view = spy
    try:
        pipe("a red circle", steps=3, seed=3, image=make_image(), mask=left_half_mask(), height=64, width=64,
             progress=False, trace=True, sampler="ddim")
    finally:
        inpaint.Inpainting.trace_view = original
    job = job_seen[0]
    kept = (job.mask == 0).expand_as(job.image_latents)
    assert torch.equal(records[-1]["x"][kept], job.image_latents[kept])
    assert torch.equal(records[0]["pred_x0"][kept], job.image_latents[kept])
    alpha, sigma = job.levels(job.seen[1])  # the level after step 0: ddim's second timestep
    expected = alpha * job.image_latents + sigma * job.noise
    assert torch.allclose(records[0]["x"][kept], expected[kept])


def test_cli_inpaints_and_defaults_to_strength_one(tiny_sd, tmp_path, capsys):
    make_image().save(tmp_path / "picture.png")
    left_half_mask().save(tmp_path / "mask.png")
    out = tmp_path / "repainted.png"
    code = main(["generate", "a red circle", "--model", str(tiny_sd[0]), "--steps", "3", "--size", "64",
                 "--image", str(tmp_path / "picture.png"), "--mask", str(tmp_path / "mask.png"), "--out", str(out),
                 "--device", "cpu", "--seed", "3"])
    assert code == 0 and Image.open(out).size == (64, 64)
    pipe = load_pipeline(tiny_sd[0], device="cpu", dtype=torch.float32)
    same = pipe("a red circle", steps=3, seed=3, image=make_image(), mask=left_half_mask(), strength=1.0,
                height=64, width=64, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(same))
