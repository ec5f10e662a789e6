"""AutoencoderKL, the Stable Diffusion VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", section 3 and appendix G).

Notation:
    image           -> x in [-1, 1], (B, 3, H, W)
    mean, logvar    -> the diagonal Gaussian posterior q(z | x) = N(mean, exp(logvar))
    latent          -> z, (B, 4, H / 8, W / 8): the mean of q(z | x), or a sample of it; UNSCALED
    scaling_factor  -> 1 / std(z) over the training set (section 4.3.2, appendix D.1): the UNet sees
                       z * scaling_factor, and the pipeline undoes it before `decode`

The encoder halves H and W at every level but the last (three times for SD: 8x), then a resnet -> attention
-> resnet mid block; the decoder mirrors it with one more resnet per level. Attribute names are the
diffusers keys, so a diffusers `vae/` folder loads with a strict `load_state_dict`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.attention import attention
from minidiff.errors import MinidiffError


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels (RGB)
    out_channels: int = 3  # decoded image channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one per resolution level, highest first
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more per level
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    scaling_factor: float = 0.18215  # z * scaling_factor has roughly unit variance (SD 1.x/2.x value)
    force_upcast: bool = True  # a hint to pipelines: run this VAE in float32 even in a float16 pipeline

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise MinidiffError(
                f"VAEConfig: block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}; "
                "pick channel counts that are multiples of the group count"
            )

    @classmethod
    def sd(cls) -> "VAEConfig":
        """The SD 1.x / 2.x autoencoder (kl-f8, 83.7M parameters)."""
        return cls()

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """SD-XL's autoencoder: the same network, retrained, with its own latent scale."""
        return cls(scaling_factor=0.13025)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A few hundred thousand parameters, still 8x downsampling and 4 latent channels: for tests."""
        return cls(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)



def check_image(image: torch.Tensor, channels: int, downsample_factor: int) -> None:
    """MinidiffError unless `image` is (B, channels, H, W) with H and W multiples of `downsample_factor`."""
    if image.ndim != 4 or image.shape[1] != channels:
        raise MinidiffError(
            f"the VAE encodes images of shape (batch, {channels}, height, width), got {tuple(image.shape)}; "
            "add a batch dimension with image[None] or convert to RGB"
        )
    height, width = image.shape[-2:]
    if height % downsample_factor or width % downsample_factor:
        fit = lambda size: max(downsample_factor, round(size / downsample_factor) * downsample_factor)
        raise MinidiffError(
            f"image size {height}x{width} (height x width) is not a multiple of {downsample_factor}, which this VAE "
            f"needs; resize or crop it, e.g. to {fit(height)}x{fit(width)}"
        )


def check_latent(latent: torch.Tensor, channels: int) -> None:
    """MinidiffError unless `latent` is (B, channels, h, w)."""
    if latent.ndim != 4 or latent.shape[1] != channels:
        raise MinidiffError(
            f"the VAE decodes latents of shape (batch, {channels}, height, width), got {tuple(latent.shape)}; "
            "was it made for another model family (SD3 and FLUX latents have 16 channels)?"
        )


class ResnetBlock2D(nn.Module):
    """Two GroupNorm -> SiLU -> 3x3 conv layers plus a skip (He et al. 2016), 1x1-projected if channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Halve H and W: pad one zero row and column at the bottom/right, then a stride-2 3x3 conv (as SD trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention between all H*W positions, after a GroupNorm, added to the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the key name "to_out.0"
        self.kernel = None  # computes softmax(Q K^T / sqrt(d)) V; None: SDPA (see minidiff.attention)

    def forward(self, x):
        batch, channels, height, width = x.shape
        # (B, C, H, W) -> (B, HW, C)
        h = self.group_norm(x).flatten(2).transpose(1, 2)
        h = self.to_out[0](attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, kernel=self.kernel))
        # (B, HW, C) -> (B, C, H, W)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class UNetMidBlock2D(nn.Module):
    """resnet -> self-attention -> resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock2D(nn.Module):
    """One encoder level: `num_layers` resnets, then (all but the last level) a Downsample2D."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(channels[i], out_channels, groups) for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nn.Module):
    """One decoder level: `num_layers` resnets, then (all but the last level) an Upsample2D."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(channels[i], out_channels, groups) for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """image (B, 3, H, W) -> the mean and log-variance of q(z | x), stacked: (B, 2 * latent_channels, h, w)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, i < last)
            for i in range(last + 1)
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, image):
        x = self.conv_in(image)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent z (B, latent_channels, h, w) -> image (B, 3, H, W), the encoder mirrored."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups  # lowest resolution first
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, i < last)
            for i in range(last + 1)
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, latent):
        x = self.mid_block(self.conv_in(latent))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion: images in [-1, 1] <-> unscaled latents z."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """How many image pixels one latent pixel spans along each side (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False):
        """image (B, 3, H, W) in [-1, 1] -> z (B, 4, H/8, W/8): the posterior mean, or a sample if `sample`."""
        check_image(image, self.config.in_channels, self.downsample_factor)
        moments = self.quant_conv(self.encoder(image.to(self.quant_conv.weight.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        # drawn where the generator lives (CPU generators give the same noise on every device), like diffusers
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
        return mean + std * noise.to(mean.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """z (B, 4, h, w), unscaled -> image (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped).

        (minidiff.speed.vae_decode decodes in tiles, and redoes a float16 decode that overflows in float32.)
        """
        check_latent(latent, self.config.latent_channels)
        return self.decoder(self.post_quant_conv(latent.to(self.post_quant_conv.weight.dtype)))
