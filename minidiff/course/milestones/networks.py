"""Milestones of the networks and their inputs: UNet, VAE (and the latent scaling), tokenizer, text encoder, loading.

A network milestone takes a class (or any function of a config) that builds the student's module with the
official key names; the reference's weights are loaded into it with load_state_dict, and its output is compared
with the reference's, a tiny seeded network (UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny()).
See milestones.py for the machinery and milestones_formulas.py for the smaller pieces.
"""

import functools
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from minidiff.config import to_diffusers
from minidiff.course.milestones.core import (
    Mismatch,
    Tolerance,
    call_candidate,
    compare,
    diagnose,
    fixed_randn,
    milestone,
    randomized,
    signature,
)


@functools.cache
def reference_network(kind: str):
    """The tiny seeded reference network of each kind: "unet", "vae" or "clip"."""
    from minidiff.clip import CLIPTextConfig, CLIPTextModel
    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig

    build = {"unet": lambda: UNet(UNetConfig.tiny()), "vae": lambda: AutoencoderKL(VAEConfig.tiny()),
             "clip": lambda: CLIPTextModel(CLIPTextConfig.tiny())}[kind]
    with torch.random.fork_rng():
        torch.manual_seed(20)
        return randomized(build(), 21)


def build_like(candidate, reference: torch.nn.Module, call: str) -> torch.nn.Module:
    """candidate(config) with the reference's weights, loaded strictly; Mismatch names the keys that differ."""
    model = call_candidate(candidate, call, replace(reference.config))
    if not isinstance(model, torch.nn.Module):
        raise Mismatch(f"yours returned a {type(model).__name__}, expected an nn.Module; the milestone calls {call}")
    try:
        missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    except RuntimeError as error:  # a parameter of another shape
        sizes = [line.strip() for line in str(error).splitlines()[1:4]]
        raise Mismatch("your model's parameters do not have the reference's shapes: " + "; ".join(sizes)) from None
    if missing or unexpected:  # missing: keys of yours the reference lacks; unexpected: official keys you lack
        raise Mismatch(f"your model's state_dict keys are not the official ones: it lacks {len(unexpected)} (e.g. "
                       f"{', '.join(unexpected[:3]) or '-'}) and has {len(missing)} others (e.g. "
                       f"{', '.join(missing[:3]) or '-'}); name the attributes as in the reference module")
    return model.eval()


def unet_inputs():
    """x (2, 4, 8, 8), t = [999, 10], context (2, 7, 32): the tiny UNet's fixed inputs."""
    return fixed_randn(2, 4, 8, 8, seed=22), torch.tensor([999.0, 10.0]), fixed_randn(2, 7, 32, seed=23)


def unet_mistakes(reference, x, t, context):
    from minidiff.unet import UNet

    def sin_first():
        flipped = UNet(replace(reference.config, flip_sin_to_cos=False))
        flipped.load_state_dict(reference.state_dict())
        return flipped.eval()(x, t, context)

    return [("your UNet equals one whose timestep embedding is cat([sin, cos]): SD's puts the cosines first "
             "(flip_sin_to_cos=True)", sin_first)]


@milestone("UNet (Rombach et al. 2022) in the diffusers layout")
def check_unet(candidate=None):
    """UNet(config: UNetConfig) -> nn.Module with diffusers keys, called as unet(x, t, context) -> (B, 4, H, W)

    Built from UNetConfig.tiny(), given the reference's weights with load_state_dict, then run on x (2, 4, 8, 8),
    t = [999, 10] and context (2, 7, 32).
    """
    from minidiff.unet import UNet

    reference, call = reference_network("unet"), signature(check_unet)
    model = build_like(candidate or UNet, reference, call)
    x, t, context = unet_inputs()
    tol = Tolerance(1e-4, 1e-4)
    with torch.no_grad():
        yours = call_candidate(model, call, x.clone(), t.clone(), context.clone())
        error = compare(yours, reference(x, t, context), tol, "output", unet_mistakes(reference, x, t, context))
    return f"tiny config, largest |diff| {error:.1e} <= {tol.atol:g} (fp32)"


@milestone("VAE decoder (AutoencoderKL) in the diffusers layout")
def check_vae(candidate=None):
    """AutoencoderKL(config: VAEConfig) -> nn.Module with diffusers keys and .decode(z) -> (B, 3, 8h, 8w) in [-1, 1]

    Built from VAEConfig.tiny(), given the reference's weights, and asked to decode an unscaled z (1, 4, 4, 4).
    """
    from minidiff.vae import AutoencoderKL

    reference, call = reference_network("vae"), signature(check_vae)
    model = build_like(candidate or AutoencoderKL, reference, call)
    z, tol = fixed_randn(1, 4, 4, 4, seed=24), Tolerance(1e-4, 1e-4)
    mistakes = [("post_quant_conv (a 1x1 conv) comes before the decoder: decoder(post_quant_conv(z))",
                 lambda: reference.decoder(z))]
    with torch.no_grad():
        yours = call_candidate(getattr(model, "decode", model), call, z.clone())
        error = compare(yours, reference.decode(z), tol, "decode", mistakes)
    return f"tiny config, largest |diff| {error:.1e} <= {tol.atol:g} (fp32)"


SD_SCALING_FACTOR = 0.18215  # VAEConfig.sd().scaling_factor: 1 / std(z) over SD's training images


def scale_latents(latents):
    """The VAE encoder's z -> the latents the UNet is trained on: z * 0.18215 (Rombach et al. 2022, sec. 4.3.2)."""
    return latents * SD_SCALING_FACTOR


@milestone("VAE: an image's latents -> the UNet's latents (the scaling factor)", lesson=7)
def check_scale_latents(candidate=None):
    """scale_latents(latents) -> latents * 0.18215: the SD VAE encoder's z (B, 4, h, w), unit variance for the UNet"""
    from minidiff.vae import VAEConfig

    library = VAEConfig.sd().scaling_factor
    if library != SD_SCALING_FACTOR:
        raise Mismatch(f"VAEConfig.sd().scaling_factor is {library}, not SD's {SD_SCALING_FACTOR}")
    z, tol = fixed_randn(2, 4, 8, 8, seed=26) * 5, Tolerance(1e-6, 1e-6)
    mistakes = [
        ("latents not scaled: multiply the encoder's z by the VAE's scaling factor, 0.18215 for SD 1.x/2.x", lambda: z),
        ("divided by the scaling factor: encoding multiplies by 0.18215, decoding divides",
         lambda: z / SD_SCALING_FACTOR),
    ]
    yours = call_candidate(candidate or scale_latents, signature(check_scale_latents), z.clone())
    compare(yours, scale_latents(z), tol, "latents", mistakes)
    return f"within {tol.atol:g} (fp32)"


def decode_latents(latents, vae):
    """The sampler's latents -> images in [0, 1]: undo the latent scaling (Rombach et al. 2022, sec. 4.3.2), decode."""
    return ((vae.decode(latents / vae.scaling_factor) + 1) / 2).clamp(0, 1)


def decode_latents_mistakes(latents, vae):
    return [
        (f"latents not scaled: the UNet's latents are z times the VAE's scaling factor ({vae.scaling_factor} for "
         "SD 1.x/2.x); decode latents / vae.scaling_factor", lambda: decode_latents(latents * vae.scaling_factor, vae)),
        ("the latents were multiplied by the scaling factor; divide by it: vae.decode(latents / scaling_factor)",
         lambda: decode_latents(latents * vae.scaling_factor**2, vae)),
        ("the image is still in [-1, 1]: map it to [0, 1] with (image + 1) / 2, then clamp",
         lambda: vae.decode(latents / vae.scaling_factor)),
    ]


@milestone("VAE: the sampler's latents -> an image (the scaling factor)", lesson=7)
def check_decode_latents(candidate=None):
    """decode_latents(latents, vae) -> images (B, 3, H, W) in [0, 1]; latents are the UNet's, z * vae.scaling_factor"""
    vae, latents, tol = reference_network("vae"), fixed_randn(1, 4, 4, 4, seed=25), Tolerance(1e-4, 1e-4)
    with torch.no_grad():
        yours = call_candidate(candidate or decode_latents, signature(check_decode_latents), latents.clone(), vae)
        error = compare(yours, decode_latents(latents, vae), tol, "image", decode_latents_mistakes(latents, vae))
    return f"largest |diff| {error:.1e} <= {tol.atol:g} (fp32)"


# --- text ------------------------------------------------------------------------------------------------

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Red CIRCLE, top-left!! (oil painting), 4k",
    "l'été à Paris: 3 crêpes & 2 cafés",
    "  spaces\tand\nnewlines   ",
    "a very " * 45 + "long prompt",  # more than 75 tokens: truncated
]


@functools.cache
def _tokenizer():
    from minidiff.tokenizer import CLIPTokenizer

    return CLIPTokenizer.sd15()


def tokenize(text: str) -> torch.Tensor:
    """SD 1.x's 77 ids: <|startoftext|>, the byte-level BPE tokens (Radford et al. 2021), <|endoftext|>, padding."""
    return _tokenizer()(text)[0]


def tokenizer_mistakes(text: str, length: int = 77):
    tokenizer = _tokenizer()
    start, end, ids = tokenizer.start_id, tokenizer.end_id, tokenizer.encode(text)
    pad = lambda row, value=end: row + [value] * (length - len(row))  # noqa: E731
    return [
        ("SD's ids begin with <|startoftext|> (49406) and close the text with <|endoftext|> (49407)",
         lambda: pad(ids[:length])),
        ("SD 1.x pads with <|endoftext|> (49407) up to 77 ids, not with 0 (which is the token '!')",
         lambda: pad([start, *ids[: length - 2], end], 0)),
        ("truncate: 77 ids in all, so at most 75 text tokens between <|startoftext|> and <|endoftext|>",
         lambda: pad([start, *ids, end])),
        ("pad to 77 ids with <|endoftext|> (49407): the text encoder always reads 77 positions",
         lambda: [start, *ids[: length - 2], end]),
    ]


@milestone("tokenizer: CLIP byte-level BPE, SD 1.x's 77 ids", lesson=8, function="tokenize")
def check_tokenizer(candidate=None):
    """tokenize(text) -> 77 int ids (list or tensor): 49406, the tokens (at most 75), 49407, then 49407 padding"""
    tokenizer = _tokenizer()
    name = lambda token: repr(tokenizer.id_to_token.get(token, "not a token id"))  # noqa: E731
    for n, text in enumerate(PROMPTS):
        expected, where = tokenize(text), f"prompt {n} ({text[:40]!r})"
        yours = call_candidate(candidate or tokenize, signature(check_tokenizer), text)
        if isinstance(yours, (list, tuple)) or torch.is_tensor(yours):
            yours = torch.as_tensor(yours)
            yours = yours[0] if yours.ndim == 2 and len(yours) == 1 else yours  # a batch of one
        if torch.is_tensor(yours) and yours.shape == expected.shape and (yours != expected).any():
            i = int((yours != expected).nonzero()[0])
            mine, theirs = int(yours[i]), int(expected[i])
            raise Mismatch(f"{where}, position {i}: yours {mine} ({name(mine)}), reference {theirs} ({name(theirs)}); "
                           "ids must match exactly (int64)" + diagnose(yours.double(), tokenizer_mistakes(text),
                                                                       Tolerance(0)))
        compare(yours, expected, Tolerance(0, 0, "int64, exact"), where, tokenizer_mistakes(text))
    return f"{len(PROMPTS)} prompts (case, punctuation, accents, whitespace, truncation), exact"


def _hidden_states(output) -> torch.Tensor:
    """A text encoder's last hidden states, whether it returns them, a tuple, or an object with .last_hidden_state."""
    output = getattr(output, "last_hidden_state", output)
    return output[0] if isinstance(output, (tuple, list)) else output


def _clip_without(model, ids, causal: bool = True, final_norm: bool = True):
    """The reference text encoder without its causal mask or its final layer norm: known mistakes."""
    text = model.text_model
    x, length = text.embeddings(ids), ids.shape[1]
    mask = torch.ones(length, length, dtype=torch.bool)
    mask = mask.tril() if causal else mask
    for layer in text.encoder.layers:
        x = layer(x, mask)
    return text.final_layer_norm(x) if final_norm else x


def text_encoder_mistakes(reference, ids):
    from minidiff.clip import CLIPTextModel

    def exact_gelu():
        other = CLIPTextModel(replace(reference.config, hidden_act="gelu"))
        other.load_state_dict(reference.state_dict())
        return other.eval()(ids)

    return [
        ("no causal mask: token i may attend only to tokens 0..i (a lower-triangular mask)",
         lambda: _clip_without(reference, ids, causal=False)),
        ("the final layer norm (text_model.final_layer_norm) is missing",
         lambda: _clip_without(reference, ids, final_norm=False)),
        ("SD 1.x's CLIP uses quick_gelu, x * sigmoid(1.702 x), not the exact GELU", exact_gelu),
    ]


@milestone("text encoder: CLIP's causal transformer (Radford et al. 2021)")
def check_text_encoder(candidate=None):
    """CLIPTextModel(config: CLIPTextConfig) -> nn.Module with transformers keys; model(input_ids) -> (B, 77, width)

    Built from CLIPTextConfig.tiny(), given the reference's weights (keys text_model.embeddings..., as in the
    text_encoder/ files), run on the ids of two prompts; a tuple or .last_hidden_state output is accepted.
    """
    from minidiff.clip import CLIPTextModel

    reference, call = reference_network("clip"), signature(check_text_encoder)
    model = build_like(candidate or CLIPTextModel, reference, call)
    ids, tol = torch.stack([tokenize(PROMPTS[0]), tokenize(PROMPTS[1])]), Tolerance(1e-4, 1e-4)
    with torch.no_grad():
        yours = _hidden_states(call_candidate(model, call, ids.clone()))
        error = compare(yours, reference(ids), tol, "last hidden state", text_encoder_mistakes(reference, ids))
    return f"tiny config, largest |diff| {error:.1e} <= {tol.atol:g} (fp32)"


# --- loading ---------------------------------------------------------------------------------------------


@milestone("loading: a diffusers unet/ folder (config.json + safetensors)", lesson=11)
def check_load_unet(candidate=None):
    """load_unet(folder) -> nn.Module called as unet(x, t, context), or its state dict; folder is a diffusers unet/

    The folder holds the tiny reference UNet as diffusers writes it: config.json and
    diffusion_pytorch_model.safetensors. Every tensor of yours is compared with the file's, then the output.
    """
    from safetensors.torch import save_file

    from minidiff.load import load_unet

    reference, call = reference_network("unet"), signature(check_load_unet)
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(to_diffusers(reference.config)))
        save_file(state, str(Path(folder) / "diffusion_pytorch_model.safetensors"))
        loaded = call_candidate(candidate or load_unet, call, folder)
        yours = loaded.state_dict() if isinstance(loaded, torch.nn.Module) else loaded
        if not isinstance(yours, dict):
            raise Mismatch(f"yours returned a {type(loaded).__name__}; the milestone calls {call}")
        missing, unexpected = sorted(set(state) - set(yours)), sorted(set(yours) - set(state))
        if missing or unexpected:
            raise Mismatch(f"the keys differ from the file's: {len(missing)} missing (e.g. "
                           f"{', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected (e.g. "
                           f"{', '.join(unexpected[:3]) or '-'})")
        for key, value in state.items():
            compare(yours[key], value, Tolerance(0, 0, "exact, as stored"), f"tensor {key}")
        if not isinstance(loaded, torch.nn.Module):
            return f"all {len(state)} tensors exactly as stored"
        x, t, context = unet_inputs()
        with torch.no_grad():  # inside the folder's lifetime: the tensors may be memory-mapped from it
            output = call_candidate(loaded.eval(), call, x, t, context)
            error = compare(output, reference(x, t, context), Tolerance(1e-4, 1e-4), "output of the loaded UNet")
    return f"all {len(state)} tensors exactly as stored; output within 1e-4 (largest |diff| {error:.1e})"


def _rename_variant(state: dict, rules: list, renames=True) -> dict:
    """keymap.rename, or its known mistake: the renames inside a block (in_layers.0 -> norm1, ...) not applied."""
    from minidiff.keymap import rename

    return rename(state, rules if renames else [(old, new, {}) for old, new, _ in rules])[0]


@milestone("loading: an original single-file UNet renamed through the key map", lesson=11)
def check_rename_keys(candidate=None):
    """rename_keys(state, rules) -> {diffusers key: tensor}; rules: minidiff.keymap.unet_rules(config) triples

    The tiny seeded UNet's weights under the original (ldm) names, model.diffusion_model. removed, and its rules;
    every key must come back to its diffusers name with its tensor.
    """
    from minidiff.keymap import rename, to_original, unet_rules

    unet = reference_network("unet")
    config = to_diffusers(unet.config)
    state, rules = unet.state_dict(), unet_rules(config)
    original = to_original(state, "unet", config)
    section = "reread lesson 11 (course/11_official_weights.md, the original single-file layout)"
    mistakes = [(f"the renames inside the block were not applied (in_layers.0 -> norm1, ...); {section}", False)]
    yours = call_candidate(candidate or (lambda s, r: rename(s, r)[0]), signature(check_rename_keys), dict(original),
                           list(rules))
    if not isinstance(yours, dict):
        raise Mismatch(f"yours returned a {type(yours).__name__}; expected a dict {{diffusers key: tensor}}")
    missing, unexpected = sorted(set(state) - set(yours)), sorted(set(yours) - set(state))
    if missing or unexpected:
        named = next((text for text, inner in mistakes if set(_rename_variant(original, rules, inner)) == set(yours)),
                     None)
        raise Mismatch(f"{len(missing)} diffusers keys missing (e.g. {', '.join(missing[:2]) or '-'}), "
                       f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'})"
                       + (f"\n  hint: {named}" if named else ""))
    for key, value in state.items():
        compare(yours[key], value, Tolerance(0, 0, "exact, as stored"), f"tensor {key}")
    return f"all {len(state)} keys renamed, every tensor as stored"
