"""LoRA: a low-rank update of a network's weights, loaded from a file and added beside each layer or merged into it.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") leaves a layer's weight W (out x in)
frozen and learns two thin matrices, down (rank x in) and up (out x rank), with rank much smaller than in and out:

    y = W x + scale * (alpha / rank) * up(down(x))      the forward of LoRALayer, unfused
    W' = W + scale * (alpha / rank) * up @ down         the same map, fused into the weight (`fuse_lora`)

Notation:
    down, up  -> A and B of the paper (PEFT's lora_A, lora_B; kohya's lora_down, lora_up); up starts at zero
    rank      -> r, the inner width; alpha -> the file's alpha (alpha = rank when a file has none)
    scale     -> the user's weight for this LoRA (`--lora file:0.8`); several LoRAs simply add up
For a convolution, down is a conv with the layer's kernel, stride and padding and up a 1x1 conv (kohya's LoCon).

Two file layouts are read (safetensors only), for the UNet and the text encoder(s):
    kohya / A1111   lora_unet_<module path with _>.lora_down.weight, .lora_up.weight, .alpha;
                    lora_te_ (lora_te1_, lora_te2_) for the text encoder(s); the UNet's original (ldm) names too
                    (lora_unet_input_blocks_1_1_proj_in), through minidiff.keymap
    diffusers/PEFT  unet.<module path>.lora_A.weight, .lora_B.weight (text_encoder.<...> likewise); alpha from the
                    "lora_adapter_metadata" header (lora_alpha, alpha_pattern, r, rank_pattern); the older
                    attention-processor names (attn1.processor.to_q_lora.down.weight, lora_linear_layer) too
A kohya name is a module path with its dots turned into underscores, so it is matched against the names of the
model's own layers (attribute names = diffusers keys), never parsed by hand.
"""

import json
import re
from pathlib import Path

import torch
from torch import nn

from minidiff import keymap
from minidiff.checkpoint import PICKLE_SUFFIXES, read_safetensors
from minidiff.config import to_diffusers
from minidiff.errors import CheckpointError, MinidiffError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
              "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
BUNDLE_PREFIX = "bundle_emb."  # kohya's words bundled into a LoRA file: bundle_emb.<token>.string_to_param.*
UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LyCORIS LoCon with a CP-decomposed "
               "middle (lora_mid)", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA bias"}


# --- the layer -------------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """One low-rank update: x -> (alpha / rank) * up(down(x)), shaped after the layer it sits beside."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__()
        rank = down.shape[0]
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features,
                                                                                            bias=False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down.weight = nn.Parameter(down.reshape(self.down.weight.shape).to(**like), requires_grad=False)
        self.up.weight = nn.Parameter(up.reshape(self.up.weight.shape).to(**like), requires_grad=False)
        self.rank, self.alpha = rank, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * up @ down, in the layer's weight shape (for a conv: up's 1x1 kernel times down's)."""
        up, down = self.up.weight.flatten(1), self.down.weight
        delta = up @ down.flatten(1) if down.ndim == 2 else torch.einsum("or,rikl->oikl", up, down)
        return delta * (self.alpha / self.rank)


class LoRALayer(nn.Module):
    """A Linear or Conv2d with LoRAs beside it: base(x) + sum of scale * lora(x), or fused into base's weight."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.loras = nn.ModuleDict()
        self.scales = {}  # LoRA name -> the user's scale
        self.original_weight = None  # base's weight before `fuse`, so that `unfuse` restores it exactly

    @property
    def fused(self) -> bool:
        return self.original_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.fused:
            for name, lora in self.loras.items():
                out = out + self.scales[name] * lora(x)
        return out

    @torch.no_grad()
    def fuse(self):
        """W <- W + sum of scale * delta W: one matmul per layer again, as fast as the plain model."""
        if self.fused:
            return
        self.original_weight = self.base.weight.detach().clone()
        for name, lora in self.loras.items():
            self.base.weight += self.scales[name] * lora.delta_weight()

    @torch.no_grad()
    def unfuse(self):
        """Put back the weight saved by `fuse`, bit for bit."""
        if self.fused:
            self.base.weight.copy_(self.original_weight)
            self.original_weight = None


# --- reading a file --------------------------------------------------------------------------------------------


def read_file(path) -> tuple[dict, dict]:
    """The tensors and the header metadata of a safetensors adapter file; pickles refused."""
    path = Path(path)
    if not path.is_file():
        raise MinidiffError(f"no such LoRA / embedding file: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle file, which can run code when read: minidiff loads adapters "
                              "from .safetensors only; use the safetensors version of this file")
    state = read_safetensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    return state, metadata


def split_kohya(state: dict) -> dict:
    """kohya keys -> {(component, kohya module name): {"down": ..., "up": ..., "alpha": ...}}."""
    groups = {}
    for key, value in state.items():
        lora_name, _, part = key.partition(".")
        prefix = next((p for p in KOHYA_PREFIXES if lora_name.startswith(p)), None)
        if prefix is None or part not in KOHYA_PARTS:
            raise CheckpointError(f"unexpected key {key!r} in a kohya LoRA: expected lora_unet_* / lora_te_* "
                                  "with .lora_down.weight, .lora_up.weight or .alpha")
        groups.setdefault((KOHYA_PREFIXES[prefix], lora_name[len(prefix):]), {})[KOHYA_PARTS[part]] = value
    with_alpha = [name for name, parts in groups.items() if "alpha" in parts]
    if with_alpha and len(with_alpha) < len(groups):
        missing = next(name for name, parts in groups.items() if "alpha" not in parts)
        raise CheckpointError(f"the LoRA has an alpha for {len(with_alpha)} of its {len(groups)} layers but none "
                              f"for {missing[1]!r}: the file is incomplete or was edited; re-export it")
    return groups


def _peft_key(key: str) -> tuple[str, str, str]:
    """'unet.a.b.lora_A.weight' -> ('unet', 'a.b', 'down'); the old attention-processor names are renamed first."""
    key = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.", lambda m: "." + m[1].replace("to_out", "to_out.0")
                 + ".lora.", key)
    component, _, rest = key.partition(".")
    for suffix, part in PEFT_PARTS.items():
        if rest.endswith("." + suffix):
            return component, rest[: -len(suffix) - 1], part
    raise CheckpointError(f"unexpected key {key!r} in a diffusers/PEFT LoRA: expected <module>.lora_A.weight, "
                          "<module>.lora_B.weight (or .alpha)")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the longest pattern that ends `name` at a dot."""
    matches = [p for p in patterns if re.fullmatch(rf"(.*\.)?({p})", name)]
    return patterns[max(matches, key=len)] if matches else default


def split_peft(state: dict, metadata: dict) -> dict:
    """diffusers/PEFT keys -> {(component, module name): {"down", "up", "alpha"}}, alpha from the metadata."""
    groups = {}
    for key, value in state.items():
        component, module, part = _peft_key(key)
        groups.setdefault((component, module), {})[part] = value
    configs = {}
    if "lora_adapter_metadata" in metadata:
        for key, value in json.loads(metadata["lora_adapter_metadata"]).items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
    for (component, module), parts in groups.items():
        config = configs.get(component)
        if config is None or "alpha" in parts or "down" not in parts:
            continue
        if config.get("use_dora") or config.get("lora_bias"):
            raise CheckpointError(f"the LoRA's metadata asks for {'DoRA' if config.get('use_dora') else 'a bias'}, "
                                  "which minidiff does not implement: use a plain LoRA")
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
        if rank is not None and rank != parts["down"].shape[0]:
            raise CheckpointError(f"{component}.{module}: the metadata says rank {rank} but lora_A has rank "
                                  f"{parts['down'].shape[0]}: the file's header and tensors disagree; re-export it")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
        if alpha is not None:
            parts["alpha"] = torch.tensor(float(alpha))
    return groups


def read_lora(path) -> dict:
    """A LoRA file -> {(component, module name or kohya name): {"down", "up", "alpha"?}}, and its layout."""
    state, metadata = read_file(path)
    state = {key: value for key, value in state.items() if not key.startswith(BUNDLE_PREFIX)}  # minidiff.embeddings
    if not state:
        raise CheckpointError(f"{path} holds no LoRA tensors: not a LoRA file")
    for marker, what in UNSUPPORTED.items():
        if any(marker in key for key in state):
            raise CheckpointError(f"{path} is a {what} adapter, which minidiff does not load: use a plain LoRA")
    if all(key.startswith(tuple(KOHYA_PREFIXES)) for key in state):
        return split_kohya(state), "kohya"
    if all(key.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for key in state):
        return split_peft(state, metadata), "peft"
    example = next(iter(state))
    raise CheckpointError(f"{path} is not a LoRA for a Stable Diffusion UNet / text encoder (first key {example!r}; "
                          "expected lora_unet_* / lora_te_* (kohya) or unet.* / text_encoder.* (diffusers/PEFT))")


# --- attaching to a model --------------------------------------------------------------------------------------


def lora_targets(model: nn.Module, prefix: str = "") -> dict:
    """The layers a LoRA can sit beside, by module path: every Linear and Conv2d (or the LoRALayer around one)."""
    found = {}
    for name, child in model.named_children():
        if isinstance(child, (LoRALayer, nn.Linear, nn.Conv2d)):
            found[prefix + name] = child
        else:
            found.update(lora_targets(child, f"{prefix}{name}."))
    return found


def _ldm_paths(model, targets: dict) -> dict:
    """{original (ldm) module path: minidiff path} of a UNet's layers: some kohya files use the original names
    (input_blocks_1_1_proj_in = down_blocks.0.attentions.0.proj_in), mapped by minidiff.keymap's rules."""
    if not hasattr(model.config, "block_out_channels"):
        return {}
    rules = keymap.invert(keymap.unet_rules(to_diffusers(model.config)))
    original, _ = keymap.rename({path: path for path in targets}, rules)
    return {ldm: path for ldm, path in original.items()}


def _find(targets: dict, key: str, layout: str, ldm: dict):
    """The module path that a file's name stands for, or None (kohya: dots written as underscores)."""
    if layout == "kohya":
        underscored = {path.replace(".", "_"): path for path in targets}
        underscored |= {path.replace(".", "_"): target for path, target in ldm.items()}
        return underscored.get(key)
    for path in (key, "text_model." + key):  # transformers >= 5 saves text encoders without "text_model."
        if path in targets:
            return path
    return None


def _base(layer: nn.Module) -> nn.Module:
    return layer.base if isinstance(layer, LoRALayer) else layer


def _check_shapes(where: str, base: nn.Module, down: torch.Tensor, up: torch.Tensor):
    """down (rank, in[, k, k]) and up (out, rank[, 1, 1]) must fit the layer; one line saying what does not."""
    if down.shape[0] != up.shape[1]:
        raise CheckpointError(f"{where}: lora_down has rank {down.shape[0]} but lora_up rank {up.shape[1]}: "
                              "the file is damaged or mixes two LoRAs")
    if isinstance(base, nn.Conv2d):
        kernel = tuple(down.shape[2:]) or (1, 1)
        fits = (down.shape[1], up.shape[0], kernel) == (base.in_channels, base.out_channels, base.kernel_size)
        fits = fits and up[0].numel() == down.shape[0]  # up is a 1x1 conv
        layer = f"a {base.kernel_size[0]}x{base.kernel_size[1]} conv {base.in_channels} -> {base.out_channels}"
        got = f"{kernel[0]}x{kernel[1]} {down.shape[1]} -> {up.shape[0]}"
    else:
        fits = down[0].numel() == base.in_features and up.shape[0] == base.out_features and up[0].numel() == \
            down.shape[0]
        layer = f"a linear {base.in_features} -> {base.out_features}"
        got = f"{down[0].numel()} -> {up.shape[0]}"
    if not fits:
        raise CheckpointError(f"{where}: the LoRA is shaped {got} but the layer is {layer}: it was made for another "
                              "base model (e.g. an SD 2.x or SDXL LoRA on SD 1.x)")


def _models(pipe) -> dict:
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def lora_layers(pipe) -> list:
    """Every LoRALayer of the pipeline's networks."""
    return [m for model in _models(pipe).values() for m in model.modules() if isinstance(m, LoRALayer)]


def loaded_loras(pipe) -> dict:
    """{LoRA name: scale} of the LoRAs attached to the pipeline."""
    return {name: scale for layer in lora_layers(pipe) for name, scale in layer.scales.items()}


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise MinidiffError(f"a LoRA scale must be a finite number (1.0 = as trained, 0 = off), got {scale!r}")
    return float(scale)


def load_lora(pipe, path, scale: float = 1.0, name: str | None = None) -> str:
    """Attach the LoRA in `path` to pipe.unet and pipe.text_encoder at `scale`; returns its name (default: file stem).

    Everything is checked before any layer is touched: a file that does not fit leaves the pipeline as it was.
    """
    scale = _check_scale(scale)
    name = name or Path(path).stem
    if name in loaded_loras(pipe):
        raise MinidiffError(f"a LoRA named {name!r} is already loaded: pass another name, or unload_lora({name!r})")
    if any(layer.fused for layer in lora_layers(pipe)):
        raise MinidiffError("the loaded LoRAs are fused into the weights: call unfuse_lora() before loading another")
    groups, layout = read_lora(path)
    models = _models(pipe)
    targets = {component: lora_targets(model) for component, model in models.items()}
    ldm = {component: _ldm_paths(model, targets[component]) if layout == "kohya" else {}
           for component, model in models.items()}
    plan, unmatched = [], []
    for (component, key), parts in groups.items():
        if component not in models:
            raise CheckpointError(f"{path} has layers for {component}, which this pipeline does not have: it was "
                                  "made for another base model (lora_te2_ / text_encoder_2: SDXL)")
        module = _find(targets[component], key, layout, ldm[component])
        if module is None:
            unmatched.append(f"{component}: {key}")
            continue
        where = f"{path}: {component}.{module}"
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{where} has only its {'up' if 'up' in parts else 'down'} matrix: the file is "
                                  "incomplete")
        _check_shapes(where, _base(targets[component][module]), parts["down"], parts["up"])
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else rank  # no alpha in the file: alpha = rank
        plan.append((models[component], module, parts["down"], parts["up"], alpha))
    if unmatched:
        raise CheckpointError(f"{path}: {len(unmatched)} of its {len(groups)} layers name no layer of this pipeline "
                              f"(e.g. {unmatched[0]}): it was made for another base model")
    for model, module, down, up, alpha in plan:
        parent_path, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = getattr(parent, child)
        if not isinstance(layer, LoRALayer):
            layer = LoRALayer(layer)
            setattr(parent, child, layer)
        layer.loras[name] = LoRA(layer.base, down, up, alpha)
        layer.scales[name] = scale
    return name


def set_lora_scale(pipe, name: str, scale: float):
    """Change the weight of a loaded LoRA (unfused LoRAs only)."""
    scale = _check_scale(scale)
    layers = [layer for layer in lora_layers(pipe) if name in layer.loras]
    if not layers:
        raise MinidiffError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(loaded_loras(pipe)) or 'none'})")
    if any(layer.fused for layer in layers):
        raise MinidiffError("the LoRAs are fused into the weights: call unfuse_lora() before changing a scale")
    for layer in layers:
        layer.scales[name] = scale


def fuse_lora(pipe):
    """Merge every loaded LoRA, at its scale, into the weights: sampling then costs what the plain model costs."""
    for layer in lora_layers(pipe):
        layer.fuse()


def unfuse_lora(pipe):
    """Restore the weights saved by fuse_lora exactly; the LoRAs run beside the layers again."""
    for layer in lora_layers(pipe):
        layer.unfuse()


def unload_lora(pipe, name: str | None = None):
    """Remove one LoRA (or all): the weights are restored and a layer left without LoRAs is the plain one again."""
    if name is not None and name not in loaded_loras(pipe):
        raise MinidiffError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(loaded_loras(pipe)) or 'none'})")
    for model in _models(pipe).values():
        for path, layer in list(model.named_modules()):
            if not isinstance(layer, LoRALayer):
                continue
            layer.unfuse()
            for lora_name in [n for n in layer.loras if name is None or n == name]:
                del layer.loras[lora_name], layer.scales[lora_name]
            if not layer.loras:
                parent_path, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_path), child, layer.base)
