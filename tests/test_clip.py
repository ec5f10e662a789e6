"""Unit tests of minidiff.clip on tiny configs (the reference comparison is in tests/parity/test_clip.py)."""

import pytest
import torch

from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.config import from_diffusers, to_diffusers
from minidiff.errors import CheckpointError, MinidiffError

# text_encoder/config.json of SD 1.5 and SD 2.1 as published (transformers 4.x era)
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}  # fmt: skip
SD21_CONFIG = SD15_CONFIG | {
    "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
    "num_hidden_layers": 23, "projection_dim": 512,
}  # fmt: skip


def tiny_model():
    model = CLIPTextModel(CLIPTextConfig.tiny()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def test_presets_read_from_published_configs():
    assert from_diffusers(CLIPTextConfig, SD15_CONFIG) == CLIPTextConfig.sd15()
    assert from_diffusers(CLIPTextConfig, SD21_CONFIG) == CLIPTextConfig.sd21()
    assert from_diffusers(CLIPTextConfig, {"text_config": SD15_CONFIG}) == CLIPTextConfig.sd15()
    for config in (CLIPTextConfig.sd15(), CLIPTextConfig.sd21(), CLIPTextConfig.tiny()):
        assert from_diffusers(CLIPTextConfig, to_diffusers(config)) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"architectures": ["CLIPVisionModel"]}, "CLIPVisionModel"),  # (WithProjection is SDXL's second encoder)
        ({"hidden_size": None}, "lacks hidden_size"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    config = {k: v for k, v in (SD15_CONFIG | change).items() if v is not None}
    with pytest.raises(CheckpointError, match=message):
        from_diffusers(CLIPTextConfig, config)


def test_config_errors():
    with pytest.raises(MinidiffError, match="hidden_act"):
        CLIPTextConfig(hidden_act="swish")
    with pytest.raises(MinidiffError, match="multiple"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=3)


def test_state_dict_layout():
    keys = set(CLIPTextModel(CLIPTextConfig.tiny()).state_dict())
    layer = "text_model.encoder.layers.2."
    for name in ("self_attn.q_proj.weight", "self_attn.out_proj.bias", "layer_norm1.weight", "mlp.fc1.weight",
                 "mlp.fc2.bias", "layer_norm2.bias"):  # fmt: skip
        assert layer + name in keys
    assert {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"} <= keys  # fmt: skip
    assert len(keys) == 4 + 3 * 16 and not any("position_ids" in key for key in keys)


def test_meta_construction_and_assign_loading():
    source = tiny_model()
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.tiny())
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert model.text_model.final_layer_norm.weight.data_ptr() == source.text_model.final_layer_norm.weight.data_ptr()
    ids = torch.randint(0, 49408, (2, 77))
    torch.testing.assert_close(model(ids), source(ids), rtol=0, atol=0)


def test_output_shape_and_causality():
    model = tiny_model()
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        out = model(ids)
        changed = ids.clone()
        changed[:, 40] = (changed[:, 40] + 1) % 49406
        out_changed = model(changed)
    assert out.shape == (2, 77, 32)
    torch.testing.assert_close(out[:, :40], out_changed[:, :40], rtol=0, atol=0)  # earlier tokens never look ahead
    assert (out[:, 40:] - out_changed[:, 40:]).abs().amax(dim=-1).gt(0).all()


def test_skip_last_layers_equals_a_shorter_model():
    model = tiny_model()
    ids = torch.randint(0, 49406, (2, 77))
    for skip in (1, 2):
        config = CLIPTextConfig.tiny()
        config.num_hidden_layers -= skip
        shorter = CLIPTextModel(config)
        dropped = [f"text_model.encoder.layers.{i}." for i in range(3 - skip, 3)]
        kept = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(dropped))}
        shorter.load_state_dict(kept, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, skip_last_layers=skip), shorter(ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_follows_the_weights(dtype):
    model = tiny_model()
    ids = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        reference = model(ids)
        out = model.to(dtype)(ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.1 if dtype == torch.bfloat16 else 1e-5)


def test_input_errors():
    model = CLIPTextModel(CLIPTextConfig.tiny())
    with pytest.raises(MinidiffError, match="integer tensor"):
        model(torch.zeros(1, 77))
    with pytest.raises(MinidiffError, match="integer tensor"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(MinidiffError, match="max_length=77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(MinidiffError, match="0..49407"):
        model(torch.full((1, 77), 49408))
    with pytest.raises(MinidiffError, match="skip_last_layers=3"):
        model(torch.zeros(1, 77, dtype=torch.long), skip_last_layers=3)
