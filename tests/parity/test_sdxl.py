"""SDXL against diffusers / transformers on the same random weights: the UNet, both text encoders, the whole
pipeline (StableDiffusionXLPipeline) and the single-file key conversion.

The configs keep SDXL's structure (first stage without attention, 1-2-3 transformer blocks per stage, linear
projections, "text_time" conditioning, a CLIP-L-shaped and a bigG-shaped text encoder whose states are concatenated)
at a few channels; the full 2.6 B UNet is compared on the meta device (keys, shapes, parameter count).
Tolerances (fp32): networks max |ours - reference| <= 1e-4 * max |reference|; the pipeline 1e-3.
"""

import dataclasses

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from minidiff import keymap
from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.config import from_diffusers, to_diffusers
from minidiff.errors import CheckpointError, InputError
from minidiff.load import load_components
from minidiff.pipeline import load_pipeline
from minidiff.tokenizer import CLIPTokenizer, write_vocab_files
from minidiff.unet import UNet, UNetConfig, count_parameters
from minidiff.vae import VAEConfig

RELATIVE_TOLERANCE = 1e-4  # fp32, networks

# the SDXL layout at a few channels: pooled width 32 (bigG-shaped) + 6 time ids x 8
SMALL_UNET = dataclasses.replace(
    UNetConfig.sdxl(), block_out_channels=(32, 64, 64), num_attention_heads=(1, 2, 2), cross_attention_dim=48,
    transformer_layers_per_block=(1, 2, 3), addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    sample_size=8)
SMALL_CLIP_L = dataclasses.replace(CLIPTextConfig.tiny(), hidden_size=16, intermediate_size=32)  # quick_gelu
SMALL_BIGG = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                            hidden_act="gelu", projection_dim=32)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the options that differ from diffusers' defaults
SDXL_BASE_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    "upcast_attention": None,
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights that keep activations O(1): variance-1/fan_in matrices, perturbed norms and biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                bound = (3 / param[0].numel()) ** 0.5
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                param.uniform_(0.6, 1.4, generator=generator)
            else:
                param.uniform_(-0.2, 0.2, generator=generator)
    return model.eval()


def assert_close(ours, reference, what, tolerance=RELATIVE_TOLERANCE):
    error, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    assert scale > 0.05, f"{what}: reference output is trivially small ({scale})"
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
    assert error <= tolerance * scale, f"{what}: max abs error {error:.3g} vs max |reference| {scale:.3g}"


# --- the UNet -------------------------------------------------------------------------------------------------


def test_sdxl_preset_is_the_official_config_and_has_diffusers_parameters():
    assert from_diffusers(UNetConfig, SDXL_BASE_UNET_JSON) == UNetConfig.sdxl()
    for config in (UNetConfig.sdxl(), UNetConfig.sdxl_refiner()):
        with torch.device("meta"):
            reference, ours = UNet2DConditionModel.from_config(to_diffusers(config)), UNet(config)
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in reference.state_dict().items()}
        assert count_parameters(ours) == count_parameters(reference)
        if config == UNetConfig.sdxl():
            assert count_parameters(ours) == 2_567_463_684


def small_unets():
    with torch.device("meta"):
        reference, ours = UNet2DConditionModel.from_config(to_diffusers(SMALL_UNET)), UNet(SMALL_UNET)
    reference = randomize_(reference.to_empty(device="cpu"), 0)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, ours.eval()


def test_unet_matches_diffusers_with_text_time_conditioning():
    reference, ours = small_unets()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 24, generator=generator)
    context = torch.randn(2, 77, 48, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator),
             "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 64, 32, 1024, 768]])}
    with torch.no_grad():
        expected = reference(x, torch.tensor([999, 10]), context, added_cond_kwargs=added).sample
        assert_close(ours(x, torch.tensor([999, 10]), context, added_cond_kwargs=added), expected, "UNet")
        other = dict(added, time_ids=added["time_ids"].flip(0))  # the size/crop ids change the prediction
        assert (ours(x, torch.tensor([999, 10]), context, added_cond_kwargs=other) - expected).abs().max() > 1e-3


# --- the text encoders ----------------------------------------------------------------------------------------


def text_encoders(config: CLIPTextConfig, seed: int):
    """transformers' CLIPTextModel(WithProjection) with random weights, and ours loaded from its state dict."""
    kind = transformers.CLIPTextModelWithProjection if config.projection_dim else transformers.CLIPTextModel
    # eos_token_id=2, as in SDXL's text_encoder*/config.json: transformers then pools at the largest id (argmax)
    reference = kind(transformers.CLIPTextConfig(**to_diffusers(config), eos_token_id=2))
    randomize_(reference, seed)
    state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
             for k, v in reference.state_dict().items()}
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    ours.load_state_dict(state, strict=True, assign=True)
    return reference, ours.eval()


@pytest.mark.parametrize(("config", "pad_token"), [(SMALL_CLIP_L, "<|endoftext|>"), (SMALL_BIGG, "!")],
                         ids=["clip-l", "bigg"])
def test_text_encoders_match_transformers(config, pad_token):
    """hidden_states[-2] (SDXL's context) and the pooled output (text_embeds for bigG) of both encoders."""
    assert from_diffusers(CLIPTextConfig, to_diffusers(config)) == config
    reference, ours = text_encoders(config, seed=3)
    ids = CLIPTokenizer.default(pad_token=pad_token)(["a photo of an astronaut riding a horse", "a castle, " * 30, ""])
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        penultimate, pooled = ours.penultimate_and_pooled(ids)
        assert_close(penultimate, expected.hidden_states[-2], "hidden_states[-2]")
        reference_pooled = expected.text_embeds if config.projection_dim else expected.pooler_output
        assert_close(pooled, reference_pooled, "pooled")
        assert_close(ours(ids), expected.last_hidden_state, "last_hidden_state")


# --- the pipeline ---------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A small SDXL (the layout at a few channels) with random weights, saved by diffusers' StableDiffusionXLPipeline
    in the official folder layout. Returns (folder, the diffusers pipeline)."""

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    tokenizers = []
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_vocab_files(folder / name)
        tokenizers.append(transformers.CLIPTokenizer(str(folder / name / "vocab.json"),
                                                     str(folder / name / "merges.txt"), model_max_length=77,
                                                     pad_token=pad))
    reference = StableDiffusionXLPipeline(
        vae=randomize_(AutoencoderKL(**{**to_diffusers(VAEConfig.tiny()), "scaling_factor": 0.13025}), 1),
        text_encoder=randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**to_diffusers(SMALL_CLIP_L))),
                                2),
        text_encoder_2=randomize_(transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**to_diffusers(SMALL_BIGG))), 3),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=randomize_(UNet2DConditionModel(**to_diffusers(SMALL_UNET)), 4),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )
    reference.save_pretrained(folder, safe_serialization=True)
    reference.set_progress_bar_config(disable=True)
    return folder, reference


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_pipeline_matches_stable_diffusion_xl_pipeline(tiny_sdxl, negative):
    """fp32, same weights, noise, scheduler (Euler) and prompts, with CFG: no negative prompt (zeros, as the base
    model's force_zeros_for_empty_prompt says) and a negative prompt. Latents and decoded images within 1e-3."""
    folder, reference = tiny_sdxl
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    assert pipe.sdxl is not None and pipe.vae.scaling_factor == 0.13025
    prompts = ["a red circle in the top left", "a small blue square"]
    negatives = None if negative is None else [negative] * 2
    noise = torch.randn((2, 4, 8, 16), generator=torch.Generator().manual_seed(7))
    ours = pipe(prompts, negative_prompt=negatives, steps=4, sampler="euler", guidance_scale=5.0, height=64,
                width=128, latents=noise, progress=False, original_size=(96, 160), crop_top_left=(8, 16)).latents
    theirs = reference(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=5.0, height=64,
                       width=128, latents=noise.clone(), output_type="latent", original_size=(96, 160),
                       crops_coords_top_left=(8, 16)).images
    assert_close(ours, theirs, "latents", 1e-3)
    with torch.no_grad():
        their_images = reference.vae.decode(theirs / reference.vae.config.scaling_factor).sample
        assert_close(pipe.decode(ours), their_images, "images", 1e-3)


# --- the single file (sd_xl_base_1.0.safetensors) -----------------------------------------------------------------

# shaped as the loader reads an SDXL file: 64-channel heads; a non-square text_projection (96), so that a
# missing transposition shows
FILE_UNET = dataclasses.replace(SMALL_UNET, block_out_channels=(64, 128, 128), cross_attention_dim=256,
                                addition_time_embed_dim=256, projection_class_embeddings_input_dim=96 + 6 * 256,
                                sample_size=128)  # the PE width of a time id is not in the weights: SDXL's 256
FILE_CLIP_L = CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=2)
FILE_BIGG = dataclasses.replace(FILE_CLIP_L, num_hidden_layers=3, hidden_act="gelu", projection_dim=96)
FILE_VAE = dataclasses.replace(VAEConfig(block_out_channels=(32, 64), layers_per_block=1), scaling_factor=0.13025)


def sdxl_file_parts():
    """Random diffusers-layout models and the original sd_xl_base_1.0-layout checkpoint made of them."""
    unet = randomize_(UNet2DConditionModel.from_config(to_diffusers(FILE_UNET)), 5)
    vae = randomize_(AutoencoderKL.from_config(to_diffusers(FILE_VAE)), 6)
    (_, clip_l), (reference_bigg, bigg) = text_encoders(FILE_CLIP_L, 7), text_encoders(FILE_BIGG, 8)  # ours: file keys
    checkpoint = {}
    for component, model, config in (("unet", unet, FILE_UNET), ("vae", vae, FILE_VAE)):
        original = keymap.to_original(model.state_dict(), component, to_diffusers(config))
        checkpoint |= {keymap.PREFIXES[component] + k: v for k, v in original.items()}
    checkpoint |= {keymap.PREFIXES["clip_sdxl"] + k: v for k, v in clip_l.state_dict().items()}
    original = keymap.to_original(bigg.state_dict(), "open_clip", to_diffusers(FILE_BIGG))
    assert original["text_projection"].shape == (128, 96)  # OpenCLIP's x @ P
    checkpoint |= {keymap.PREFIXES["open_clip_sdxl"] + k: v for k, v in original.items()}
    checkpoint["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    return {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": bigg,
            "reference_bigg": reference_bigg}, checkpoint


def test_single_file_keys_equal_diffusers_converter(tmp_path):
    """Each network of an SDXL file converted by minidiff and by diffusers' single_file_utils: the same keys and
    tensors, equal to the models the file was written from; then the whole file loads as an SDXLPipeline."""
    models, checkpoint = sdxl_file_parts()
    theirs = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, to_diffusers(FILE_UNET)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, to_diffusers(FILE_VAE)),
        "text_encoder": convert_ldm_clip_checkpoint(checkpoint),
        "text_encoder_2": convert_open_clip_checkpoint(models["reference_bigg"], checkpoint,
                                                       prefix=keymap.PREFIXES["open_clip_sdxl"]),
    }
    sources = {"unet": ("unet", "unet", FILE_UNET), "vae": ("vae", "vae", FILE_VAE),
               "text_encoder": ("clip_sdxl", "clip", FILE_CLIP_L),
               "text_encoder_2": ("open_clip_sdxl", "open_clip", FILE_BIGG)}
    for name, (prefix, component, config) in sources.items():
        part = {k[len(keymap.PREFIXES[prefix]):]: v for k, v in checkpoint.items()
                if k.startswith(keymap.PREFIXES[prefix])}
        ours, unmatched = keymap.from_original(part, component, to_diffusers(config))
        assert set(unmatched) <= {"logit_scale"}, unmatched
        reference = models[name].state_dict()
        assert set(ours) == set(theirs[name]) == set(reference), f"{name}: {set(ours) ^ set(theirs[name])}"
        for key, value in ours.items():
            assert torch.equal(value, theirs[name][key]) and torch.equal(value, reference[key]), f"{name}: {key}"

    path = tmp_path / "sd_xl_base_tiny.safetensors"
    save_file(checkpoint, path)
    parts = load_components(path)
    assert parts.unet.config == FILE_UNET and parts.vae.config == FILE_VAE
    assert parts.text_encoder.config == FILE_CLIP_L and parts.text_encoder_2.config == FILE_BIGG
    assert parts.tokenizer.pad_token == "<|endoftext|>" and parts.tokenizer_2.pad_token == "!"
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert_close(parts.text_encoder_2.penultimate_and_pooled(ids)[1],
                     models["reference_bigg"](ids).text_embeds, "text_embeds from the file")


def test_incomplete_sdxl_file_is_named_in_one_line(tmp_path):
    _, checkpoint = sdxl_file_parts()
    bigg = keymap.PREFIXES["open_clip_sdxl"]
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith(bigg)}
    save_file(checkpoint, tmp_path / "sd_xl.safetensors")
    with pytest.raises(CheckpointError, match="has no second text encoder") as error:
        load_components(tmp_path / "sd_xl.safetensors")
    assert "\n" not in str(error.value)


def test_refiner_file_loads_bigg_alone_and_refuses_to_start_from_noise(tmp_path):
    """The refiner's file layout (bigG alone, as conditioner.embedders.0): text_encoder_2 is bigG, there is no
    text_encoder, no zeros for an empty negative prompt; called as a base model it says what it is, in one line."""
    models, checkpoint = sdxl_file_parts()
    bigg = keymap.PREFIXES["open_clip_sdxl"]
    checkpoint = {k.replace(bigg, keymap.PREFIXES["open_clip_sdxl_refiner"]): v for k, v in checkpoint.items()
                  if not k.startswith(keymap.PREFIXES["clip_sdxl"])}
    save_file(checkpoint, tmp_path / "sd_xl_refiner.safetensors")
    parts = load_components(tmp_path / "sd_xl_refiner.safetensors")
    assert parts.text_encoder is None and parts.tokenizer is None and not parts.force_zeros_for_empty_prompt
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert_close(parts.text_encoder_2.penultimate_and_pooled(ids)[1], models["reference_bigg"](ids).text_embeds,
                     "text_embeds from the refiner's file")
    refiner = load_pipeline(tmp_path / "sd_xl_refiner.safetensors", device="cpu")
    with pytest.raises(InputError, match="this is the SDXL refiner") as error:
        refiner("a red circle", steps=1, height=64, width=64)
    assert "\n" not in str(error.value)


def test_samplers_img2img_trace_and_early_exit_run_on_sdxl(tiny_sdxl):
    """What Pipeline does for SD 1.5 works for SDXL: every sampler, img2img, the trace and early exit."""
    from minidiff.samplers import SAMPLERS

    pipe = load_pipeline(tiny_sdxl[0], device="cpu", dtype=torch.float32)
    run = lambda **options: pipe("a red circle", height=32, width=32, seed=0, progress=False, **options)
    for sampler in sorted(SAMPLERS):
        assert torch.isfinite(run(steps=2, sampler=sampler, guidance_scale=1.0).latents).all(), sampler
    traced = run(steps=2, trace=True)
    assert len(traced.trace) == 2 and traced.trace[-1].pred_x0[0].size == (32, 32)
    assert not torch.equal(run(steps=4, early_exit=0.5).latents, run(steps=4).latents)
    image = traced.images[0]
    assert torch.equal(run(image=image, strength=0.0).latents, pipe.encode_image(image, 32, 32,
                                                                                 torch.Generator().manual_seed(0)))
    assert run(image=image, strength=0.5, steps=2).images[0].size == (32, 32)


def test_sd15_lora_on_sdxl_and_sdxl_lora_on_sd15_are_named_in_one_line(tiny_sd, tiny_sdxl, tmp_path):
    """A LoRA made for the other family is refused before any layer changes, in one line that says so."""
    from tests.parity.test_lora import random_lora, save_kohya

    sd15 = load_pipeline(tiny_sd[0], device="cpu", dtype=torch.float32)
    sdxl = load_pipeline(tiny_sdxl[0], device="cpu", dtype=torch.float32)
    save_kohya(random_lora(sd15, 5), tmp_path / "sd15_lora.safetensors")
    before = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match="made for another base model") as error:
        sdxl.load_lora(tmp_path / "sd15_lora.safetensors")
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in sdxl.unet.state_dict().items()), "the refused LoRA changed a layer"
    second_encoder = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
                      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2)}
    save_file(second_encoder, tmp_path / "sdxl_lora.safetensors")
    with pytest.raises(CheckpointError, match="text_encoder_2: SDXL") as error:
        sd15.load_lora(tmp_path / "sdxl_lora.safetensors")
    assert "\n" not in str(error.value)
