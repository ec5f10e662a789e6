"""Lesson 11, official weights: a diffusers unet/ folder (config.json + safetensors) into minidiff's UNet.

Notation (course/11_official_weights.md):
    folder   -> a diffusers component folder: config.json and diffusion_pytorch_model.safetensors
    state    -> {key: tensor}; the keys are diffusers' (down_blocks.0.resnets.0.conv1.weight, ...), equal to
                minidiff's attribute names, so loading is load_state_dict with strict=True
    rules    -> the key map of an original single-file checkpoint (minidiff.keymap.unet_rules(config)): a list of
                (original prefix, diffusers prefix, renames), e.g. ("input_blocks.1.0", "down_blocks.0.resnets.0",
                {"in_layers.0": "norm1", "in_layers.2": "conv1", ...})
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


def _longest(parts, table):
    """The longest leading run of the dotted `parts` that is a key of `table`, and the parts after it."""
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in table:
            return ".".join(parts[:cut]), parts[cut:]
    return None, parts


def rename_keys(state, rules):
    """An original single-file state dict (prefix model.diffusion_model. removed) -> diffusers keys, by `rules`.

    For each key, the rule whose original prefix is the longest match on whole dotted parts (input_blocks.1 is
    not a prefix of input_blocks.10.0.in_layers.0.weight) replaces that prefix with its diffusers prefix; then the
    longest of its renames that matches the start of the rest replaces that part:
    input_blocks.1.0.in_layers.0.weight -> down_blocks.0.resnets.0 + norm1 + weight. Keys no rule matches are left
    out. The tensors are not copied.
    """
    table = {old: (new, renames) for old, new, renames in rules}
    renamed = {}
    for key, value in state.items():
        head, rest = _longest(key.split("."), table)
        if head is None:
            continue
        new, renames = table[head]
        inner, tail = _longest(rest, renames)
        rest = [renames[inner], *tail] if inner is not None else rest
        renamed[".".join([new, *rest])] = value
    return renamed


# --- exercises (course/11_official_weights.md, "Exercises") ---


def _original_key(key):
    """The original single-file key (without model.diffusion_model.) of a diffusers UNet key of SD 1.5, by your
    rename_keys run the other way over minidiff.keymap's rules."""
    from minidiff import keymap
    from minidiff.config import unet_to_diffusers
    from minidiff.unet import UNetConfig

    rules = keymap.unet_rules(unet_to_diffusers(UNetConfig.sd15()))
    backwards = [(new, old, {b: a for a, b in renames.items()}) for old, new, renames in rules]
    return next(iter(rename_keys({key: None}, backwards)))


def exercise_11_1():
    """The original single-file key (without the prefix model.diffusion_model.) of SD 1.5's
    down_blocks.0.resnets.0.conv1.weight (a str)."""
    return _original_key("down_blocks.0.resnets.0.conv1.weight")


def exercise_11_2():
    """The original key of mid_block.attentions.0.proj_in.weight (a str)."""
    return _original_key("mid_block.attentions.0.proj_in.weight")
