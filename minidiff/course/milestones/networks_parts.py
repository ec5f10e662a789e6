"""Milestones of the networks built part by part: the UNet's Transformer2D, down, mid and up stages and the whole
UNet from them (lesson 06); the VAE decoder's resnet, attention, up block and the decoder from them (lesson 07);
DDIM's early exit (lesson 03); an original single-file checkpoint renamed through a key map (lesson 11).

The references are the library's modules (minidiff.unet, minidiff.vae, minidiff.samplers, minidiff.keymap) with
the tiny seeded weights of networks.reference_network; the candidate gets the same weights as a dict under the
official keys. The known mistakes are the library's pieces put together wrongly. See core.py for the machinery.
"""

import torch
import torch.nn.functional as F

from minidiff.course.milestones.core import (
    Mismatch,
    Tolerance,
    call_candidate,
    compare,
    fixed_randn,
    milestone,
    signature,
)
from minidiff.course.milestones.networks import reference_network, unet_inputs, unet_mistakes

TOL = Tolerance(1e-4, 1e-4)
SECTIONS = {6: "06_unet", 7: "07_vae", 3: "03_ddim", 11: "11_official_weights"}


def hint(text: str, lesson: int, section: str) -> str:
    return f"{text}; reread lesson {lesson:02d} (course/{SECTIONS[lesson]}.md, {section})"


def _stage_inputs(unet, stage: str):
    """The input of one stage of the tiny UNet on unet_inputs(), and the skips the up stage receives."""
    x, t, context = unet_inputs()
    captured = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: captured.setdefault(name, args))
             for name, module in unet.named_modules() if name in (stage,)]
    try:
        with torch.no_grad():
            unet(x, t, context)
    finally:
        for handle in hooks:
            handle.remove()
    return captured[stage]


def _attentions_off(block, x, emb, context, skips=None):
    """A down/up stage run without its transformers (a known mistake)."""
    saved, block.attentions = block.attentions, torch.nn.ModuleList()
    try:
        return block(x, emb, context) if skips is None else block(x, skips, emb, context)
    finally:
        block.attentions = saved


@milestone("Transformer2D: the feature map as tokens through your transformer block", lesson=6)
def check_transformer_2d(candidate=None):
    """transformer_2d(x, context, params, heads, groups=32) -> (B, C, H, W); params: norm, proj_in, ...

    down_blocks.1.attentions.0 of the tiny seeded UNet (64 channels, 4 heads) on its input there.
    """
    unet = reference_network("unet")
    module = unet.down_blocks[1].attentions[0]
    x, context = _stage_inputs(unet, "down_blocks.1.attentions.0")
    p = module.state_dict()
    batch, channels, height, width = x.shape

    def no_permute():
        h = F.conv2d(module.norm(x), p["proj_in.weight"], p["proj_in.bias"]).reshape(batch, height * width, channels)
        h = module.transformer_blocks[0](h, context).reshape(batch, channels, height, width)
        return x + F.conv2d(h, p["proj_out.weight"], p["proj_out.bias"])

    mistakes = [(hint("the residual is missing: return x + h", 6, "the transformer in the UNet"),
                 lambda: module(x, context) - x),
                (hint("(B, C, H, W) -> (B, HW, C) needs a permute to (B, H, W, C) before the reshape; a plain reshape "
                      "mixes channels and positions", 6, "the transformer in the UNet"), no_permute)]
    candidate = candidate or (lambda x, c, p, heads, groups=32: module(x, c))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_transformer_2d), x.clone(), context.clone(), dict(p), 4, 32)
        error = compare(yours, module(x, context), TOL, "output", mistakes)
    return f"largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


@milestone("UNet down stage: resnets, transformers, downsampler, and the skips", lesson=6)
def check_down_block(candidate=None):
    """down_block(x, emb, context, params, heads, groups=32) -> (x, skips); skips: every output, the downsampler's too

    down_blocks.1 of the tiny seeded UNet (2 resnets with transformers, a downsampler) on its input there.
    """
    unet = reference_network("unet")
    block, section = unet.down_blocks[1], "the down path and its skips"
    x, emb, context = _stage_inputs(unet, "down_blocks.1")
    candidate = candidate or (lambda x, emb, c, p, heads, groups=32: block(x, emb, c))
    with torch.no_grad():
        out = call_candidate(candidate, signature(check_down_block), x.clone(), emb.clone(), context.clone(),
                             dict(block.state_dict()), 4, 32)
        expected, skips = block(x, emb, context)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (tuple, list))):
            raise Mismatch(f"yours returned {type(out).__name__}; expected (x, skips), skips a list")
        yours, your_skips = out
        if len(your_skips) != len(skips):
            why = {len(skips) - 1: "the downsampler's output is a skip too", 1: "every resnet's (or transformer's) "
                   "output is a skip, not only the stage's last"}.get(len(your_skips))
            raise Mismatch(f"yours gave {len(your_skips)} skips, the reference {len(skips)}"
                           + (f"\n  hint: {hint(why, 6, section)}" if why else ""))
        no_attention = _attentions_off(block, x, emb, context)
        missing = hint("the transformers (attentions.i) are missing after the resnets", 6, section)
        for i, (mine, theirs) in enumerate(zip(your_skips, skips)):
            compare(mine, theirs, TOL, f"skip {i}", [(missing, lambda i=i: no_attention[1][i])])
        error = compare(yours, expected, TOL, "output", [(missing, lambda: no_attention[0])])
    return f"output and {len(skips)} skips, largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


@milestone("UNet mid stage: resnet, transformer, resnet", lesson=6)
def check_mid_block(candidate=None):
    """mid_block(x, emb, context, params, heads, groups=32) -> (B, C, H, W); params: resnets.0, attentions.0, resnets.1

    The tiny seeded UNet's mid_block (64 channels, 4 heads) on its input there.
    """
    unet = reference_network("unet")
    block = unet.mid_block
    x, emb, context = _stage_inputs(unet, "mid_block")
    mistakes = [(hint("the transformer is missing: resnets.0, attentions.0, resnets.1", 6, "the mid-block"),
                 lambda: block.resnets[1](block.resnets[0](x, emb), emb)),
                (hint("the order is resnets.0, attentions.0, resnets.1", 6, "the mid-block"),
                 lambda: block.resnets[1](block.resnets[0](block.attentions[0](x, context), emb), emb))]
    candidate = candidate or (lambda x, emb, c, p, heads, groups=32: block(x, emb, c))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_mid_block), x.clone(), emb.clone(), context.clone(),
                               dict(block.state_dict()), 4, 32)
        error = compare(yours, block(x, emb, context), TOL, "output", mistakes)
    return f"largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


@milestone("UNet up stage: the skips concatenated, latest first; the upsampler", lesson=6)
def check_up_block(candidate=None):
    """up_block(x, skips, emb, context, params, heads, groups=32) -> (B, C, 2H, 2W); skips: this stage's, one per resnet

    up_blocks.1 of the tiny seeded UNet (3 resnets with transformers, an upsampler) on its input there.
    """
    unet = reference_network("unet")
    block, section = unet.up_blocks[1], "the up path and its skips"
    x, skips, emb, context = _stage_inputs(unet, "up_blocks.1")
    skips = list(skips)

    def concat_swapped():
        h = x
        for i, resnet in enumerate(block.resnets):
            h = block.attentions[i](resnet(torch.cat([skips[-1 - i], h], dim=1), emb), context)
        return block.upsamplers[0](h)

    mistakes = [(hint("the skips go latest first: resnet i takes skips[-1 - i]", 6, section),
                 lambda: block(x, skips[::-1], emb, context)),
                (hint("concatenate [x, skip] in that order on the channels, x first", 6, section), concat_swapped),
                (hint("the upsampler (nearest x2, then upsamplers.0.conv) is missing", 6, section),
                 lambda: _no_upsampler(block, x, skips, emb, context)),
                (hint("the transformers (attentions.i) are missing after the resnets", 6, section),
                 lambda: _attentions_off(block, x, emb, context, skips))]
    candidate = candidate or (lambda x, s, emb, c, p, heads, groups=32: block(x, s, emb, c))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_up_block), x.clone(), [s.clone() for s in skips],
                               emb.clone(), context.clone(), dict(block.state_dict()), 4, 32)
        error = compare(yours, block(x, skips, emb, context), TOL, "output", mistakes)
    return f"largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


def _no_upsampler(block, x, skips, emb, context):
    saved, block.upsamplers = block.upsamplers, None
    try:
        return block(x, skips, emb, context)
    finally:
        block.upsamplers = saved


@milestone("the whole UNet from your parts", lesson=6, function="unet")
def check_unet_from_parts(candidate=None):
    """unet(x, t, context, params, config) -> (B, 4, H, W); params: the UNet's state_dict, config: a UNetConfig

    The tiny seeded UNet (UNetConfig.tiny()) on x (2, 4, 8, 8), t = [999, 10], context (2, 7, 32).
    """
    unet = reference_network("unet")
    x, t, context = unet_inputs()
    p = unet.state_dict()

    mistakes = [*unet_mistakes(unet, x, t, context),
                (hint("the output is conv_out(SiLU(conv_norm_out(h))): the SiLU is missing", 6, "the whole UNet"),
                 lambda: unet.conv_out(unet.conv_norm_out(_last_hidden(unet, x, t, context))))]
    candidate = candidate or (lambda x, t, c, p, config: unet(x, t, c))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_unet_from_parts), x.clone(), t.clone(), context.clone(),
                               dict(p), unet.config)
        error = compare(yours, unet(x, t, context), TOL, "output", mistakes)
    return f"tiny config, largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


def _last_hidden(unet, x, t, context):
    """The UNet's h before conv_norm_out (the input its hook sees)."""
    captured = {}
    handle = unet.conv_norm_out.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    try:
        unet(x, t, context)
    finally:
        handle.remove()
    return captured["h"]


# --- the VAE decoder ---------------------------------------------------------------------------------------------


def _vae_resblock_variant(block, x, skip=True, silu=True):
    act = F.silu if silu else (lambda h: h)
    h = block.conv2(act(block.norm2(block.conv1(act(block.norm1(x))))))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h if skip else h


@milestone("VAE ResnetBlock2D (no timestep)", lesson=7)
def check_vae_resblock(candidate=None):
    """vae_resblock(x, params, groups=32) -> (B, C_out, H, W); params: norm1, conv1, norm2, conv2[, conv_shortcut]

    Two blocks of the tiny seeded VAE decoder (groups 8): one keeps 32 channels, one goes 32 -> 16 (a 1x1 shortcut).
    """
    decoder, section = reference_network("vae").decoder, "the VAE's blocks"
    largest = 0.0
    for name, channels in (("mid_block.resnets.0", 32), ("up_blocks.2.resnets.0", 32)):
        block = decoder.get_submodule(name)
        x = fixed_randn(1, channels, 8, 8, seed=70)
        mistakes = [(hint("the skip is missing: out = x (or conv_shortcut(x)) + h", 7, section),
                     lambda b=block, x=x: _vae_resblock_variant(b, x, skip=False)),
                    (hint("a SiLU follows each GroupNorm: conv(SiLU(GroupNorm(x)))", 7, section),
                     lambda b=block, x=x: _vae_resblock_variant(b, x, silu=False))]
        run = candidate or (lambda x, p, groups=32, b=block: b(x))
        with torch.no_grad():
            yours = call_candidate(run, signature(check_vae_resblock), x.clone(), dict(block.state_dict()), 8)
            largest = max(largest, compare(yours, block(x), TOL, f"decoder.{name}", mistakes))
    return f"with and without a shortcut, largest |diff| {largest:.1e} <= {TOL.atol:g} (fp32)"


def _vae_attention_variant(module, x, scale=True, residual=True, axis=-1):
    batch, channels, height, width = x.shape
    h = module.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = module.to_q(h), module.to_k(h), module.to_v(h)
    scores = q @ k.transpose(1, 2) / (channels**0.5 if scale else 1.0)
    h = module.to_out[0](scores.softmax(dim=axis) @ v).transpose(1, 2).reshape(batch, channels, height, width)
    return x + h if residual else h


@milestone("VAE attention: one head over the H W positions", lesson=7)
def check_vae_attention(candidate=None):
    """vae_attention(x, params, groups=32) -> (B, C, H, W); params: group_norm, to_q, to_k, to_v, to_out.0 (biases)

    The tiny seeded VAE decoder's mid_block.attentions.0 (32 channels, groups 8) on x (1, 32, 4, 4).
    """
    module, section = reference_network("vae").decoder.mid_block.attentions[0], "the VAE's blocks"
    x = fixed_randn(1, 32, 4, 4, seed=71)
    mistakes = [(hint("scale the scores by 1 / sqrt(C)", 7, section), lambda: _vae_attention_variant(module, x, False)),
                (hint("the residual is missing: return x + out", 7, section),
                 lambda: _vae_attention_variant(module, x, residual=False)),
                (hint("softmax over the keys (the last axis), one row of weights per query", 7, section),
                 lambda: _vae_attention_variant(module, x, axis=1))]
    run = candidate or (lambda x, p, groups=32: module(x))
    with torch.no_grad():
        yours = call_candidate(run, signature(check_vae_attention), x.clone(), dict(module.state_dict()), 8)
        error = compare(yours, module(x), TOL, "output", mistakes)
    return f"largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


def _vae_up_variant(block, x, upsample_first=False, upsample=True, mode="nearest"):
    """decoder.up_blocks.i put together wrongly (the known mistakes)."""
    def up(x):
        if block.upsamplers is None or not upsample:
            return x
        return block.upsamplers[0].conv(F.interpolate(x, scale_factor=2.0, mode=mode))

    x = up(x) if upsample_first else x
    for resnet in block.resnets:
        x = resnet(x)
    return x if upsample_first else up(x)


@milestone("VAE decoder up block: resnets, then the upsampler", lesson=7)
def check_vae_up_block(candidate=None):
    """vae_up_block(x, params, groups=32) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) in the last block

    params: resnets.0, resnets.1, ... and, in every block but the last, upsamplers.0.conv. The tiny seeded VAE
    decoder's up_blocks.1 (32 channels and an upsampler), up_blocks.2 (32 -> 16 channels: a shortcut and an
    upsampler) and up_blocks.3 (no upsampler).
    """
    decoder, section = reference_network("vae").decoder, "the decoder"
    largest = 0.0
    for index, channels in ((1, 32), (2, 32), (3, 16)):
        block = decoder.up_blocks[index]
        x = fixed_randn(1, channels, 4, 4, seed=73 + index)
        mistakes = [(hint("each up block runs its resnets first, then its upsampler", 7, section),
                     lambda b=block, x=x: _vae_up_variant(b, x, upsample_first=True)),
                    (hint("the upsampler is missing: every up block but the last ends with nearest x2 and a 3x3 conv",
                          7, section), lambda b=block, x=x: _vae_up_variant(b, x, upsample=False)),
                    (hint("the upsampler doubles the size by nearest-neighbour (mode='nearest'), then the 3x3 conv",
                          7, section), lambda b=block, x=x: _vae_up_variant(b, x, mode="bilinear"))]
        run = candidate or (lambda x, p, groups=32, b=block: b(x))
        with torch.no_grad():
            yours = call_candidate(run, signature(check_vae_up_block), x.clone(), dict(block.state_dict()), 8)
            largest = max(largest, compare(yours, block(x), TOL, f"decoder.up_blocks.{index}", mistakes))
    return f"3 blocks, with and without an upsampler, largest |diff| {largest:.1e} <= {TOL.atol:g} (fp32)"


@milestone("the VAE decoder from your blocks", lesson=7)
def check_vae_decode(candidate=None):
    """vae_decode(z, params, groups=32) -> (B, 3, 8h, 8w); params: the AutoencoderKL's state_dict

    The tiny seeded VAE (groups 8) decodes an unscaled z (1, 4, 4, 4).
    """
    vae, section = reference_network("vae"), "the decoder"
    z = fixed_randn(1, 4, 4, 4, seed=72)

    def upsample_first():
        d = vae.decoder
        x = d.mid_block(d.conv_in(vae.post_quant_conv(z)))
        for block in d.up_blocks:
            x = block.upsamplers[0](x) if block.upsamplers is not None else x
            for resnet in block.resnets:
                x = resnet(x)
        return d.conv_out(F.silu(d.conv_norm_out(x)))

    mistakes = [(hint("post_quant_conv (a 1x1 conv) comes before the decoder: decoder(post_quant_conv(z))", 7,
                      section), lambda: vae.decoder(z)),
                (hint("each up block runs its resnets first, then its upsampler", 7, section), upsample_first)]
    run = candidate or (lambda z, p, groups=32: vae.decode(z))
    with torch.no_grad():
        yours = call_candidate(run, signature(check_vae_decode), z.clone(), dict(vae.state_dict()), 8)
        error = compare(yours, vae.decode(z), TOL, "image", mistakes)
    return f"tiny config, largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"
