"""Lesson 06, the UNet's parts: the sinusoidal timestep embedding and the ResnetBlock (He et al. 2016).

Notation (course/06_unet.md):
    t       -> (B,) timesteps, float
    emb     -> (B, 4 C) the embedded timestep after the UNet's time MLP, one per picture
    params  -> a ResnetBlock's weights under diffusers' keys: "norm1.weight", "conv1.bias", "time_emb_proj.weight", ...
               (a stage's: "resnets.0.conv1.weight", "attentions.0.proj_in.weight", "downsamplers.0.conv.weight")
    skips   -> every output of the down path (conv_in's, each resnet's or transformer's, each downsampler's),
               taken back by the up path latest first, concatenated on the channels
"""

import math

import torch
import torch.nn.functional as F

from minidiff.course.solutions.lesson_05 import _sub, transformer_block


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


def transformer_2d(x, context, params, heads, groups=32):
    """The UNet's Transformer2D: the feature map (B, C, H, W) as H W tokens through lesson 05's transformer_block.

    h = GroupNorm(x) (eps 1e-6) -> proj_in -> (B, HW, C) -> transformer_blocks.0 -> proj_out -> (B, C, H, W); x + h.
    proj_in / proj_out are 1x1 convs (weights (C, C, 1, 1), SD 1.x) before and after the reshape, or linears
    (weights (C, C), SD 2.x) after and before it.
    """
    batch, channels, height, width = x.shape
    linear = params["proj_in.weight"].ndim == 2
    h = F.group_norm(x, groups, params["norm.weight"], params["norm.bias"], 1e-6)
    h = h if linear else F.conv2d(h, params["proj_in.weight"], params["proj_in.bias"])
    h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C)
    h = F.linear(h, params["proj_in.weight"], params["proj_in.bias"]) if linear else h
    h = transformer_block(h, context, _sub(params, "transformer_blocks.0"), heads)
    h = F.linear(h, params["proj_out.weight"], params["proj_out.bias"]) if linear else h
    h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)
    h = h if linear else F.conv2d(h, params["proj_out.weight"], params["proj_out.bias"])
    return x + h


def _count(params, name):
    """How many sub-blocks params has under `name` (resnets.0, resnets.1, ... -> 2)."""
    return len({key.split(".")[1] for key in params if key.startswith(name + ".")})


def down_block(x, emb, context, params, heads, groups=32):
    """A down stage -> (x, skips): for each i, x = resnets.i(x, emb), then attentions.i(x, context) when the
    stage has attentions; each of these outputs is a skip. Then, when it has one, downsamplers.0.conv (3x3,
    stride 2, padding 1), whose output is a skip too."""
    skips = []
    for i in range(_count(params, "resnets")):
        x = resblock(x, emb, _sub(params, f"resnets.{i}"), groups)
        if _count(params, "attentions"):
            x = transformer_2d(x, context, _sub(params, f"attentions.{i}"), heads, groups)
        skips.append(x)
    if "downsamplers.0.conv.weight" in params:
        x = F.conv2d(x, params["downsamplers.0.conv.weight"], params["downsamplers.0.conv.bias"], stride=2, padding=1)
        skips.append(x)
    return x, skips


def mid_block(x, emb, context, params, heads, groups=32):
    """The bottleneck: resnets.0, attentions.0, resnets.1."""
    x = resblock(x, emb, _sub(params, "resnets.0"), groups)
    x = transformer_2d(x, context, _sub(params, "attentions.0"), heads, groups)
    return resblock(x, emb, _sub(params, "resnets.1"), groups)


def up_block(x, skips, emb, context, params, heads, groups=32):
    """An up stage: for each i, x = resnets.i(cat([x, skips[-1 - i]], channels), emb) (the latest skip first),
    then attentions.i(x, context) when the stage has attentions; then, when it has one, upsamplers.0: nearest
    x2, then its 3x3 conv (padding 1). skips: this stage's skips, one per resnet."""
    for i in range(_count(params, "resnets")):
        x = torch.cat([x, skips[-1 - i]], dim=1)  # (B, C + C_skip, H, W)
        x = resblock(x, emb, _sub(params, f"resnets.{i}"), groups)
        if _count(params, "attentions"):
            x = transformer_2d(x, context, _sub(params, f"attentions.{i}"), heads, groups)
    if "upsamplers.0.conv.weight" in params:
        x = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), params["upsamplers.0.conv.weight"],
                     params["upsamplers.0.conv.bias"], padding=1)
    return x


def unet(x, t, context, params, config):
    """The whole UNet from your parts: eps_theta(x_t, t, context) (B, 4, H, W); params its state_dict, config a
    minidiff UNetConfig (block_out_channels, num_attention_heads, norm_num_groups).

    emb = time_embedding.linear_2(SiLU(time_embedding.linear_1(timestep_embedding(t, C_0)))), t (B,)
    h = conv_in(x); skips = [h]; each down stage: h, its skips = down_block(...), skips += them
    h = mid_block(h); each up stage j takes the last len(resnets) skips off the list: h = up_block(h, those)
    out = conv_out(SiLU(conv_norm_out(h)))            (GroupNorm eps 1e-5; the convs 3x3, padding 1)
    """
    p, groups, heads = params, config.norm_num_groups, config.num_attention_heads
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    emb = timestep_embedding(t, config.block_out_channels[0])
    emb = F.linear(F.silu(F.linear(emb, p["time_embedding.linear_1.weight"], p["time_embedding.linear_1.bias"])),
                   p["time_embedding.linear_2.weight"], p["time_embedding.linear_2.bias"])
    h = F.conv2d(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)
    skips = [h]
    for i in range(_count(p, "down_blocks")):
        h, block_skips = down_block(h, emb, context, _sub(p, f"down_blocks.{i}"), heads[i], groups)
        skips += block_skips
    if "mid_block.resnets.0.conv1.weight" in p:
        h = mid_block(h, emb, context, _sub(p, "mid_block"), heads[-1], groups)
    for j in range(_count(p, "up_blocks")):
        block = _sub(p, f"up_blocks.{j}")
        taken = _count(block, "resnets")
        h = up_block(h, skips[-taken:], emb, context, block, heads[-1 - j], groups)
        del skips[-taken:]
    h = F.silu(F.group_norm(h, groups, p["conv_norm_out.weight"], p["conv_norm_out.bias"], config.norm_eps))
    return F.conv2d(h, p["conv_out.weight"], p["conv_out.bias"], padding=1)


# --- exercises (course/06_unet.md, "Exercises") ---


def exercise_06_1():
    """The side of SD 1.5's feature map at the mid block, for a 512x512 picture (an int): the latent's 64,
    halved by each downsampler (every down stage but the last has one)."""
    from minidiff.unet import UNetConfig

    config = UNetConfig.sd15()
    return config.sample_size // 2 ** (len(config.block_out_channels) - 1)


def exercise_06_2():
    """The number of skips SD 1.5's down path hands to its up path (an int): conv_in's output, every down resnet's
    output, every downsampler's output."""
    from minidiff.unet import UNetConfig

    config = UNetConfig.sd15()
    stages = len(config.block_out_channels)
    return 1 + stages * config.layers_per_block + (stages - 1)
