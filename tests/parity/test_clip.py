"""Parity: minidiff.clip.CLIPTextModel against transformers.CLIPTextModel on the same random weights.

fp32 on CPU. Tolerance: max |ours - reference| <= 1e-4 * max |reference|, for last_hidden_state and for
"clip skip" (skip_last_layers=k against hidden_states[-1 - k] through the final layer norm).
The reference's weights are seeded, its LayerNorm scales and all biases (which transformers initialises
to 1 and 0) perturbed, then loaded into ours strictly with assign=True on a `meta`-built model.
"""

import pytest
import torch
import transformers

from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.config import from_diffusers, to_diffusers
from minidiff.tokenizer import CLIPTokenizer

RELATIVE_TOLERANCE = 1e-4  # fp32


def checkpoint_keys(state: dict) -> dict:
    """The keys of published text_encoder files: transformers >= 5 drops "text_model." in memory."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}


def reference_and_ours(config: CLIPTextConfig):
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**to_diffusers(config))).eval()
    with torch.no_grad():  # transformers starts norms at (1, 0) and biases at 0: make them count too
        for parameter in reference.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    state = checkpoint_keys(reference.state_dict())
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    assert set(ours.state_dict()) == set(state)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    ours.load_state_dict(state, strict=True, assign=True)
    return reference, ours.eval()


def input_ids(pad_token: str, full_size: bool) -> torch.Tensor:
    """Tokenized prompts (short, truncated, empty) and random ids; one prompt for the full-size models."""
    prompts = ["a photo of an astronaut riding a horse on mars", "a castle, " * 30, ""]
    ids = CLIPTokenizer.default(pad_token=pad_token)(prompts)
    return ids[:1] if full_size else torch.cat([ids, torch.randint(0, 49406, (1, 77))])


def assert_within_tolerance(ours: torch.Tensor, reference: torch.Tensor, what: str):
    error, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max abs error {error:.3g}, max |reference| {scale:.3g}"


def check(config: CLIPTextConfig, pad_token: str, skips=(1,), full_size=False):
    reference, ours = reference_and_ours(config)
    ids = input_ids(pad_token, full_size)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        assert_within_tolerance(ours(ids), expected.last_hidden_state, "last_hidden_state")
        for skip in skips:
            penultimate = reference.final_layer_norm(expected.hidden_states[-1 - skip])
            assert_within_tolerance(ours(ids, skip_last_layers=skip), penultimate, f"skip_last_layers={skip}")
        if not full_size:  # fewer than 77 positions
            assert_within_tolerance(ours(ids[:, :20]), reference(ids[:, :20]).last_hidden_state, "20 tokens")


def test_tiny():
    check(CLIPTextConfig.tiny(), "<|endoftext|>", skips=(1, 2))


def test_tiny_gelu():
    check(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        ),
        "!",
    )


@pytest.mark.slow
def test_sd15_full_size():
    check(CLIPTextConfig.sd15(), "<|endoftext|>", full_size=True)


@pytest.mark.slow
def test_sd21_full_size():
    check(CLIPTextConfig.sd21(), "!", full_size=True)


def test_config_round_trip_through_transformers():
    for config in (CLIPTextConfig.sd15(), CLIPTextConfig.sd21(), CLIPTextConfig.tiny()):
        reference_config = transformers.CLIPTextConfig(**to_diffusers(config))
        assert from_diffusers(CLIPTextConfig, reference_config.to_dict()) == config


@pytest.mark.parametrize("preset, parameters", [("sd15", 123_060_480), ("sd21", 340_387_840)])
def test_parameter_count_matches_reference(preset, parameters):
    config = getattr(CLIPTextConfig, preset)()
    with torch.device("meta"):
        ours = CLIPTextModel(config)
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**to_diffusers(config)))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == parameters
