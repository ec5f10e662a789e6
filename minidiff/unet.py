"""The Stable Diffusion UNet: a noise predictor eps_theta(x_t, t, c) on 4-channel latents.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the architecture of
Ho et al. 2020 / Dhariwal & Nichol 2021 with cross-attention to the text), in the diffusers layout: every
attribute name is a diffusers `UNet2DConditionModel` key, so a diffusers `unet/` folder loads with a plain
`load_state_dict(strict=True)`.

Notation:
    x        -> x_t, the noisy latent (B, in_channels, H, W)
    t        -> t, the timestep (int or fractional), one per batch item
    context  -> c, the text encoder's hidden states (B, L, cross_attention_dim)
    emb      -> the timestep embedding MLP(PE(t)) added inside every ResnetBlock
    output   -> eps_theta(x_t, t, c), or v_theta for v-prediction models (SD 2.x 768)
    added_cond_kwargs -> SDXL (Podell et al. 2023): "text_embeds" pooled text (B, 1280), "time_ids" sizes, crop (B, 6);
                MLP([text_embeds, PE(each time id)]) is added to emb

Shape legend: B batch, C channels, H W latent height and width, L text tokens.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.attention import attention
from minidiff.errors import MinidiffError


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels (9 for inpainting UNets: latent + mask + masked-image latent)
    out_channels: int = 4  # the prediction has the latent's shape
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels of each resolution stage
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # stage has transformers; the up path mirrors it
    layers_per_block: int = 2  # resnets per down stage; each up stage has one more
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # heads per stage (SD 1.x: 8; SD 2.x: channels // 64)
    cross_attention_dim: int = 768  # text width: 768 CLIP ViT-L/14 (SD 1.x), 1024 OpenCLIP ViT-H/14 (SD 2.x)
    use_linear_projection: bool = False  # Transformer2D proj_in/proj_out: 1x1 conv (SD 1.x) or linear (SD 2.x)
    mid_block: bool = True  # resnet-transformer-resnet at the lowest resolution (BK-SDM small/tiny drop it)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm eps in resnets and at the output (transformers use 1e-6)
    flip_sin_to_cos: bool = True  # timestep embedding order [cos, sin] (SD) rather than [sin, cos]
    freq_shift: int = 0  # timestep embedding frequency shift (0 for SD)
    sample_size: int = 64  # latent size it was trained at (64 -> 512 px images, 96 -> 768 px)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks in each Transformer2D, per stage
    addition_embed_type: str | None = None  # None (SD 1.x/2.x) or "text_time" (SDXL: MLP([pooled, PE(ids)]) + emb)
    addition_time_embed_dim: int | None = None  # PE width of each time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # that MLP's input: pooled + ids x PE (1280 + 6 x 256)

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion 1.x (1.4, 1.5): 859,520,964 parameters."""
        return cls()

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """Stable Diffusion 2.x 768 px (v-prediction): OpenCLIP context, head dim 64, linear projections."""
        return cls(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                   sample_size=96)

    @classmethod
    def sd21_base(cls) -> "UNetConfig":
        """Stable Diffusion 2.x base, 512 px (eps-prediction): the sd21 network at latent size 64."""
        return cls(**{**asdict(cls.sd21()), "sample_size": 64})

    @classmethod
    def bk_sdm_base(cls) -> "UNetConfig":
        """BK-SDM-Base (Kim et al. 2023): one resnet (+ transformer) fewer per stage."""
        return cls(layers_per_block=1)

    @classmethod
    def bk_sdm_small(cls) -> "UNetConfig":
        """BK-SDM-Small: BK-SDM-Base without the mid-block."""
        return cls(layers_per_block=1, mid_block=False)

    @classmethod
    def bk_sdm_tiny(cls) -> "UNetConfig":
        """BK-SDM-Tiny: BK-SDM-Small without the innermost (8x8, attention-free) stage."""
        return cls(block_out_channels=(320, 640, 1280), cross_attention=(True, True, True),
                   num_attention_heads=(8, 8, 8), layers_per_block=1, mid_block=False)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        """SDXL base 1.0: 3 stages, the first without attention, 1/2/10 blocks per Transformer2D, both text encoders'
        states side by side (768 + 1280 = 2048), size/crop conditioning; 2,567,463,684 parameters."""
        return cls(block_out_channels=(320, 640, 1280), cross_attention=(False, True, True),
                   num_attention_heads=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                   sample_size=128, transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

    @classmethod
    def sdxl_refiner(cls) -> "UNetConfig":
        """SDXL refiner 1.0: bigG context alone, 4 blocks per Transformer2D, 5 time ids (with an aesthetic score)."""
        return cls(block_out_channels=(384, 768, 1536, 1536), cross_attention=(False, True, True, False),
                   num_attention_heads=(6, 12, 24, 24), cross_attention_dim=1280, use_linear_projection=True,
                   sample_size=128, transformer_layers_per_block=4, addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """A miniature SD 1.x layout (same block types, a few channels) for fast tests."""
        return cls(block_out_channels=(32, 64, 64, 64), num_attention_heads=(2, 4, 4, 4), cross_attention_dim=32,
                   sample_size=16)

    @classmethod
    def sdxl_tiny(cls) -> "UNetConfig":
        """SDXL's layout at a few channels (text_time conditioning, 1-2-3 blocks per Transformer2D) for fast tests."""
        return replace(cls.sdxl(), block_out_channels=(32, 64, 64), num_attention_heads=(1, 2, 2),
                       cross_attention_dim=48, transformer_layers_per_block=(1, 2, 3), sample_size=8,
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)  # pooled 32 + 6 ids x 8

    @property
    def downsample_factor(self) -> int:
        """Every stage but the last halves H and W."""
        return 2 ** (len(self.block_out_channels) - 1)

    def transformer_depth(self, stage: int) -> int:
        """Transformer blocks per Transformer2D in `stage` (the mid-block has the last stage's)."""
        depth = self.transformer_layers_per_block
        return depth[stage] if isinstance(depth, (list, tuple)) else depth



# --- the building blocks -----------------------------------------------------------------------------------


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0, max_period: float = 10000):
    """Sinusoidal embedding (Vaswani et al. 2017) of fp32 timesteps t, (B,) -> (B, dim).

    PE(t)_i = [sin(t w_i), cos(t w_i)] with w_i = max_period^(-i / (dim/2 - freq_shift)), i = 0 .. dim/2 - 1;
    flip_sin_to_cos puts the cosines first.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                            / (half - freq_shift))
    angles = t.float()[:, None] * frequencies[None, :]
    sin, cos = angles.sin(), angles.cos()
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """The MLP that turns PE(t) into the embedding every resnet receives: linear, SiLU, linear."""

    def __init__(self, dim: int, emb_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Residual block (He et al. 2016) with the timestep embedding added between the two 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, config: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(config.norm_num_groups, in_channels, eps=config.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(config.norm_num_groups, out_channels, eps=config.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the skip path's channels when the block changes them
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention of x to context (cross-attention), or to itself when context is None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # [1] is diffusers' (inference) dropout
        self.kernel = None  # computes softmax(Q K^T / sqrt(d)) V; None: SDPA (see minidiff.attention)

    def forward(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, kernel=self.kernel)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * GELU(b) with [a, b] = x W + bias."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP: GEGLU to 4 x dim, then back to dim."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # [1]: dropout

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """A transformer on the feature map's H*W positions: GroupNorm, proj_in, blocks, proj_out, plus the input."""

    def __init__(self, channels: int, heads: int, config: UNetConfig, depth: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        project = nn.Linear if config.use_linear_projection else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, config.cross_attention_dim)
                                                 for _ in range(depth)])
        self.proj_out = project(channels, channels)
        self.linear = config.use_linear_projection

    def forward(self, x, context):
        batch, channels, height, width = x.shape
        # SD 1.x projects with 1x1 convs on (B, C, H, W), SD 2.x with linears on (B, HW, C): the same map
        h = self.norm(x)
        h = h if self.linear else self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C): a token per position
        h = self.proj_in(h) if self.linear else h
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h) if self.linear else h
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)
        h = h if self.linear else self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# --- the stages ------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """An encoder stage: layers_per_block x (resnet [+ transformer]), then Downsample; every output is a skip."""

    def __init__(self, in_channels, out_channels, heads, cross_attention, add_downsample, emb_dim, config, depth=1):
        super().__init__()
        channels_in = [in_channels] + [out_channels] * (config.layers_per_block - 1)
        self.resnets = nn.ModuleList([ResnetBlock(c, out_channels, emb_dim, config) for c in channels_in])
        # empty (no keys) in an attention-free stage
        self.attentions = nn.ModuleList(
            [Transformer2D(out_channels, heads, config, depth) for _ in channels_in] if cross_attention else []
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(self, x, emb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            x = self.attentions[i](x, context) if self.attentions else x
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: resnet, transformer, resnet."""

    def __init__(self, channels, heads, emb_dim, config, depth=1):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, emb_dim, config) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(channels, heads, config, depth)])

    def forward(self, x, emb, context):
        x = self.resnets[0](x, emb)
        return self.resnets[1](self.attentions[0](x, context), emb)


class UpBlock(nn.Module):
    """A decoder stage: (layers_per_block + 1) x (concat a skip, resnet [+ transformer]), then Upsample."""

    def __init__(self, in_channels, skip_channels, out_channels, heads, cross_attention, add_upsample, emb_dim, config,
                 depth=1):
        super().__init__()
        layers = config.layers_per_block + 1
        # resnet j sees the previous output plus the skip saved by the mirrored encoder layer
        channels_in = [(in_channels if j == 0 else out_channels) + (skip_channels if j == layers - 1 else out_channels)
                       for j in range(layers)]
        self.resnets = nn.ModuleList([ResnetBlock(c, out_channels, emb_dim, config) for c in channels_in])
        # empty (no keys) in an attention-free stage
        self.attentions = nn.ModuleList(
            [Transformer2D(out_channels, heads, config, depth) for _ in channels_in] if cross_attention else []
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x, skips, emb, context):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), emb)  # (B, C + C_skip, H, W); the latest skip first
            x = self.attentions[i](x, context) if self.attentions else x
        return x if self.upsamplers is None else self.upsamplers[0](x)


class UNet(nn.Module):
    """The SD UNet: conv_in, down stages, mid-block, up stages fed the skips in reverse, conv_out."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels, heads, attn = config.block_out_channels, config.num_attention_heads, config.cross_attention
        if not len(channels) == len(heads) == len(attn):
            raise MinidiffError(f"block_out_channels {channels}, num_attention_heads {heads} and cross_attention "
                                f"{attn} must have one entry per stage")
        last, emb_dim = len(channels) - 1, 4 * channels[0]
        self.time_embedding = TimestepEmbedding(channels[0], emb_dim)
        if config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids -> added to emb
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], heads[i], attn[i], i < last, emb_dim, config,
                      config.transformer_depth(i))
            for i in range(len(channels))
        ])
        self.mid_block = (MidBlock(channels[-1], heads[-1], emb_dim, config, config.transformer_depth(last))
                          if config.mid_block else None)
        self.up_blocks = nn.ModuleList([
            UpBlock(channels[min(i + 1, last)], channels[max(i - 1, 0)], channels[i], heads[i], attn[i], i > 0,
                    emb_dim, config, config.transformer_depth(i))
            for i in reversed(range(len(channels)))
        ])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, x, t, context, added_cond_kwargs: dict | None = None):
        """eps_theta(x_t, t, c) (or v): x (B, in_channels, H, W), t a number or (B,), context (B, L, D);
        SDXL also added_cond_kwargs={"text_embeds": (B, 1280), "time_ids": (B, 6)}."""
        self._check_inputs(x, context)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim > 1 or t.numel() not in (1, x.shape[0]):
            raise MinidiffError(f"t has shape {tuple(t.shape)}: give one timestep, or one per batch item "
                                f"({x.shape[0]})")
        t = t.reshape(-1).expand(x.shape[0])
        pe = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                self.config.freq_shift)
        emb = self.time_embedding(pe.to(x.dtype))
        if self.config.addition_embed_type == "text_time":
            emb = emb + self.add_embedding(self.text_time_input(added_cond_kwargs, x.shape[0]).to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            taken = len(block.resnets)
            h = block(h, skips[-taken:], emb, context)
            del skips[-taken:]
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def text_time_input(self, added_cond_kwargs, batch: int):
        """SDXL's [text_embeds, PE(time_id_1), ..., PE(time_id_n)], (B, projection_class_embeddings_input_dim)."""
        config, added = self.config, added_cond_kwargs or {}
        text_embeds, time_ids = added.get("text_embeds"), added.get("time_ids")
        if text_embeds is None or time_ids is None or text_embeds.shape[0] != batch or time_ids.shape[0] != batch \
                or text_embeds.shape[-1] + time_ids.shape[-1] * config.addition_time_embed_dim \
                != config.projection_class_embeddings_input_dim:
            raise MinidiffError(f"this SDXL UNet needs added_cond_kwargs={{'text_embeds': (B, pooled), 'time_ids': "
                                f"(B, n)}} with B = {batch} and pooled + n x {config.addition_time_embed_dim} = "
                                f"{config.projection_class_embeddings_input_dim} (see minidiff.sdxl.time_ids)")
        pe = timestep_embedding(time_ids.flatten(), config.addition_time_embed_dim, config.flip_sin_to_cos,
                                config.freq_shift)
        return torch.cat([text_embeds, pe.reshape(batch, -1).to(text_embeds.dtype)], dim=-1)  # (B, pooled + n x PE)

    def _check_inputs(self, x, context):
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise MinidiffError(f"x has shape {tuple(x.shape)} but this UNet expects latents of shape "
                                f"(B, {config.in_channels}, H, W)")
        factor = config.downsample_factor
        if x.shape[2] % factor or x.shape[3] % factor:
            raise MinidiffError(
                f"latent size {x.shape[2]}x{x.shape[3]} is not a multiple of {factor}: the UNet halves it "
                f"{factor.bit_length() - 1} times (use an image size that is a multiple of {8 * factor} px)"
            )
        if context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise MinidiffError(f"context has shape {tuple(context.shape)}: expected (B, L, "
                                f"{config.cross_attention_dim}) with the batch B = {x.shape[0]} of x "
                                "(for guidance, batch [uncond, cond] in both)")
        if context.shape[-1] != config.cross_attention_dim:
            hint = {(1024, 768): ": an SD 2.x text encoder with an SD 1.x UNet?",
                    (768, 1024): ": an SD 1.x text encoder with an SD 2.x UNet?",
                    (768, 2048): ": SDXL cross-attends to both text encoders' states, concatenated (768 + 1280)"}
            raise MinidiffError(f"context has dim {context.shape[-1]} but this UNet expects "
                                f"{config.cross_attention_dim}"
                                + hint.get((context.shape[-1], config.cross_attention_dim), ""))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())

