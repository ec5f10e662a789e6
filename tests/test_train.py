"""The training command: a few steps on tiny networks write a complete, loadable diffusers folder."""

import json

import numpy as np
import pytest
import torch

from minidiff.course import shapes, train
from minidiff.course.evaluate import held_out_prompts
from minidiff.load import load_components
from minidiff.pipeline import Pipeline


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    log = train.train(train.TrainConfig.quick(), out, progress=False, threads=None)
    return out, log


def test_quick_run_writes_the_diffusers_folder_layout(quick_run):
    out, log = quick_run
    for path in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json", "loss_curve.png", "train_log.json"):
        assert (out / path).is_file(), path
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    saved_log = json.loads((out / "train_log.json").read_text())
    assert set(saved_log["timings_s"]) >= {"phase 1: vae", "phase 2: unet + text encoder", "evaluation"}
    assert saved_log["held_out_adherence"]["n"] == train.TrainConfig.quick().eval_prompts
    assert log["weights_mb"] < 30


def test_saved_folder_loads_back_with_the_trained_weights_and_scaling_factor(quick_run):
    out, log = quick_run
    parts = load_components(out)
    assert parts.vae.scaling_factor == pytest.approx(log["scaling_factor"])
    assert parts.vae.scaling_factor != pytest.approx(0.18215)  # computed from the latents, not the SD default
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
    assert parts.prediction_type == "epsilon"
    pipeline = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.schedule)
    result = pipeline("a small red circle in the top left", steps=2, seed=0, progress=False)
    assert result.images[0].size == (64, 64)


def test_losses_go_down_on_tiny_networks():
    """A few dozen steps on a handful of pictures: both phases must learn something."""
    config = train.TrainConfig.quick()
    config.vae_steps, config.steps, config.warmup, config.vae_batch = 30, 30, 5, 8
    config.vae_lr = config.lr = 3e-3
    torch.manual_seed(0)
    pixels, specs = train.render_pool(16, seed=0)
    windows = train.to_images(train.crop(pixels, train.window_origins(specs, torch.Generator(), 0.0)))
    vae = train.AutoencoderKL(config.vae)
    held_loss = lambda: train.vae_loss(vae, windows, config, torch.Generator().manual_seed(0)).item()
    with torch.no_grad():
        before = held_loss()
    train.train_vae(vae, pixels, specs, config, progress=False)
    with torch.no_grad():
        assert held_loss() < 0.7 * before

    latents = torch.randn(16, 4, 8, 8) * 0.2 + torch.linspace(-1, 1, 16).view(16, 1, 1, 1)
    unet, text_encoder = train.UNet(config.unet), train.CLIPTextModel(config.text_encoder)
    losses = train.train_diffusion(
        unet, text_encoder, train.CLIPTokenizer.default(), latents, specs, train.shape_cells(pixels), config,
        progress=False
    )
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_vae_windows_hold_the_whole_shape_on_the_latent_lattice():
    pixels, specs = train.render_pool(200, seed=1)
    origins = train.window_origins(specs, torch.Generator().manual_seed(0), background_fraction=0.0)
    crops = train.crop(pixels, origins)
    assert crops.shape == (200, 3, train.CROP, train.CROP)
    background = torch.tensor(shapes.BACKGROUND, dtype=torch.uint8).view(3, 1, 1)
    shape_pixels = lambda images: (images != background).any(dim=1).sum(dim=(1, 2))
    assert torch.equal(shape_pixels(crops), shape_pixels(pixels))  # nothing of any shape was cut off
    assert all(top % 8 == 0 and left % 8 == 0 for top, left in origins)
    anywhere = train.window_origins(specs, torch.Generator().manual_seed(0), background_fraction=1.0)
    assert len(set(anywhere)) > 10 and all(o in train.LATTICE for origin in anywhere for o in origin)


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [train.learning_rate(step, 100, 1e-3, 10) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert max(rates) == pytest.approx(1e-3) and rates[-1] < 1e-6
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


def test_held_out_prompts_cover_every_held_out_combination_and_nothing_else():
    pairs = held_out_prompts(256)
    combos = [spec.combination() for _, spec in pairs]
    assert set(combos) == set(shapes.HELD_OUT)
    assert {spec.size for _, spec in pairs} == set(shapes.SIZES)
    assert len({prompt for prompt, _ in pairs}) > 200  # varied wording


def test_command_line_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["shapes", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["cats"])
