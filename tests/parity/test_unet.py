"""minidiff.unet.UNet against diffusers' UNet2DConditionModel on the same random weights.

Tolerance (fp32): max |ours - reference| <= 1e-4 * max |reference| on every case.
"""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel  # the oracle

from minidiff.config import to_diffusers
from minidiff.unet import UNet, UNetConfig

PRESETS = ["sd15", "sd21", "sd21_base", "bk_sdm_base", "bk_sdm_small", "bk_sdm_tiny", "tiny"]
RELATIVE_TOLERANCE = 1e-4  # fp32


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights that keep activations O(1) everywhere: unit-variance layers, non-trivial norms and biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:  # conv / linear weight: variance 1 / fan_in (uniform is faster to draw than normal)
                bound = (3 / param[0].numel()) ** 0.5
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                param.uniform_(0.6, 1.4, generator=generator)
            else:  # biases
                param.uniform_(-0.2, 0.2, generator=generator)
    return model


def reference_and_ours(config: UNetConfig):
    """The diffusers reference with random weights, and our UNet built on meta and loaded from its state_dict.

    assign=True makes both models share the same tensors: one copy of the weights in memory (3.4 GB for SD 1.5).
    """
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(to_diffusers(config))
        ours = UNet(config)
    reference = randomize_(reference.to_empty(device="cpu")).eval()
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, ours.eval()


def assert_parity(reference, ours, x, t, context):
    with torch.no_grad():
        expected = reference(x, t, context).sample
        actual = ours(x, t, context)
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert scale > 0.1, f"reference output is trivially small ({scale}): the test would prove nothing"
    assert actual.shape == expected.shape
    assert error <= RELATIVE_TOLERANCE * scale, f"max abs error {error:.3g} vs max |reference| {scale:.3g}"


def inputs(config: UNetConfig, height: int, width: int, batch: int = 2, tokens: int = 77):
    x = torch.randn(batch, config.in_channels, height, width)
    context = torch.randn(batch, tokens, config.cross_attention_dim)
    return x, context


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_keys_and_shapes_equal_diffusers(name):
    config = getattr(UNetConfig, name)()
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(to_diffusers(config))
        ours = UNet(config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert sorted(set(actual) ^ set(expected)) == []
    assert actual == expected


TINY_VARIANTS = {
    "sd1_layout": UNetConfig.tiny(),
    "sd2_layout": dataclasses.replace(UNetConfig.tiny(), use_linear_projection=True, num_attention_heads=(1, 2, 2, 2)),
    "bk_small_layout": dataclasses.replace(UNetConfig.tiny(), layers_per_block=1, mid_block=False),
    "bk_tiny_layout": dataclasses.replace(UNetConfig.tiny(), block_out_channels=(32, 64, 64), layers_per_block=1,
                                          cross_attention=(True, True, True), num_attention_heads=(2, 4, 4),
                                          mid_block=False),
}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("height, width", [(16, 16), (24, 40)])
def test_tiny_matches_diffusers(variant, height, width):
    config = TINY_VARIANTS[variant]
    reference = randomize_(UNet2DConditionModel.from_config(to_diffusers(config))).eval()
    ours = UNet(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # a copy this time (the loader path uses assign)
    x, context = inputs(config, height, width, tokens=7)
    assert_parity(reference, ours, x, torch.tensor([999, 3]), context)  # different timesteps per item
    assert_parity(reference, ours, x, torch.tensor([500.5, 0.25]), context)  # fractional timesteps
    assert_parity(reference, ours, x, 421, context)  # one int for the batch


def test_tiny_matches_diffusers_with_python_float_and_batch_one():
    config = UNetConfig.tiny()
    reference, ours = reference_and_ours(config)
    x, context = inputs(config, 8, 8, batch=1, tokens=5)
    assert_parity(reference, ours, x, 37.75, context)


@pytest.mark.slow
def test_sd15_full_config_matches_diffusers():
    """The full SD 1.5 network (859,520,964 parameters) on a 16x16 latent, a CFG pair with different t."""
    config = UNetConfig.sd15()
    reference, ours = reference_and_ours(config)
    x, context = inputs(config, 16, 16)
    assert_parity(reference, ours, x, torch.tensor([981, 1]), context)


@pytest.mark.slow
def test_sd21_full_config_matches_diffusers():
    """SD 2.1: OpenCLIP context (1024), head dim 64 (5, 10, 20, 20 heads), linear projections; 16x24 latent."""
    config = UNetConfig.sd21()
    reference, ours = reference_and_ours(config)
    x, context = inputs(config, 16, 24)
    assert_parity(reference, ours, x, torch.tensor([700.0, 12.5]), context)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bk_sdm_base", "bk_sdm_small", "bk_sdm_tiny"])
def test_bk_sdm_full_configs_match_diffusers(name):
    config = getattr(UNetConfig, name)()
    reference, ours = reference_and_ours(config)
    x, context = inputs(config, 16, 16)
    assert_parity(reference, ours, x, torch.tensor([999, 250]), context)
