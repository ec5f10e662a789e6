"""Lesson 07, the VAE: between the encoder's z and the UNet's latents (Rombach et al. 2022, sec. 4.3.2).

Notation (course/07_vae.md):
    z               -> the VAE encoder's latent (B, 4, H / 8, W / 8)
    scaling_factor  -> 1 / std(z) over the training images: 0.18215 for SD 1.x / 2.x
    latents         -> z * scaling_factor, what the UNet is trained on (unit variance)
    params          -> weights under diffusers' keys: "norm1.weight", "to_q.weight", "decoder.up_blocks.0.resnets.0..."
"""

import torch.nn.functional as F


def scale_latents(latents):
    """The SD VAE encoder's z -> the UNet's latents: z * 0.18215."""
    return latents * 0.18215


def decode_latents(latents, vae):
    """The sampler's latents -> images in [0, 1]: vae.decode(latents / vae.scaling_factor), mapped from [-1, 1]
    to [0, 1] by (image + 1) / 2 and clamped."""
    return ((vae.decode(latents / vae.scaling_factor) + 1) / 2).clamp(0, 1)


def _sub(params, prefix):
    """The entries of `params` under `prefix.`, with the prefix removed."""
    return {key[len(prefix) + 1:]: value for key, value in params.items() if key.startswith(prefix + ".")}


def _count(params, name):
    """How many sub-blocks params has under `name` (up_blocks.0, up_blocks.1, ... -> 2)."""
    return len({key.split(".")[1] for key in params if key.startswith(name + ".")})


def vae_resblock(x, params, groups=32):
    """The VAE's ResnetBlock2D, the UNet's without the timestep: h = conv1(SiLU(GroupNorm(x))),
    h = conv2(SiLU(GroupNorm(h))); out = skip(x) + h (conv_shortcut, 1x1, when params has one). GroupNorm eps
    1e-6; the convs 3x3, padding 1."""
    def norm_silu(h, name):
        return F.silu(F.group_norm(h, groups, params[f"{name}.weight"], params[f"{name}.bias"], 1e-6))

    h = F.conv2d(norm_silu(x, "norm1"), params["conv1.weight"], params["conv1.bias"], padding=1)
    h = F.conv2d(norm_silu(h, "norm2"), params["conv2.weight"], params["conv2.bias"], padding=1)
    skip = F.conv2d(x, params["conv_shortcut.weight"], params["conv_shortcut.bias"]) if "conv_shortcut.weight" in \
        params else x
    return skip + h


def vae_attention(x, params, groups=32):
    """The VAE mid-block's self-attention: ONE head over the H W positions, after group_norm (eps 1e-6):
    h = GroupNorm(x) as (B, HW, C); q, k, v = to_q(h), to_k(h), to_v(h) (with biases);
    out = to_out.0(softmax(q k^T / sqrt(C)) v) back to (B, C, H, W); x + out."""
    batch, channels, height, width = x.shape
    h = F.group_norm(x, groups, params["group_norm.weight"], params["group_norm.bias"], 1e-6)
    h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = (F.linear(h, params[f"{name}.weight"], params[f"{name}.bias"]) for name in ("to_q", "to_k", "to_v"))
    h = (q @ k.transpose(1, 2) / channels**0.5).softmax(dim=-1) @ v
    h = F.linear(h, params["to_out.0.weight"], params["to_out.0.bias"])
    return x + h.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)


def vae_up_block(x, params, groups=32):
    """One level of the VAE decoder (decoder.up_blocks.i): its resnets in order (your vae_resblock, under
    resnets.0, resnets.1, ...), then, when params has upsamplers.0.conv, the upsampler: nearest-neighbour x2,
    then that 3x3 conv (padding 1). (B, C_in, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) without one."""
    for j in range(_count(params, "resnets")):
        x = vae_resblock(x, _sub(params, f"resnets.{j}"), groups)
    if "upsamplers.0.conv.weight" in params:
        x = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), params["upsamplers.0.conv.weight"],
                     params["upsamplers.0.conv.bias"], padding=1)
    return x


def vae_decode(z, params, groups=32):
    """The VAE decoder from your blocks: the unscaled z (B, 4, h, w) -> the image (B, 3, 8h, 8w) in about [-1, 1].
    params: the AutoencoderKL's state_dict (keys post_quant_conv.*, decoder.*).

    x = decoder.conv_in(post_quant_conv(z))                    (1x1, then 3x3 padding 1)
    x = mid_block: resnets.0, attentions.0, resnets.1
    each up_blocks.i: your vae_up_block (its resnets, then, all but the last, its upsampler)
    out = conv_out(SiLU(conv_norm_out(x)))                     (GroupNorm eps 1e-6)
    """
    x = F.conv2d(z, params["post_quant_conv.weight"], params["post_quant_conv.bias"])
    p = _sub(params, "decoder")
    x = F.conv2d(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)
    x = vae_resblock(x, _sub(p, "mid_block.resnets.0"), groups)
    x = vae_attention(x, _sub(p, "mid_block.attentions.0"), groups)
    x = vae_resblock(x, _sub(p, "mid_block.resnets.1"), groups)
    for i in range(_count(p, "up_blocks")):
        x = vae_up_block(x, _sub(p, f"up_blocks.{i}"), groups)
    x = F.silu(F.group_norm(x, groups, p["conv_norm_out.weight"], p["conv_norm_out.bias"], 1e-6))
    return F.conv2d(x, p["conv_out.weight"], p["conv_out.bias"], padding=1)


# --- exercises (course/07_vae.md, "Exercises") ---


def exercise_07_1():
    """How many times SD's VAE shrinks each side of the picture (an int): VAEConfig.sd() has one level per entry of
    block_out_channels, with a downsampler between two levels."""
    from minidiff.vae import VAEConfig

    return 2 ** (len(VAEConfig.sd().block_out_channels) - 1)


def exercise_07_2():
    """The std of SD's unscaled latents z that the scaling factor 0.18215 = 1 / std(z) implies (a number)."""
    return 1 / 0.18215
