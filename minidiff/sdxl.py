"""SDXL's conditioning (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", section 2): two text encoders, a pooled text embedding and the size and crop of each training image.

What changes from SD 1.x, and where it lives:
    text         two CLIP text towers read the same prompt: OpenAI's ViT-L (tokenizer pads with <|endoftext|>) and
                 OpenCLIP's ViT-bigG (pads with "!"); each gives the output of its penultimate layer, without the
                 final norm, and the two are concatenated per token: context (B, 77, 768 + 1280 = 2048)
    pooled       bigG's final-normed state at the end-of-text token, through its text_projection: (B, 1280)
    time_ids     "micro-conditioning", six numbers per image: the original size (height, width) the training image
                 had before resizing, the top-left corner (top, left) of the crop taken from it, and the target size;
                 asking for a large, uncropped original steers away from the blurry upscales and cut-off heads
                 these reveal in training data. The refiner has five: original size, crop, an aesthetic score.
    UNet         MLP([pooled, PE(id) for each id]) is added to the timestep embedding (unet.py, added_cond_kwargs)
    negatives    with no negative prompt, the unconditional branch of guidance gets zeros, not the empty prompt's
                 embedding (the model_index.json option force_zeros_for_empty_prompt, on for the base model)

Notation: context -> c (B, L, 2048); pooled -> the "text_embeds" of added_cond_kwargs; time_ids -> its "time_ids".
The pipeline that uses them is minidiff.pipeline.SDXLPipeline.
"""

from typing import NamedTuple

import torch

from minidiff import keymap
from minidiff.errors import CheckpointError, MinidiffError


class TextConditioning(NamedTuple):
    """What SDXL's UNet reads of a prompt: the per-token context and the pooled embedding."""

    context: torch.Tensor  # (B, 77, 2048): [ViT-L penultimate, bigG penultimate] (refiner: bigG alone, 1280)
    pooled: torch.Tensor  # (B, 1280): bigG's projected end-of-text state


def encode_text(text_encoders, tokenizers, prompts: list, device=None) -> TextConditioning:
    """Both encoders' penultimate states side by side, and the pooled output of the last encoder (bigG).

    An encoder may be None (the refiner has bigG alone)."""
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        if encoder is None:
            continue
        ids = tokenizer(prompts).to(device or next(encoder.parameters()).device)
        penultimate, pooled = encoder.penultimate_and_pooled(ids)
        states.append(penultimate)
    return TextConditioning(torch.cat(states, dim=-1), pooled)  # (B, 77, sum of widths)


def time_ids(original_size, crop_top_left, target_size, aesthetic_score=None) -> torch.Tensor:
    """The micro-conditioning of one image, (6,): original (height, width), crop (top, left), target (height,
    width); with an aesthetic_score (the refiner) the target size is replaced by it, (5,)."""
    pairs = (original_size, crop_top_left) + ((target_size,) if aesthetic_score is None else ())
    if any(len(tuple(pair)) != 2 for pair in pairs):
        raise MinidiffError(f"original_size {original_size}, crop_top_left {crop_top_left} and target_size "
                            f"{target_size} must be (height, width), (top, left) and (height, width)")
    last = (aesthetic_score,) if aesthetic_score is not None else tuple(target_size)
    return torch.tensor((*original_size, *crop_top_left, *last), dtype=torch.float32)


# --- the original single file (sd_xl_base_1.0.safetensors) -----------------------------------------------------


def is_sdxl_file(state: dict) -> bool:
    """An original SDXL checkpoint (base or refiner): its text encoders live under conditioner.embedders.N."""
    return any(key.startswith("conditioner.embedders.") for key in state)


def single_file_text_encoder(state: dict, part: str, source) -> tuple:
    """(keymap component, prefix) of text_encoder or text_encoder_2 in an original file; CheckpointError if absent."""
    prefixes = keymap.PREFIXES
    has = lambda name: any(key.startswith(prefixes[name]) for key in state)
    if not is_sdxl_file(state):
        if part == "text_encoder_2":
            raise CheckpointError(f"{source} is not an SDXL checkpoint: it has one text encoder, no text_encoder_2")
        return ("open_clip", prefixes["open_clip"]) if has("open_clip") else ("clip", prefixes["clip"])
    if part == "text_encoder_2":
        for name in ("open_clip_sdxl", "open_clip_sdxl_refiner"):
            if has(name):
                return "open_clip", prefixes[name]
        raise CheckpointError(f"{source} has no second text encoder ({prefixes['open_clip_sdxl']}*, OpenCLIP "
                              "ViT-bigG): SDXL needs both; the file is incomplete")
    if has("clip_sdxl"):
        return "clip", prefixes["clip_sdxl"]
    if has("open_clip_sdxl_refiner"):
        raise CheckpointError(f"{source} is the SDXL refiner (OpenCLIP bigG alone, no CLIP ViT-L): it refines a base "
                              "model's latents; load the base model (sd_xl_base_1.0, `minidiff download sdxl`)")
    raise CheckpointError(f"{source} has no first text encoder ({prefixes['clip_sdxl']}*, CLIP ViT-L): "
                          "SDXL needs both; the file is incomplete")
