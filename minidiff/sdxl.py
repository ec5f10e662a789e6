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
minidiff.pipeline.Pipeline holds an SDXLConditioning for an SDXL model and hands it these steps.
"""

from typing import NamedTuple

import torch
from torch import nn

from minidiff.errors import MinidiffError
from minidiff.prompts import join_chunks, tokenize_prompts


class TextConditioning(NamedTuple):
    """What SDXL's UNet reads of a prompt: the per-token context and the pooled embedding."""

    context: torch.Tensor  # (B, 77 * chunks, 2048): [ViT-L penultimate, bigG penultimate] (refiner: bigG alone, 1280)
    pooled: torch.Tensor  # (B, 1280): bigG's projected end-of-text state


def encode_text(text_encoders, tokenizers, prompts: list, device=None, min_chunks: int = 1,
                prompt_weights: bool = True) -> TextConditioning:
    """Both encoders' penultimate states side by side, and the pooled output of the last encoder (bigG).

    An encoder may be None (the refiner has bigG alone). Weights and chunks as in minidiff.prompts, each encoder's
    states weighted on their own; the pooled embedding is that of the first chunk (as A1111 does), unweighted."""
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        if encoder is None:
            continue
        ids, weights = tokenize_prompts(tokenizer, prompts, min_chunks, prompt_weights)  # (B, chunks, 77)
        batch, chunks, length = ids.shape
        flat = ids.view(batch * chunks, length).to(device or next(encoder.parameters()).device)
        penultimate, pooled = encoder.penultimate_and_pooled(flat)
        states.append(join_chunks(penultimate, weights))
        pooled = pooled.view(batch, chunks, -1)[:, 0]  # the first chunk's
    return TextConditioning(torch.cat(states, dim=-1), pooled)  # (B, 77 * chunks, sum of widths)


def time_ids(original_size, crop_top_left, target_size, aesthetic_score=None) -> torch.Tensor:
    """The micro-conditioning of one image, (6,): original (height, width), crop (top, left), target (height,
    width); with an aesthetic_score (the refiner) the target size is replaced by it, (5,)."""
    pairs = (original_size, crop_top_left) + ((target_size,) if aesthetic_score is None else ())
    if any(len(tuple(pair)) != 2 for pair in pairs):
        raise MinidiffError(f"original_size {original_size}, crop_top_left {crop_top_left} and target_size "
                            f"{target_size} must be (height, width), (top, left) and (height, width)")
    last = (aesthetic_score,) if aesthetic_score is not None else tuple(target_size)
    return torch.tensor((*original_size, *crop_top_left, *last), dtype=torch.float32)


class SDXLConditioning:
    """What SDXL adds to a Pipeline: the second text encoder and tokenizer, the pooled embedding in the UNet's
    added_cond_kwargs, the size/crop ids of each call, and zeros for a missing negative prompt."""

    def __init__(self, text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt: bool = True):
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.micro = {}  # the current call's original_size, crop_top_left, target_size, aesthetic scores
        self.zero_uncond = False  # the current call has no negative prompt: the unconditional branch is zeros

    def start_call(self, negative_prompt, options: dict) -> None:
        """Take a pipeline call's micro-conditioning out of its keyword `options` (defaults: the image's own size,
        no crop; aesthetic scores 6 and 2.5, read by the refiner only)."""
        defaults = dict(original_size=None, crop_top_left=(0, 0), target_size=None, aesthetic_score=6.0,
                        negative_aesthetic_score=2.5)
        self.micro = {name: options.pop(name, default) for name, default in defaults.items()}
        self.zero_uncond = negative_prompt is None and self.force_zeros_for_empty_prompt

    def encode(self, text_encoder, tokenizer, prompts: list, device, dtype, min_chunks: int = 1,
               prompt_weights: bool = True) -> TextConditioning:
        text = encode_text((text_encoder, self.text_encoder_2), (tokenizer, self.tokenizer_2), prompts, device,
                           min_chunks, prompt_weights)
        return TextConditioning(text.context.to(dtype), text.pooled.to(dtype))

    def added_cond_kwargs(self, unet_config, pooled, x, uncond: bool = False) -> dict:
        """{"text_embeds", "time_ids"} for latents x: sizes default to the image being made (8 x latent size)."""
        size, micro = (8 * x.shape[-2], 8 * x.shape[-1]), self.micro
        ids = ((unet_config.projection_class_embeddings_input_dim - pooled.shape[-1])
               // unet_config.addition_time_embed_dim)
        score = micro["negative_aesthetic_score" if uncond else "aesthetic_score"] if ids == 5 else None  # refiner
        values = time_ids(micro["original_size"] or size, micro["crop_top_left"] or (0, 0),
                          micro["target_size"] or size, score)
        return {"text_embeds": pooled, "time_ids": values.to(pooled.device, pooled.dtype).expand(len(pooled), -1)}

    def batch(self, uncond: TextConditioning, context: TextConditioning) -> TextConditioning:
        """[uncond, cond] in one batch, as guidance runs it; zeros for uncond when the call has no negative prompt."""
        if self.zero_uncond:
            uncond = TextConditioning(torch.zeros_like(context.context), torch.zeros_like(context.pooled))
        return TextConditioning(*(torch.cat(pair) for pair in zip(uncond, context)))

    def unet_call(self, unet, halves: bool = False):
        """(x, t, text) -> unet(x, t, text.context, added_cond_kwargs=...); halves: the batch is [uncond, cond]
        (the refiner gives the two halves different aesthetic scores)."""

        def call(x, t, text: TextConditioning):
            if not halves:
                return unet(x, t, text.context, added_cond_kwargs=self.added_cond_kwargs(unet.config, text.pooled, x))
            pooled_uncond, pooled_cond = text.pooled.chunk(2)
            negative, positive = (self.added_cond_kwargs(unet.config, pooled, x[:len(pooled)], uncond)
                                  for pooled, uncond in ((pooled_uncond, True), (pooled_cond, False)))
            added = {key: torch.cat([negative[key], positive[key]]) for key in positive}
            return unet(x, t, text.context, added_cond_kwargs=added)

        return call


class WithAddedConditioning(nn.Module):
    """An SDXL UNet called as (x, t, context), its pooled text and time ids fixed (as the bench calls a UNet)."""

    def __init__(self, unet: nn.Module, added: dict):
        super().__init__()
        self.unet, self.added, self.config = unet, added, unet.config

    def forward(self, x, t, context):
        return self.unet(x, t, context, added_cond_kwargs={k: v.to(x.dtype) for k, v in self.added.items()})
