import dataclasses

import pytest
import torch

from minidiff.config import from_diffusers, to_diffusers
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.unet import UNet, UNetConfig, count_parameters, timestep_embedding

PARAMETERS = {  # published counts (diffusers UNet2DConditionModel; BK-SDM model card)
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sd21_base": 865_910_724,
    "bk_sdm_base": 579_384_964,
    "bk_sdm_small": 482_346_884,
    "bk_sdm_tiny": 323_384_964,
    "sdxl": 2_567_463_684,  # diffusers' count of UNet2DConditionModel.from_config(sdxl unet/config.json)
    "sdxl_refiner": 2_259_526_660,
}


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


def tiny_inputs(batch=2, height=16, width=16, tokens=5, context_dim=32):
    return torch.randn(batch, 4, height, width), torch.randn(batch, tokens, context_dim)


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_presets_build_on_meta_with_published_parameter_counts(name):
    with torch.device("meta"):
        unet = UNet(getattr(UNetConfig, name)())
    assert count_parameters(unet) == PARAMETERS[name]
    assert list(unet.buffers()) == []  # nothing that needs real data at init: load with assign=True


def test_meta_model_loads_with_assign_and_runs(tiny_unet):
    with torch.device("meta"):
        unet = UNet(UNetConfig.tiny())
    unet.load_state_dict(tiny_unet.state_dict(), strict=True, assign=True)
    x, context = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 10, context), tiny_unet(x, 10, context), rtol=0, atol=0)


@pytest.mark.parametrize("height, width", [(16, 16), (8, 24)])
def test_output_has_the_latent_shape(tiny_unet, height, width):
    x, context = tiny_inputs(height=height, width=width)
    with torch.no_grad():
        assert tiny_unet(x, torch.tensor([5, 900]), context).shape == x.shape


def test_timestep_forms_agree(tiny_unet):
    """An int, a float, a 0-dim tensor and a per-item tensor of the same t give the same output."""
    x, context = tiny_inputs()
    with torch.no_grad():
        expected = tiny_unet(x, torch.tensor([250, 250]), context)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0]), torch.tensor([250], dtype=torch.float64)):
            torch.testing.assert_close(tiny_unet(x, t, context), expected, rtol=0, atol=0)
        assert not torch.equal(tiny_unet(x, torch.tensor([250.5, 250.0]), context)[0], expected[0])


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 8)
    frequencies = 10000 ** (-torch.arange(4) / 4)
    angles = t[:, None] * frequencies
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], dim=-1))
    assert emb.dtype == torch.float32


def test_channels_last_input_gives_the_same_output(tiny_unet):
    x, context = tiny_inputs()
    with torch.no_grad():
        expected = tiny_unet(x, 500, context)
        actual = tiny_unet(x.to(memory_format=torch.channels_last), 500, context)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(tiny_unet, dtype):
    """bf16 / fp16 weights and inputs: output in that dtype, within 3% (bf16) / 1% (fp16) of the fp32 output."""
    x, context = tiny_inputs()
    half = UNet(UNetConfig.tiny()).to(dtype).eval()
    half.load_state_dict(tiny_unet.state_dict())
    with torch.no_grad():
        expected = tiny_unet(x, 999, context)
        actual = half(x.to(dtype), 999, context.to(dtype))
    assert actual.dtype == dtype
    error = (actual.float() - expected).abs().max() / expected.abs().max()
    assert error < (3e-2 if dtype == torch.bfloat16 else 1e-2), error


def test_wrong_context_dim_names_the_likely_mistake():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    x = torch.randn(2, 4, 8, 8, device="meta")
    with pytest.raises(MinidiffError, match="context has dim 1024 but this UNet expects 768: an SD 2.x text encoder"):
        unet(x, 1, torch.randn(2, 77, 1024, device="meta"))


def test_context_batch_must_match(tiny_unet):
    x, context = tiny_inputs(batch=2)
    with pytest.raises(MinidiffError, match="batch"):
        tiny_unet(x, 1, context[:1])


@pytest.mark.parametrize("height, width", [(12, 16), (16, 20)])
def test_latent_size_not_a_multiple_of_8_is_named(tiny_unet, height, width):
    x, context = tiny_inputs(height=height, width=width)
    with pytest.raises(MinidiffError, match=f"latent size {height}x{width} is not a multiple of 8: .* halves it 3 "):
        tiny_unet(x, 1, context)


def test_bk_sdm_tiny_needs_only_a_multiple_of_4():
    """BK-SDM-Tiny has three stages, so it downsamples twice."""
    assert UNetConfig.bk_sdm_tiny().downsample_factor == 4
    config = dataclasses.replace(UNetConfig.tiny(), block_out_channels=(32, 64, 64), num_attention_heads=(2, 4, 4),
                                 cross_attention=(True, True, True), layers_per_block=1, mid_block=False)
    unet = UNet(config).eval()
    x, context = tiny_inputs(height=12, width=20)
    with torch.no_grad():
        assert unet(x, 1, context).shape == x.shape
    with pytest.raises(MinidiffError, match="not a multiple of 4"):
        unet(torch.randn(2, 4, 10, 12), 1, context)


def test_wrong_latent_channels_and_timestep_count(tiny_unet):
    x, context = tiny_inputs()
    with pytest.raises(MinidiffError, match=r"\(B, 4, H, W\)"):
        tiny_unet(torch.randn(2, 3, 16, 16), 1, context)
    with pytest.raises(MinidiffError, match="one per batch item"):
        tiny_unet(x, torch.tensor([1, 2, 3]), context)


# --- diffusers unet/config.json --------------------------------------------------------------------------

# the published configs (stable-diffusion-v1-5, stable-diffusion-2-1, nota-ai/bk-sdm-tiny), trimmed of the
# options that are at their "off" value
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {
    **SD15_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention": False,
    "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True,
}
BK_SDM_TINY_CONFIG = {
    **SD15_CONFIG, "block_out_channels": [320, 640, 1280], "layers_per_block": 1, "mid_block_type": None,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "mid_block_only_cross_attention": None,
    "resnet_out_scale_factor": 1.0, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
}


@pytest.mark.parametrize("config, preset", [(SD15_CONFIG, "sd15"), (SD21_CONFIG, "sd21"),
                                            (BK_SDM_TINY_CONFIG, "bk_sdm_tiny")])
def test_from_diffusers_reads_published_configs(config, preset):
    assert from_diffusers(UNetConfig, config) == getattr(UNetConfig, preset)()


@pytest.mark.parametrize("name", list(PARAMETERS) + ["tiny"])
def test_to_diffusers_round_trips(name):
    config = getattr(UNetConfig, name)()
    assert from_diffusers(UNetConfig, to_diffusers(config)) == config


@pytest.mark.parametrize("option, value", [
    ("addition_embed_type", "image"),  # Kandinsky-style image conditioning (SDXL's "text_time" is read)
    ("addition_embed_type", "text_time"),  # without its two dimensions
    ("time_cond_proj_dim", 256),  # LCM-distilled UNets
    ("transformer_layers_per_block", [1, 2, 10]),  # three depths for four stages
    ("class_embed_type", "timestep"),
    ("some_future_option", 3),
])
def test_from_diffusers_names_unsupported_options(option, value):
    with pytest.raises(CheckpointError, match=option):
        from_diffusers(UNetConfig, {**SD15_CONFIG, option: value})


def test_from_diffusers_rejects_other_block_types():
    with pytest.raises(CheckpointError, match="AttnDownBlock2D"):
        from_diffusers(UNetConfig, {**SD15_CONFIG, "down_block_types": ["AttnDownBlock2D"] * 4})
