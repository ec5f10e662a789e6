"""SDXL's base model and refiner as two experts on one schedule (minidiff.refiner), against diffusers' ensemble of
expert denoisers: StableDiffusionXLPipeline(denoising_end=f, output_type="latent"), then
StableDiffusionXLImg2ImgPipeline(image=those latents, denoising_start=f), on the same random weights and noise.

The refiner keeps its layout (4 stages, attention in the middle two, bigG context alone, 5 time ids with an aesthetic
score, force_zeros_for_empty_prompt off) at a few channels. Tolerance (fp32): 1e-3 of max |reference|, as the other
SDXL pipeline tests.
"""

import dataclasses

import pytest
import torch
import transformers
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)

from minidiff.config import to_diffusers
from minidiff.errors import InputError
from minidiff.pipeline import load_pipeline
from minidiff.refiner import refine
from minidiff.tokenizer import write_vocab_files
from minidiff.unet import UNetConfig
from tests.parity import test_sdxl
from tests.parity.test_sdxl import SMALL_BIGG, assert_close, randomize_

tiny_sdxl = test_sdxl.tiny_sdxl  # the base model's fixture, shared with this module

TOLERANCE = 1e-3
SMALL_REFINER = dataclasses.replace(
    UNetConfig.sdxl_refiner(), block_out_channels=(32, 64, 64, 64), num_attention_heads=(1, 2, 2, 2),
    cross_attention_dim=SMALL_BIGG.hidden_size, transformer_layers_per_block=2, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=SMALL_BIGG.projection_dim + 5 * 8, sample_size=8)
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory, tiny_sdxl):
    """The refiner with random weights (the base's VAE), saved by diffusers' StableDiffusionXLImg2ImgPipeline as the
    official refiner folder is laid out: no text_encoder/ and tokenizer/. Returns (folder, the diffusers pipeline)."""
    folder = tmp_path_factory.mktemp("tiny_sdxl_refiner")
    write_vocab_files(folder / "tokenizer_2")
    tokenizer = transformers.CLIPTokenizer(str(folder / "tokenizer_2" / "vocab.json"),
                                           str(folder / "tokenizer_2" / "merges.txt"), model_max_length=77,
                                           pad_token="!")
    base = tiny_sdxl[1]
    reference = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, tokenizer=None, tokenizer_2=tokenizer,
        text_encoder_2=randomize_(transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**to_diffusers(SMALL_BIGG))), 9),
        unet=randomize_(UNet2DConditionModel(**to_diffusers(SMALL_REFINER)), 10),
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)
    reference.save_pretrained(folder, safe_serialization=True)
    reference.set_progress_bar_config(disable=True)
    return folder, reference


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_base_then_refiner_matches_diffusers_ensemble_of_experts(tiny_sdxl, tiny_refiner, sampler):
    """5 steps cut at 0.6 (leading spacing: t = 801, 601, 401 for the base, 201 and 1 for the refiner), with CFG. The
    handed-over latent (ours x_t in VP space, diffusers' the scheduler's sample), the refined latents and the
    decoded pictures within 1e-3."""
    base_folder, base_reference = tiny_sdxl
    folder, reference = tiny_refiner
    base_reference.scheduler = SCHEDULERS[sampler].from_config(base_reference.scheduler.config)
    reference.scheduler = SCHEDULERS[sampler].from_config(reference.scheduler.config)
    base = load_pipeline(base_folder, device="cpu", dtype=torch.float32)
    refiner = load_pipeline(folder, device="cpu", dtype=torch.float32)
    assert refiner.is_refiner and refiner.text_encoder is None and not refiner.sdxl.force_zeros_for_empty_prompt
    prompts = ["a red circle in the top left", "a small blue square"]
    noise = torch.randn((2, 4, 8, 16), generator=torch.Generator().manual_seed(7))
    options = dict(steps=5, sampler=sampler, guidance_scale=5.0, height=64, width=128, progress=False)

    handed = base(prompts, latents=noise, denoising_end=0.6, output="latent", **options)
    assert handed.images == []
    ours = refiner(prompts, latents=handed.latents, denoising_start=0.6, aesthetic_score=7.0, **options).latents
    their_handed = base_reference(prompts, num_inference_steps=5, guidance_scale=5.0, height=64, width=128,
                                  latents=noise.clone(), denoising_end=0.6, output_type="latent").images
    theirs = reference(prompts, image=their_handed, num_inference_steps=5, guidance_scale=5.0, denoising_start=0.6,
                       aesthetic_score=7.0, output_type="latent").images
    sigma = float(base_reference.scheduler.sigmas[3])  # the handover: the 4th of the 5 levels
    scale = (1 + sigma**2) ** 0.5 if sampler == "euler" else 1.0  # Euler's sample is x = x0 + sigma eps
    assert_close(handed.latents * scale, their_handed, "handed-over latents", TOLERANCE)
    assert_close(ours, theirs, "refined latents", TOLERANCE)
    assert (ours - handed.latents).abs().max() > 0.1 * ours.abs().max()  # the refiner changed the latents
    with torch.no_grad():
        their_images = reference.vae.decode(theirs / reference.vae.config.scaling_factor).sample
        assert_close(refiner.decode(ours), their_images, "images", TOLERANCE)


def test_refiner_alone_and_wrong_pairs_are_named_in_one_line(tiny_sd, tiny_sdxl, tiny_refiner):
    base = load_pipeline(tiny_sdxl[0], device="cpu", dtype=torch.float32)
    refiner = load_pipeline(tiny_refiner[0], device="cpu", dtype=torch.float32)
    sd15 = load_pipeline(tiny_sd[0], device="cpu", dtype=torch.float32)
    cases = [(lambda: refiner("a cat", steps=2, height=64, width=64), "this is the SDXL refiner"),
             (lambda: refine(sd15, refiner, "a cat"), "is not an SDXL base model"),
             (lambda: refine(base, base, "a cat"), "is not the SDXL refiner"),
             (lambda: refine(refiner, refiner, "a cat"), "is not an SDXL base model"),
             (lambda: base("a cat", steps=4, denoising_end=0.01, height=64, width=64), "stops before the first"),
             (lambda: refiner("a cat", steps=4, latents=torch.zeros(1, 4, 8, 8), denoising_start=0.999,
                              height=64, width=64), "leaves none of the 4 steps")]
    for call, message in cases:
        with pytest.raises(InputError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_generate_with_refiner_writes_the_two_stage_picture(tiny_sdxl, tiny_refiner, tmp_path):
    """`minidiff generate --model BASE --refiner REFINER --refiner-start 0.5` (through refine()) writes the picture
    of the two calls: the base with denoising_end=0.5, the refiner from its latents with denoising_start=0.5."""
    from PIL import Image

    from minidiff.cli import main

    out = tmp_path / "refined.png"
    assert main(["generate", "a red circle", "--model", str(tiny_sdxl[0]), "--refiner", str(tiny_refiner[0]),
                 "--refiner-start", "0.5", "--steps", "2", "--size", "64", "--seed", "3", "--device", "cpu",
                 "--dtype", "float32", "--out", str(out)]) in (None, 0)
    base = load_pipeline(tiny_sdxl[0], device="cpu", dtype=torch.float32)
    refiner = load_pipeline(tiny_refiner[0], device="cpu", dtype=torch.float32)
    options = dict(steps=2, height=64, width=64, seed=3, progress=False)
    handed = base("a red circle", denoising_end=0.5, output="latent", **options).latents
    expected = refiner("a red circle", latents=handed, denoising_start=0.5, **options).images[0]
    assert list(Image.open(out).convert("RGB").getdata()) == list(expected.getdata())
