"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same random weights.

An inpainting UNet (9 input channels: latents, mask, masked-image latents), saved in both official layouts (a
diffusers folder and an original single file), and latent blending on the 4-channel tiny_sd model. All randomness
comes from one CPU generator on both sides, drawn in diffusers' order: the picture's posterior sample (when it is
needed), the noise, the masked picture's posterior sample. Compared: the final latents, within 1e-3 of
max |reference| (float32).
"""

import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file

from minidiff import keymap
from minidiff.clip import CLIPTextConfig
from minidiff.config import to_diffusers
from minidiff.pipeline import load_pipeline
from minidiff.tokenizer import write_vocab_files
from minidiff.unet import UNetConfig
from minidiff.vae import VAEConfig
from tests.conftest import _randomized
from tests.parity.test_pipeline import make_image

RELATIVE_TOLERANCE = 1e-3  # float32, as the text-to-image and img2img pipeline tests
# shapes that the single-file loader infers (SD 1.x: 8 heads per UNet stage, 64-channel CLIP heads, 32 norm groups)
UNET = UNetConfig(block_out_channels=(32, 64, 64, 64), num_attention_heads=(8,) * 4, cross_attention_dim=128,
                  in_channels=9, sample_size=8)
VAE = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
CLIP = CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
SCHEDULERS = {  # minidiff sampler -> the diffusers scheduler it mirrors, with its options
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
}


def make_mask():
    """White (repaint) over a 40 x 24 px block that does not sit on the latent grid, black elsewhere."""
    mask = np.zeros((64, 64), np.uint8)
    mask[12:52, 30:54] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    """A random-weight inpainting SD (9-channel UNet) as a diffusers folder and as one original single file, and
    the diffusers StableDiffusionInpaintPipeline it was saved from."""
    folder = tmp_path_factory.mktemp("tiny_inpaint")
    write_vocab_files(folder / "tokenizer")
    tokenizer = transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                                           str(folder / "tokenizer" / "merges.txt"), model_max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = _randomized(UNet2DConditionModel(**to_diffusers(UNET)), 4)
        vae = _randomized(AutoencoderKL(**to_diffusers(VAE)), 5)
        clip = {k: v for k, v in to_diffusers(CLIP).items() if k != "architectures"}
        text_encoder = _randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip)), 6)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
    reference = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
    reference.save_pretrained(folder / "diffusers", safe_serialization=True)
    reference.set_progress_bar_config(disable=True)

    checkpoint = {f"{keymap.PREFIXES['clip']}text_model.{k}": v for k, v in text_encoder.state_dict().items()}
    checkpoint[f"{keymap.PREFIXES['clip']}text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for component, model, config in (("unet", unet, UNET), ("vae", vae, VAE)):
        original = keymap.to_original(model.state_dict(), component, to_diffusers(config))
        checkpoint |= {keymap.PREFIXES[component] + k: v.contiguous() for k, v in original.items()}
    assert checkpoint["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    save_file(checkpoint, folder / "tiny-inpainting.safetensors")
    return {"diffusers": folder / "diffusers", "single_file": folder / "tiny-inpainting.safetensors"}, reference


def relative_error(ours, theirs) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def run_both(pipe, reference, sampler, strength, mask=None, **options):
    scheduler_class, scheduler_options = SCHEDULERS[sampler]
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **scheduler_options)
    prompts = ["a red circle in the top left", "a small blue square"]
    mask = make_mask() if mask is None else mask
    ours = pipe(prompts, steps=6, sampler=sampler, guidance_scale=4.0, seed=5, image=make_image(), mask=mask,
                height=64, width=64,
                strength=strength, progress=False, **options).latents
    theirs = reference(prompts, image=make_image(), mask_image=mask, strength=strength, num_inference_steps=6,
                       guidance_scale=4.0, height=64, width=64, generator=torch.Generator().manual_seed(5),
                       output_type="latent").images
    return ours, theirs


@pytest.mark.parametrize(("layout", "sampler", "strength"), [
    ("diffusers", "ddim", 1.0), ("diffusers", "euler", 1.0), ("diffusers", "dpmpp_2m", 0.7),
    ("single_file", "ddim", 1.0), ("single_file", "dpmpp_2m", 0.7)])
def test_inpainting_unet_matches_the_reference_pipeline(tiny_inpainting, layout, sampler, strength):
    """The 9-channel UNet, with classifier-free guidance, from pure noise (strength 1) and from the picture noised
    part of the way (0.7: the last 4 of 6 steps); both official layouts load to the same model (the single file's
    9 input channels read from the shape of model.diffusion_model.input_blocks.0.0.weight)."""
    paths, reference = tiny_inpainting
    pipe = load_pipeline(paths[layout], device="cpu", dtype=torch.float32)
    assert pipe.unet.config.in_channels == 9 and pipe.latent_channels() == 4
    ours, theirs = run_both(pipe, reference, sampler, strength)
    error = relative_error(ours, theirs)
    assert error <= RELATIVE_TOLERANCE, f"{layout} {sampler} strength {strength}: latents differ by {error:.2e}"


def test_the_mask_changes_the_inpainting_unet_result(tiny_inpainting):
    """The test above could fail: another mask (the same picture, prompt and seed) moves the latents far more
    than the tolerance, on both sides."""
    paths, reference = tiny_inpainting
    pipe = load_pipeline(paths["diffusers"], device="cpu", dtype=torch.float32)
    ours, theirs = run_both(pipe, reference, "ddim", 1.0)
    other_mask = Image.fromarray(255 - np.asarray(make_mask()))
    ours_other, theirs_other = run_both(pipe, reference, "ddim", 1.0, mask=other_mask)
    assert relative_error(ours_other, theirs_other) <= RELATIVE_TOLERANCE
    assert relative_error(ours_other, theirs) > 100 * RELATIVE_TOLERANCE
    assert relative_error(ours, theirs_other) > 100 * RELATIVE_TOLERANCE


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("euler", 1.0), ("dpmpp_2m", 0.7)])
def test_latent_blending_matches_the_reference_pipeline(tiny_sd, sampler, strength):
    """A 4-channel model (tiny_sd): StableDiffusionInpaintPipeline blends the picture, noised to the next step's
    level, back outside the mask after every step, and the clean picture after the last; minidiff blends the input
    of each model call but the first (see minidiff.inpaint). Same final latents; outside the mask they are the
    picture's own latents exactly, inside they differ from plain img2img."""
    folder, text_to_image = tiny_sd
    reference = StableDiffusionInpaintPipeline(**text_to_image.components, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    ours, theirs = run_both(pipe, reference, sampler, strength)
    error = relative_error(ours, theirs)
    assert error <= RELATIVE_TOLERANCE, f"{sampler} strength {strength}: latents differ by {error:.2e}"

    kept = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(make_mask()) < 128).float()[None, None],
                                           size=(8, 8)).bool().expand_as(ours)
    generator = torch.Generator().manual_seed(5)
    picture = pipe.encode_image(make_image(), 64, 64, generator).expand_as(ours)
    assert torch.equal(ours[kept], picture[kept])
    assert relative_error(ours[~kept], picture[~kept]) > 0.1
