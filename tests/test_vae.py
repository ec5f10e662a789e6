"""Unit tests for minidiff.vae (AutoencoderKL) and minidiff.taesd (TAESD): shapes, meta construction, configs,
and the errors a user sees for bad input. Parity with diffusers lives in tests/parity/test_vae.py."""

import pytest
import torch

from minidiff.config import from_diffusers, to_diffusers
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.taesd import TAESD, TAESDConfig
from minidiff.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL(VAEConfig.tiny()).eval()


@pytest.fixture(scope="module")
def taesd():
    return TAESD().eval()


@pytest.mark.parametrize("model_name", ["vae", "taesd"])
def test_shapes_round_trip(model_name, request):
    model = request.getfixturevalue(model_name)
    image = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        latent = model.encode(image)
        assert latent.shape == (2, 4, 6, 8)
        assert model.decode(latent).shape == (2, 3, 48, 64)
    assert model.downsample_factor == 8 and model.latent_channels == 4


def test_scaling_factors():
    assert AutoencoderKL(VAEConfig.tiny()).scaling_factor == 0.18215
    assert VAEConfig.sd().scaling_factor == 0.18215 and VAEConfig.sdxl().scaling_factor == 0.13025
    assert TAESD.scaling_factor == TAESD().scaling_factor == 1.0  # TAESD already works on scaled latents


def test_sample_uses_the_generator(vae):
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        draw = lambda seed: vae.encode(image, generator=torch.Generator().manual_seed(seed), sample=True)
        mean = vae.encode(image)
        assert torch.equal(draw(1), draw(1))
        assert not torch.equal(draw(1), draw(2))
        assert not torch.equal(draw(1), mean)
        assert torch.equal(vae.encode(image), mean)  # the mean is deterministic


@pytest.mark.parametrize("model_class, config", [(AutoencoderKL, VAEConfig.sd()), (TAESD, TAESDConfig.sd())])
def test_meta_construction_then_assign_load(model_class, config):
    with torch.device("meta"):
        model = model_class(config)
    assert all(p.is_meta for p in model.parameters())
    weights = {key: torch.randn(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(weights, strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())


def test_full_sd_key_names_and_parameter_count():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.sd())
    keys = model.state_dict().keys()
    for key in [
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up_blocks.3.resnets.2.conv2.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
    ]:
        assert key in keys, key
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in keys  # the last level keeps its size
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # the published kl-f8 VAE


@pytest.mark.parametrize("model_name", ["vae", "taesd"])
@pytest.mark.parametrize("height, width", [(65, 64), (64, 36)])
def test_image_size_not_multiple_of_8_is_named(model_name, height, width, request):
    model = request.getfixturevalue(model_name)
    with pytest.raises(MinidiffError, match=rf"{height}x{width}.*multiple of 8.*resize or crop"):
        model.encode(torch.zeros(1, 3, height, width))


@pytest.mark.parametrize("model_name", ["vae", "taesd"])
def test_wrong_input_shapes_are_named(model_name, request):
    model = request.getfixturevalue(model_name)
    with pytest.raises(MinidiffError, match=r"\(batch, 3, height, width\).*\(3, 64, 64\)"):
        model.encode(torch.zeros(3, 64, 64))
    with pytest.raises(MinidiffError, match=r"\(batch, 4, height, width\).*\(1, 16, 8, 8\)"):
        model.decode(torch.zeros(1, 16, 8, 8))


def test_input_is_cast_to_the_weights_dtype():
    vae = AutoencoderKL(VAEConfig.tiny()).to(torch.float64)
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 4, 2, 2)).dtype == torch.float64
        assert vae.encode(torch.zeros(1, 3, 16, 16)).dtype == torch.float64


def test_vae_config_from_diffusers_sd15_json():
    sd15 = {  # runwayml/stable-diffusion-v1-5 vae/config.json
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }  # fmt: skip
    assert from_diffusers(VAEConfig, sd15) == VAEConfig.sd()
    assert from_diffusers(VAEConfig, to_diffusers(VAEConfig.tiny())) == VAEConfig.tiny()


@pytest.mark.parametrize(
    "option, message",
    [
        ({"act_fn": "gelu"}, r"act_fn='gelu'.*'silu'"),
        ({"use_quant_conv": False}, r"use_quant_conv=False"),
        ({"latents_mean": [0.1] * 4}, r"latents_mean"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, r"down_block_types"),
        ({"frobnicate": 1}, r"'frobnicate'"),
        ({"_class_name": "AutoencoderTiny"}, r"AutoencoderTiny.*TAESD"),
    ],
)
def test_vae_config_names_unsupported_options(option, message):
    with pytest.raises(CheckpointError, match=message):
        from_diffusers(VAEConfig, to_diffusers(VAEConfig.sd()) | option)


def test_vae_config_bad_group_count():
    with pytest.raises(MinidiffError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(48, 64), norm_num_groups=32)


def test_taesd_config_from_diffusers():
    assert (
        from_diffusers(TAESDConfig,
            {
                "_class_name": "AutoencoderTiny",
                "latent_channels": 4,
                "force_upcast": False,
                "num_decoder_blocks": [3, 3, 3, 1],
            }
        )
        == TAESDConfig.sd()
    )
    with pytest.raises(CheckpointError, match="num_decoder_blocks"):
        from_diffusers(TAESDConfig, {"_class_name": "AutoencoderTiny", "num_decoder_blocks": [1, 1, 1, 1]})
    with pytest.raises(CheckpointError, match="not an AutoencoderTiny"):
        from_diffusers(TAESDConfig, to_diffusers(VAEConfig.sd()))
