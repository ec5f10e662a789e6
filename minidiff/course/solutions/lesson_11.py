"""Lesson 11, official weights: a diffusers unet/ folder (config.json + safetensors) into minidiff's UNet.

Notation (course/11_official_weights.md):
    folder   -> a diffusers component folder: config.json and diffusion_pytorch_model.safetensors
    state    -> {key: tensor}; the keys are diffusers' (down_blocks.0.resnets.0.conv1.weight, ...), equal to
                minidiff's attribute names, so loading is load_state_dict with strict=True
"""

import json
from pathlib import Path

from safetensors.torch import load_file

from minidiff.config import unet_from_diffusers
from minidiff.unet import UNet


def load_unet(folder):
    """A diffusers unet/ folder -> UNet: the config from config.json (minidiff.config.unet_from_diffusers), the
    weights from diffusion_pytorch_model.safetensors, loaded strictly (every key present, none left over)."""
    folder = Path(folder)
    unet = UNet(unet_from_diffusers(json.loads((folder / "config.json").read_text())))
    unet.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return unet.eval()
