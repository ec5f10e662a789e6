"""Lesson 10, speed: the exercises (memory in numbers: what half precision and sliced attention save).

Notation (course/10_speed.md):
    fp16, fp32  -> 2 and 4 bytes a number
    MB          -> 10^6 bytes (MiB: 2^20)
"""

import torch

from minidiff.unet import UNet, UNetConfig

# --- exercises (course/10_speed.md, "Exercises") ---


def exercise_10_1():
    """The megabytes (10^6 bytes) of SD 1.5's UNet weights in fp16 (a number). Count the parameters of
    UNet(UNetConfig.sd15()) built on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in UNet(UNetConfig.sd15()).parameters())
    return 2 * parameters / 1e6


def exercise_10_2():
    """The megabytes of fp16 attention scores softmax(Q K^T) that SD 1.5's first self-attention holds at once for a
    512x512 picture with guidance (the batch is the prompt and the empty prompt), every head at a time (a number)."""
    config = UNetConfig.sd15()
    batch, heads, tokens = 2, config.num_attention_heads[0], config.sample_size**2
    return batch * heads * tokens * tokens * 2 / 1e6
