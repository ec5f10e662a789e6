"""TAESD, the tiny autoencoder (Ollin Boer Bohan 2023, https://github.com/madebyollin/taesd).

A 2.4M-parameter encoder/decoder distilled from the SD VAE: plain 3x3 convs and ReLUs, no norms, no attention.
It works directly in the SCALED latent space that the UNet sees (z * 0.18215 for SD 1.x/2.x), so its
`scaling_factor` is 1.0 and a pipeline's `vae.decode(latents / vae.scaling_factor)` works for both VAEs.

Notation:
    image   -> x in [-1, 1], (B, 3, H, W); TAESD itself works on [0, 1], converted at the edges
    latent  -> z * scaling_factor, (B, 4, H / 8, W / 8)
    3 * tanh(z / 3)  -> the soft clamp of latents into (-3, 3) at the decoder input

Attribute names are diffusers' AutoencoderTiny keys (encoder.layers.N..., decoder.layers.N...).
"""

from dataclasses import dataclass

import torch
from torch import nn

from minidiff.vae import check_image, check_latent


@dataclass
class TAESDConfig:
    latent_channels: int = 4  # 4 for the SD 1.x / 2.x / XL latent spaces (taesd, taesdxl)

    @classmethod
    def sd(cls) -> "TAESDConfig":
        """taesd / taesdxl: 4 latent channels."""
        return cls()



def conv(in_channels: int, out_channels: int, **kwargs) -> nn.Conv2d:
    """The 3x3, same-padding convolution everything in TAESD is made of."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, **kwargs)


class Block(nn.Module):
    """relu(x + conv(relu(conv(relu(conv(x)))))): a residual block of three convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(), conv(channels, channels)
        )
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)


class Layers(nn.Module):
    """A plain stack of layers, kept under `.layers` so the keys read encoder.layers.N like diffusers'."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class TAESD(nn.Module):
    """Tiny AutoEncoder for Stable Diffusion: images in [-1, 1] <-> scaled latents, with 1.2M + 1.2M parameters."""

    scaling_factor = 1.0  # its latents are already the UNet's
    downsample_factor = 8  # image pixels per latent pixel along each side

    def __init__(self, config: TAESDConfig | None = None):
        super().__init__()
        self.config = config or TAESDConfig()
        latent = self.config.latent_channels
        down = lambda: conv(64, 64, stride=2, bias=False)  # halve H and W
        up = lambda: (nn.Upsample(scale_factor=2), conv(64, 64, bias=False))  # double H and W
        self.encoder = Layers(
            conv(3, 64), Block(64),
            down(), Block(64), Block(64), Block(64),
            down(), Block(64), Block(64), Block(64),
            down(), Block(64), Block(64), Block(64),
            conv(64, latent),
        )  # fmt: skip
        self.decoder = Layers(
            conv(latent, 64), nn.ReLU(),
            Block(64), Block(64), Block(64), *up(),
            Block(64), Block(64), Block(64), *up(),
            Block(64), Block(64), Block(64), *up(),
            Block(64), conv(64, 3),
        )  # fmt: skip

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False):
        """image (B, 3, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8); deterministic (the arguments
        `generator` and `sample` exist only so TAESD and AutoencoderKL are called alike)."""
        check_image(image, 3, self.downsample_factor)
        image = image.to(self.encoder.layers[0].weight.dtype)
        return self.encoder((image + 1) / 2)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        check_latent(latent, self.config.latent_channels)
        latent = latent.to(self.decoder.layers[0].weight.dtype)
        return self.decoder(torch.tanh(latent / 3) * 3) * 2 - 1
