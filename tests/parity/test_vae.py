"""Parity: minidiff's AutoencoderKL and TAESD against diffusers' AutoencoderKL and AutoencoderTiny on the same
random weights, in float32. Pass criterion everywhere: max |ours - reference| <= 1e-4 * max |reference|."""

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceKL
from diffusers import AutoencoderTiny as ReferenceTiny

from minidiff.config import from_diffusers, to_diffusers
from minidiff.taesd import TAESD, TAESDConfig
from minidiff.vae import AutoencoderKL, VAEConfig

RELATIVE_TOLERANCE = 1e-4  # float32


def assert_close_to_reference(ours, reference, what):
    assert ours.shape == reference.shape, what
    error, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max abs diff {error:.3g} > 1e-4 * {scale:.3g}"


def perturb_vectors(model):
    """Random norm weights and biases (the default init sets them to 1 and 0, which would hide mix-ups)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))


def load_into_ours(reference, ours_class, config):
    """Build ours on the meta device and load the reference's weights strictly, with assign=True."""
    with torch.device("meta"):
        ours = ours_class(config)
    reference_state = reference.state_dict()
    ours_keys = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert ours_keys == {key: tuple(value.shape) for key, value in reference_state.items()}
    ours.load_state_dict(reference_state, strict=True, assign=True)
    return ours.eval()


def diffusers_kwargs(config_dict):
    return {key: value for key, value in config_dict.items() if not key.startswith("_")}


@pytest.mark.parametrize(
    "config, batch",
    [(VAEConfig.tiny(), 2), pytest.param(VAEConfig.sd(), 1, marks=pytest.mark.slow)],
    ids=["tiny", "sd-full"],
)
def test_autoencoder_kl_matches_diffusers(config, batch):
    reference = ReferenceKL(**diffusers_kwargs(to_diffusers(config))).eval()
    perturb_vectors(reference)
    ours = load_into_ours(reference, AutoencoderKL, config)
    assert ours.scaling_factor == reference.config.scaling_factor
    image = torch.rand(batch, 3, 64, 64) * 2 - 1  # -> 8x8 latents
    latent = torch.randn(batch, 4, 8, 8) / config.scaling_factor
    with torch.no_grad():
        posterior = reference.encode(image).latent_dist
        assert_close_to_reference(ours.encode(image), posterior.mean, "encode mean")
        reference_sample = posterior.sample(generator=torch.Generator().manual_seed(7))
        ours_sample = ours.encode(image, generator=torch.Generator().manual_seed(7), sample=True)
        assert_close_to_reference(ours_sample, reference_sample, "encode sample")
        assert (ours_sample - ours.encode(image)).abs().max() > 1e-3  # the sample did add noise
        assert_close_to_reference(ours.decode(latent), reference.decode(latent).sample, "decode")


def test_taesd_matches_diffusers_autoencoder_tiny():
    reference = ReferenceTiny().eval()  # the default config is the SD one (taesd)
    perturb_vectors(reference)
    ours = load_into_ours(reference, TAESD, from_diffusers(TAESDConfig, dict(reference.config)))
    assert ours.scaling_factor == reference.config.scaling_factor == 1.0
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    latent = torch.randn(2, 4, 8, 8) * 2  # wide enough that the tanh clamp matters
    with torch.no_grad():
        assert_close_to_reference(ours.encode(image), reference.encode(image).latents, "encode")
        assert_close_to_reference(ours.decode(latent), reference.decode(latent).sample, "decode")


def test_vae_config_round_trips_through_a_diffusers_config():
    reference = ReferenceKL(**diffusers_kwargs(to_diffusers(VAEConfig.tiny())))
    assert from_diffusers(VAEConfig, dict(reference.config)) == VAEConfig.tiny()
