"""Lesson 06, the UNet's parts: the sinusoidal timestep embedding and the ResnetBlock (He et al. 2016).

Notation (course/06_unet.md):
    t       -> (B,) timesteps, float
    emb     -> (B, 4 C) the embedded timestep after the UNet's time MLP, one per picture
    params  -> a ResnetBlock's weights under diffusers' keys: "norm1.weight", "conv1.bias", "time_emb_proj.weight", ...
"""

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t, dim):
    """SD's sinusoidal embedding (B, dim): cat([cos(t f_i), sin(t f_i)]), f_i = 10000^(-i / (dim / 2)), i < dim / 2."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def resblock(x, emb, params, groups=32, eps=1e-5):
    """The UNet's ResnetBlock: h = conv1(SiLU(GroupNorm(x))) + time_emb_proj(SiLU(emb)), then
    conv2(SiLU(GroupNorm(h))); out = skip(x) + h, skip a 1x1 conv_shortcut when params has one, else x.

    GroupNorm: `groups` groups (SD: 32), epsilon `eps` (SD: 1e-5); the convs are 3x3 with padding 1.
    """
    p = params
    h = F.conv2d(F.silu(F.group_norm(x, groups, p["norm1.weight"], p["norm1.bias"], eps)), p["conv1.weight"],
                 p["conv1.bias"], padding=1)
    h = h + F.linear(F.silu(emb), p["time_emb_proj.weight"], p["time_emb_proj.bias"])[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, groups, p["norm2.weight"], p["norm2.bias"], eps)), p["conv2.weight"],
                 p["conv2.bias"], padding=1)
    skip = F.conv2d(x, p["conv_shortcut.weight"], p["conv_shortcut.bias"]) if "conv_shortcut.weight" in p else x
    return skip + h
