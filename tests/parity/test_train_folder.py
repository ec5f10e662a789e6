"""The folder `python -m minidiff.course.train` writes is a diffusers StableDiffusionPipeline folder: diffusers and
transformers load it, and compute what minidiff computes on the same weights (float32, atol 1e-5)."""

import diffusers
import torch

from minidiff.course import train
from minidiff.load import load_components


def test_diffusers_loads_the_saved_folder_and_agrees_with_minidiff(tmp_path):
    config = train.TrainConfig.quick()
    torch.manual_seed(0)
    vae, unet = train.AutoencoderKL(config.vae), train.UNet(config.unet)
    text_encoder = train.CLIPTextModel(config.text_encoder)
    with torch.no_grad():  # not the initial weights alone: norms and biases away from their 1 / 0 too
        for module in (vae, unet, text_encoder):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    vae.config.scaling_factor = 0.77
    train.save_folder(tmp_path, vae, unet, text_encoder)

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    ours = load_components(tmp_path)
    assert reference.vae.config.scaling_factor == ours.vae.scaling_factor == 0.77
    assert isinstance(reference.scheduler, diffusers.DPMSolverMultistepScheduler)
    assert reference.scheduler.config.beta_schedule == "scaled_linear"

    prompt = "top-left: violet round dot, tiny"
    ref_ids = reference.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids = ours.tokenizer([prompt])
    assert torch.equal(ids, ref_ids)

    with torch.no_grad():
        context = ours.text_encoder(ids)
        torch.testing.assert_close(context, reference.text_encoder(ids).last_hidden_state, rtol=0, atol=1e-5)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
        both = context.expand(2, -1, -1)
        torch.testing.assert_close(ours.unet(x, t, both), reference.unet(x, t, both).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.vae.decode(x), reference.vae.decode(x).sample, rtol=0, atol=1e-5)
