import pytest
import torch

from minidiff.config import to_diffusers


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def _randomized(model, seed):
    """Random but not trivial weights: every parameter, norms included, gets seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion with random weights, saved by diffusers in the official folder layout.

    Returns (folder, the diffusers StableDiffusionPipeline it was saved from).
    """
    import transformers
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from minidiff.tokenizer import write_vocab_files
    from minidiff.unet import UNetConfig

    folder = tmp_path_factory.mktemp("tiny_sd")
    write_vocab_files(folder / "tokenizer")
    tokenizer = transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                                           str(folder / "tokenizer" / "merges.txt"), model_max_length=77)
    unet_config = {**to_diffusers(UNetConfig.tiny()), "sample_size": 8}
    # the modules' default initialisation draws from the global generator: seeded here, the weights are the same
    # whichever tests were selected before this fixture was built
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = _reference_pipeline(unet_config, tokenizer, AutoencoderKL, DPMSolverMultistepScheduler,
                                        StableDiffusionPipeline, UNet2DConditionModel, transformers)
    reference.save_pretrained(folder, safe_serialization=True)
    reference.set_progress_bar_config(disable=True)
    return folder, reference


def _reference_pipeline(unet_config, tokenizer, AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                        UNet2DConditionModel, transformers):
    from minidiff.clip import CLIPTextConfig
    from minidiff.vae import VAEConfig

    return StableDiffusionPipeline(
        vae=_randomized(AutoencoderKL(**to_diffusers(VAEConfig.tiny())), 1),
        text_encoder=_randomized(transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**to_diffusers(CLIPTextConfig.tiny()))), 2),
        tokenizer=tokenizer,
        unet=_randomized(UNet2DConditionModel(**unet_config), 3),
        scheduler=DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              steps_offset=1, timestep_spacing="leading"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
