"""The pipeline and the command line on a tiny random-weight model saved in the official layout."""

import pytest
import torch
from PIL import Image

from minidiff.cli import main
from minidiff.errors import MinidiffError
from minidiff.images import trace_frames, trace_grid
from minidiff.pipeline import load_pipeline
from minidiff.samplers import sample


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return load_pipeline(tiny_sd[0], device="cpu", dtype=torch.float32)


def run(pipe, **options):
    options = {"steps": 4, "height": 64, "width": 64, "seed": 3, "progress": False, **options}
    return pipe("a red circle", **options)


def test_same_seed_same_image_and_other_seed_differs(pipe):
    a, b, c = run(pipe).latents, run(pipe).latents, run(pipe, seed=4).latents
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_guidance_one_is_the_conditional_prediction_alone(pipe):
    """guidance_scale <= 1 means no guidance: one UNet call on the prompt, the negative prompt unused."""
    noise = torch.randn(1, 4, 8, 8)
    ours = run(pipe, guidance_scale=1.0, negative_prompt="anything", latents=noise, sampler="ddim").latents
    context = pipe.encode_prompt(["a red circle"])
    reference = sample(lambda x, t: pipe.unet(x, t, context), noise, sampler="ddim", steps=4)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_early_exit_returns_the_samplers_pred_x0_at_that_step(pipe):
    seen = []
    full = run(pipe, steps=10, callback=lambda **info: seen.append(info["pred_x0"].clone()))
    early = run(pipe, steps=10, early_exit=0.7)
    assert len(seen) == 10 and full.latents.shape == early.latents.shape
    torch.testing.assert_close(early.latents, seen[6], rtol=0, atol=0)


def test_img2img_strength_zero_returns_the_input_up_to_the_vae_round_trip(pipe):
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    result = run(pipe, image=image, strength=0.0)
    latent = pipe.encode_image(image, 64, 64, torch.Generator().manual_seed(3))
    torch.testing.assert_close(result.latents, latent, rtol=0, atol=1e-6)
    partial = run(pipe, image=image, strength=0.5, steps=4)
    assert partial.latents.shape == latent.shape


def test_trace_has_every_step_decoded_and_makes_a_grid_and_frames(pipe):
    result = run(pipe, steps=5, trace=True)
    assert [s.step for s in result.trace] == list(range(5))
    assert result.trace[0].x_inter[0].size == (64, 64)
    assert trace_grid(result.trace, [0, 4]).size == (128, 128)
    assert len(trace_frames(result.trace)) == 5


def test_long_prompt_is_encoded_whole_in_two_chunks_without_a_warning(pipe, recwarn):
    prompt = " ".join(["circle"] * 90)  # 90 tokens > 75: two chunks of 77 positions (minidiff.prompts)
    assert pipe.encode_prompt([prompt]).shape[1] == 2 * 77
    pipe(prompt, steps=1, height=64, width=64, progress=False)
    assert not [w for w in recwarn if "token" in str(w.message)]


@pytest.mark.parametrize(("options", "message"), [
    ({"height": 60}, "multiple of 8"),
    ({"steps": 0}, "integer from 1"),
    ({"strength": 1.5, "image": Image.new("RGB", (64, 64))}, "strength"),
    ({"sampler": "dpm"}, "unknown sampler"),
    ({"image": "/nonexistent/picture.png"}, "the input image /nonexistent/picture.png does not exist"),
    ({"preview": "taesd"}, "TAESD"),
])
def test_bad_input_is_named(pipe, options, message):
    with pytest.raises(MinidiffError, match=message):
        run(pipe, **options)


def test_cli_generate_writes_image_trace_and_grid(tiny_sd, tmp_path, capsys):
    out, gif, grid = tmp_path / "image.png", tmp_path / "trace.gif", tmp_path / "grid.png"
    code = main(["generate", "a red circle", "--model", str(tiny_sd[0]), "--steps", "3", "--size", "64",
                 "--out", str(out), "--trace", str(gif), "--grid", str(grid), "--device", "cpu"])
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert Image.open(gif).n_frames == 3
    assert Image.open(grid).size == (3 * 64, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "image.png", "trace.gif"]


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "63"], "multiple of 8"),
    (["--steps", "0"], "integer from 1"),
    (["--out", "/nonexistent/folder/image.png"], "cannot write"),
    (["--sampler", "nope"], "unknown sampler"),
])
def test_cli_errors_are_one_line_and_write_nothing(tiny_sd, tmp_path, capsys, args, message):
    code = main(["generate", "x", "--model", str(tiny_sd[0]), "--device", "cpu",
                 "--out", str(tmp_path / "image.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_model_lists_known_names(capsys):
    assert main(["generate", "x", "--model", "no-such-model"]) == 2
    assert "sd15" in capsys.readouterr().err
