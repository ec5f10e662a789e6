"""Parity: original single-file checkpoints (CompVis / Stability-AI layout) read by minidiff and by diffusers.

Each test writes a checkpoint in the original layout from a reference model's random weights (through
minidiff.keymap.to_original), converts it back with diffusers' own converters (single_file_utils) and with
minidiff's loader, and checks that (1) both give identical tensors, equal to the reference's, and (2) the model
minidiff loads from the file matches the reference's outputs: float32, max abs diff <= 1e-4 * max |reference|.
"""

import dataclasses

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as ReferenceVAE
from diffusers import UNet2DConditionModel as ReferenceUNet
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from minidiff import keymap
from minidiff.checkpoint import read_safetensors
from minidiff.clip import CLIPTextConfig
from minidiff.config import to_diffusers
from minidiff.errors import CheckpointError
from minidiff.load import load_components, load_text_encoder, load_unet, load_vae
from minidiff.unet import UNetConfig
from minidiff.vae import VAEConfig

RELATIVE_TOLERANCE = 1e-4  # float32

# Tiny UNets whose head counts follow the official rule the loader assumes (SD 1.x: 8 heads; SD 2.x: 64-channel heads)
UNETS = {
    "sd1": UNetConfig(block_out_channels=(32, 64, 64, 64), num_attention_heads=(8,) * 4, cross_attention_dim=32),
    "sd2": UNetConfig(block_out_channels=(64, 128, 128, 128), num_attention_heads=(1, 2, 2, 2),
                      cross_attention_dim=1024, use_linear_projection=True, sample_size=96),
    "bk_sdm_small": UNetConfig(block_out_channels=(32, 64, 64, 64), num_attention_heads=(8,) * 4,
                               cross_attention_dim=32, layers_per_block=1, mid_block=False),
    "bk_sdm_tiny": UNetConfig(block_out_channels=(32, 64, 64), cross_attention=(True, True, True),
                              num_attention_heads=(8,) * 3, cross_attention_dim=32, layers_per_block=1,
                              mid_block=False),
}
VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1)  # 32 groups, as the loader assumes
CLIP = CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2)  # 64-channel heads, as the loader assumes
OPEN_CLIP = dataclasses.replace(CLIP, hidden_act="gelu")  # OpenCLIP's exact GELU


def assert_close(ours, reference, what):
    assert ours.shape == reference.shape, what
    error, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max abs diff {error:.3g} > 1e-4 * {scale:.3g}"


def assert_identical(ours: dict, theirs: dict, reference: dict, what):
    """minidiff's conversion == diffusers' conversion == the reference weights, key for key, bit for bit."""
    assert set(ours) == set(theirs) == set(reference), f"{what}: key sets differ: {set(ours) ^ set(theirs)}"
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]) and torch.equal(value, reference[key]), f"{what}: {key}"


def randomized(model):
    """Every parameter perturbed, so that norms are not identities and a mix-up of two tensors shows."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def reference_text_encoder(config):
    kwargs = {k: v for k, v in to_diffusers(config).items() if k != "architectures"}
    return randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)))


def original_text_encoder(reference, open_clip: bool) -> dict:
    """The text encoder as an SD 1.x (HF CLIP + position_ids) or SD 2.x (OpenCLIP, one resblock more) file has it."""
    state = {f"text_model.{k}": v for k, v in reference.state_dict().items()}
    if not open_clip:
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        return {keymap.PREFIXES["clip"] + k: v for k, v in state.items()}
    original = keymap.to_original(state, "open_clip", {"num_hidden_layers": reference.config.num_hidden_layers})
    width, last = reference.config.hidden_size, reference.config.num_hidden_layers
    extra = randomized(reference_text_encoder(OPEN_CLIP)).state_dict()  # the 24th resblock SD 2.x does not use
    extra = keymap.to_original({f"text_model.{k}": v for k, v in extra.items() if k.startswith("encoder.layers.0.")},
                               "open_clip", {"num_hidden_layers": 1})
    original |= {k.replace("resblocks.0.", f"resblocks.{last}."): v for k, v in extra.items()}
    original |= {"text_projection": torch.randn(width, width), "logit_scale": torch.tensor(4.6)}
    return {keymap.PREFIXES["open_clip"] + k: v for k, v in original.items()}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_single_file_matches_diffusers_converter_and_outputs(name, tmp_path):
    config = UNETS[name]
    diffusers_config = to_diffusers(config)
    reference = randomized(ReferenceUNet.from_config(diffusers_config))
    original = keymap.to_original(reference.state_dict(), "unet", diffusers_config)
    checkpoint = {keymap.PREFIXES["unet"] + k: v for k, v in original.items()}
    path = tmp_path / ("tiny-v2-1_768.safetensors" if name == "sd2" else "tiny.safetensors")
    save_file(checkpoint, path)

    theirs = convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    ours, unmatched = keymap.from_original(original, "unet", diffusers_config)
    assert not unmatched
    assert_identical(ours, theirs, reference.state_dict(), name)

    unet = load_unet(path)
    assert unet.config == config  # the architecture, read from the shapes (and the 768 in the name)
    assert unet.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([321]), torch.randn(1, 5, config.cross_attention_dim)
    with torch.no_grad():
        assert_close(unet(x, t, context), reference(x, t, context).sample, f"{name} output")


def test_vae_single_file_and_standalone_vae_file(tmp_path):
    diffusers_config = to_diffusers(VAE)
    reference = randomized(ReferenceVAE.from_config(diffusers_config))
    original = keymap.to_original(reference.state_dict(), "vae", diffusers_config)
    assert original["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # a 1x1 conv in the original
    checkpoint = {keymap.PREFIXES["vae"] + k: v for k, v in original.items()}

    theirs = convert_ldm_vae_checkpoint(checkpoint, diffusers_config)
    ours, unmatched = keymap.from_original(original, "vae", diffusers_config)
    assert not unmatched
    assert_identical(ours, theirs, reference.state_dict(), "vae")

    save_file(checkpoint, tmp_path / "sd.safetensors")
    save_file(original, tmp_path / "vae-ft-mse.safetensors")  # a VAE alone: no first_stage_model. prefix
    image, latent = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 8, 8)
    for file in ("sd.safetensors", "vae-ft-mse.safetensors"):
        vae = load_vae(tmp_path / file)
        assert vae.config == VAE
        with torch.no_grad():
            assert_close(vae.encode(image), reference.encode(image).latent_dist.mean, f"{file} encode")
            assert_close(vae.decode(latent), reference.decode(latent).sample, f"{file} decode")


@pytest.mark.parametrize("with_text_model_level", [True, False])
def test_sd1_clip_single_file(with_text_model_level, tmp_path):
    reference = reference_text_encoder(CLIP)
    checkpoint = original_text_encoder(reference, open_clip=False)
    if not with_text_model_level:  # early SD 1.x files, from transformers before the text_model. level existed
        checkpoint = {k.replace("transformer.text_model.", "transformer."): v for k, v in checkpoint.items()}
    theirs = convert_ldm_clip_checkpoint(checkpoint)
    ours, unmatched = keymap.from_original(original_part(checkpoint, "clip"), "clip", {})
    assert not unmatched
    expected = {f"text_model.{k}": v for k, v in reference.state_dict().items()}
    if with_text_model_level:  # diffusers' converter does not read the older layout
        assert_identical(ours, {k: v for k, v in theirs.items() if not k.endswith("position_ids")}, expected, "clip")
    else:
        assert_identical(ours, expected, expected, "clip")
    save_file(checkpoint, tmp_path / "v1.safetensors")
    encoder = load_text_encoder(tmp_path / "v1.safetensors")
    assert encoder.config == CLIP
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert_close(encoder(ids), reference(ids).last_hidden_state, "SD 1.x text encoder")


def test_sd2_open_clip_single_file(tmp_path):
    reference = reference_text_encoder(OPEN_CLIP)
    checkpoint = original_text_encoder(reference, open_clip=True)
    assert checkpoint["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (384, 128)
    theirs = convert_open_clip_checkpoint(reference, checkpoint, prefix=keymap.PREFIXES["open_clip"])
    ours, unmatched = keymap.from_original(original_part(checkpoint, "open_clip"), "open_clip",
                                           {"num_hidden_layers": OPEN_CLIP.num_hidden_layers})
    assert not unmatched
    expected = {f"text_model.{k}": v for k, v in reference.state_dict().items()}
    # diffusers keeps what CLIPTextModel then ignores (the last resblock, text_projection): compare the rest
    assert_identical(ours, {k: theirs[k] for k in expected}, expected, "open_clip")
    save_file(checkpoint, tmp_path / "v2.safetensors")
    encoder = load_text_encoder(tmp_path / "v2.safetensors")
    assert encoder.config == OPEN_CLIP  # one layer fewer than the file's resblocks
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert_close(encoder(ids), reference(ids).last_hidden_state, "SD 2.x text encoder")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_whole_single_file_loads_all_components(family, tmp_path):
    unet_config, text_config = UNETS[family], (CLIP if family == "sd1" else OPEN_CLIP)
    unet = randomized(ReferenceUNet.from_config(to_diffusers(unet_config)))
    vae = randomized(ReferenceVAE.from_config(to_diffusers(VAE)))
    text = reference_text_encoder(text_config)
    checkpoint = original_text_encoder(text, open_clip=family == "sd2")
    for component, model, config in (("unet", unet, unet_config), ("vae", vae, VAE)):
        original = keymap.to_original(model.state_dict(), component, to_diffusers(config))
        checkpoint |= {keymap.PREFIXES[component] + k: v for k, v in original.items()}
    checkpoint |= {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)}  # other networks'
    path = tmp_path / f"tiny-{family}.safetensors"
    save_file(checkpoint, path)
    if family == "sd2":  # nothing in the weights says whether an SD 2.x model predicts eps or v
        with pytest.raises(CheckpointError, match="pass prediction_type='v_prediction'"):
            load_components(path)
    parts = load_components(path, prediction_type="v_prediction" if family == "sd2" else None)
    assert parts.prediction_type == parts.unet.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert parts.tokenizer.pad_token == ("!" if family == "sd2" else "<|endoftext|>")
    ids, x, t = torch.randint(0, 1000, (1, 77)), torch.randn(1, 4, 8, 8), torch.tensor([10])
    context = torch.randn(1, 5, unet_config.cross_attention_dim)
    with torch.no_grad():
        assert_close(parts.text_encoder(ids), text(ids).last_hidden_state, "text encoder")
        assert_close(parts.unet(x, t, context), unet(x, t, context).sample, "unet")
        assert_close(parts.vae.decode(x), vae.decode(x).sample, "vae")


def original_part(checkpoint: dict, component: str) -> dict:
    prefix = keymap.PREFIXES[component]
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_full_size_sd15_unet_single_file(tmp_path):
    """The real SD 1.5 UNet shapes (3.4 GB in float32), at a small latent size: the layout and the inferred
    architecture at full scale. The reference is freed before loading, so only one copy lives in RAM."""
    config = to_diffusers(UNetConfig.sd15())
    with torch.device("meta"):
        reference = ReferenceUNet.from_config(config)
    reference = reference.to_empty(device="cpu").eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.02)
        x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
        expected = reference(x, t, context).sample
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    original = keymap.to_original(reference.state_dict(), "unet", config)
    save_file({keymap.PREFIXES["unet"] + k: v for k, v in original.items()}, path)
    del reference, original

    unet = load_unet(path)
    assert unet.config == UNetConfig.sd15() and unet.prediction_type == "epsilon"
    theirs = convert_ldm_unet_checkpoint(read_safetensors(path), config)
    ours = unet.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert_close(unet(x, t, context), expected, "SD 1.5 UNet output")
