"""diffusers' config.json <-> minidiff's dataclass configs: the one place that speaks diffusers' option names.

A diffusers folder describes each network in a config.json (unet/, vae/, text_encoder/, and TAESD's own); minidiff's
models take a dataclass (UNetConfig, VAEConfig, CLIPTextConfig, TAESDConfig) with fewer, plainer fields. Reading is
strict: an option minidiff does not implement, set to a value that changes the network, is a CheckpointError that
names it, never silently dropped.

    from_diffusers(UNetConfig, json.load(open("unet/config.json")))  -> UNetConfig
    to_diffusers(UNetConfig.sd15())                                  -> the dict UNet2DConditionModel.from_config takes

The text encoder's config.json is transformers' CLIPTextConfig (in a diffusers folder's text_encoder/): the same two
functions read and write it.
"""

import dataclasses
from dataclasses import asdict, fields

from minidiff.checks import shown
from minidiff.clip import ACTIVATIONS, CLIPTextConfig
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.taesd import TAESDConfig
from minidiff.unet import UNetConfig
from minidiff.vae import VAEConfig


def from_diffusers(config_class, config: dict):
    """The `config_class` instance (UNetConfig, VAEConfig, CLIPTextConfig, TAESDConfig) a config.json dict describes."""
    if config_class not in _READERS:
        raise MinidiffError(f"no config.json reader for {config_class!r}: use one of "
                            f"{', '.join(c.__name__ for c in _READERS)}")
    if not isinstance(config, dict):
        raise CheckpointError(f"a config.json must hold a JSON object {{...}}, got {type(config).__name__}")
    check_types(config, config_class)
    found = _READERS[config_class](config)
    check_types(asdict(found), config_class)
    return found


def check_types(values: dict, config_class) -> None:
    """CheckpointError for a value of the wrong type (a string where a number belongs, a bool for a count ...):
    each field is compared with the type of its default in `config_class`."""
    for field in fields(config_class):
        if values.get(field.name) is None or field.default is dataclasses.MISSING or field.default is None:
            continue
        value, default = values[field.name], field.default
        items = default if isinstance(default, tuple) else (default,)
        if isinstance(default, tuple) or (isinstance(value, (list, tuple)) and isinstance(default, int)
                                          and not isinstance(default, bool)):  # diffusers allows per-stage lists
            given = value if isinstance(value, (list, tuple)) and value else None
        else:
            given = (value,)
        if given is None or not all(_same_kind(item, items[0]) for item in given):
            one, many = {bool: ("true or false", "booleans"), int: ("a whole number", "whole numbers"),
                         float: ("a number", "numbers"), str: ("a string", "strings")}.get(type(items[0]), ("?", "?"))
            kind = f"a non-empty list of {many}" if isinstance(default, tuple) else one
            raise CheckpointError(f"config.json option {field.name}={shown(json_text(value))} should be {kind} "
                                  f"(e.g. {json_text(list(default) if isinstance(default, tuple) else default)}): "
                                  "the file is damaged or not a Stable Diffusion config")


def _same_kind(value, example) -> bool:
    import math

    if isinstance(example, bool):
        return isinstance(value, bool)
    if isinstance(example, int):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if isinstance(example, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, type(example))


def json_text(value) -> str:
    import json

    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        return repr(value)


def to_diffusers(config) -> dict:
    """The config.json dict (diffusers', or transformers' for the text encoder) of a minidiff config."""
    if type(config) not in _WRITERS:
        raise MinidiffError(f"no config.json writer for {type(config).__name__}: use one of "
                            f"{', '.join(c.__name__ for c in _WRITERS)}")
    return _WRITERS[type(config)](config)


# --- the UNet: UNet2DConditionModel ------------------------------------------------------------------------------

def _per_stage(value, kind=tuple):
    """A per-stage list as `kind`, a single int as it is."""
    return kind(value) if isinstance(value, (list, tuple)) else value


def unet_from_diffusers(config: dict) -> UNetConfig:
    """From a diffusers `unet/config.json` dict; CheckpointError names any option minidiff lacks."""
    for key, value in config.items():
        if key.startswith("_") or key in _READ or key in _NO_EFFECT:  # _class_name, _diffusers_version
            continue
        if key not in _OFF:
            raise CheckpointError(f"unet config option {key!r} is unknown to minidiff: not an SD 1.x/2.x/XL UNet?")
        if not _is_off(value, _OFF[key]):
            raise CheckpointError(
                f"unet config option {key}={value!r} is not supported by minidiff "
                f"(it implements SD 1.x/2.x/XL UNets, where {key}={_OFF[key]!r})"
            )
    get = lambda key: config.get(key, _READ[key])
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if any(kind not in _DOWN_TYPES for kind in down) or up != [_DOWN_TYPES[kind] for kind in reversed(down)]:
        raise CheckpointError(
            f"unsupported unet blocks down={down} up={up}: minidiff builds CrossAttnDownBlock2D/DownBlock2D "
            "stages with the mirrored CrossAttnUpBlock2D/UpBlock2D stages"
        )
    if get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError(f"unet addition_embed_type {get('addition_embed_type')!r} is not supported: minidiff "
                              "implements None (SD 1.x/2.x) and 'text_time' (SDXL)")
    depth = get("transformer_layers_per_block")
    if isinstance(depth, (list, tuple)) and len(depth) != len(down):
        raise CheckpointError(f"transformer_layers_per_block={list(depth)} has {len(depth)} entries for {len(down)} "
                              "stages: give one per stage, or one number for all")
    if get("addition_embed_type") == "text_time" and not (get("addition_time_embed_dim")
                                                          and get("projection_class_embeddings_input_dim")):
        raise CheckpointError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")
    if get("mid_block_type") not in ("UNetMidBlock2DCrossAttn", None):
        raise CheckpointError(f"unsupported mid_block_type {get('mid_block_type')!r}: use UNetMidBlock2DCrossAttn")
    # diffusers calls the number of heads `attention_head_dim` (a historical misnomer it keeps for old configs)
    heads = config.get("num_attention_heads") or get("attention_head_dim")
    return UNetConfig(
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        block_out_channels=tuple(get("block_out_channels")),
        cross_attention=tuple(kind == "CrossAttnDownBlock2D" for kind in down),
        layers_per_block=_single(get("layers_per_block"), "layers_per_block"),
        num_attention_heads=tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(down),
        cross_attention_dim=_single(get("cross_attention_dim"), "cross_attention_dim"),
        use_linear_projection=get("use_linear_projection"),
        mid_block=get("mid_block_type") is not None,
        norm_num_groups=get("norm_num_groups"),
        norm_eps=get("norm_eps"),
        flip_sin_to_cos=get("flip_sin_to_cos"),
        freq_shift=get("freq_shift"),
        sample_size=_single(get("sample_size") or UNetConfig.sample_size, "sample_size"),
        transformer_layers_per_block=_per_stage(get("transformer_layers_per_block")),
        addition_embed_type=get("addition_embed_type"),
        addition_time_embed_dim=get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim"),
    )


def unet_to_diffusers(unet: UNetConfig) -> dict:
    """The diffusers `unet/config.json` dict of this network (UNet2DConditionModel.from_config takes it)."""
    down = ["CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in unet.cross_attention]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if unet.mid_block else None,
        "up_block_types": [_DOWN_TYPES[kind] for kind in reversed(down)],
        "block_out_channels": list(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block,
        "attention_head_dim": list(unet.num_attention_heads),  # diffusers' name for the number of heads
        "cross_attention_dim": unet.cross_attention_dim,
        "use_linear_projection": unet.use_linear_projection,
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": unet.norm_eps,
        "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
        "sample_size": unet.sample_size,
        "transformer_layers_per_block": _per_stage(unet.transformer_layers_per_block, list),
        "addition_embed_type": unet.addition_embed_type,
        "addition_time_embed_dim": unet.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": unet.projection_class_embeddings_input_dim,
    }


_DOWN_TYPES = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
# diffusers options read into UNetConfig, with diffusers' defaults (SD 1.x's but for cross_attention_dim) for configs
# that leave them out
_READ = {**unet_to_diffusers(UNetConfig()), "cross_attention_dim": 1280, "num_attention_heads": None}
# no effect on inference (dropout), or irrelevant to fp32 (upcast_attention), or unused unless another option is on
_NO_EFFECT = {"dropout", "upcast_attention", "addition_embed_type_num_heads"}
# options minidiff does not implement, with the value that switches them off (as in SD 1.x/2.x)
_OFF = {
    "center_input_sample": False, "only_cross_attention": False, "mid_block_only_cross_attention": None,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "class_embeddings_concat": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
}


def _is_off(value, off) -> bool:
    if isinstance(value, (list, tuple)):  # per-block values: all must be off
        return all(_is_off(item, off) for item in value)
    return value == off or (off is None and value is False)


def _single(value, key: str) -> int:
    """One value for all stages (diffusers also accepts a per-stage list)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{key}={value}: minidiff supports one value for all stages, not a list")
        value = value[0]
    return value


# --- the VAE and TAESD: AutoencoderKL, AutoencoderTiny --------------------------------------------------------


def vae_from_diffusers(config: dict) -> VAEConfig:
    """Read a diffusers `vae/config.json` dict; CheckpointError names any option this VAE does not have."""
    levels = len(config.get("block_out_channels", VAEConfig.block_out_channels))
    fixed = {  # options minidiff implements only one way: {key: allowed values}
        "act_fn": ("silu", "swish"),
        "down_block_types": (("DownEncoderBlock2D",) * levels,),
        "up_block_types": (("UpDecoderBlock2D",) * levels,),
        "shift_factor": (None, 0.0),
        "latents_mean": (None,),
        "latents_std": (None,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "mid_block_add_attention": (True,),
    }
    return VAEConfig(**read_diffusers_config(config, "AutoencoderKL", VAEConfig, fixed, ignored=("sample_size",)))


def vae_to_diffusers(vae: VAEConfig) -> dict:
    """The diffusers `vae/config.json` dict of this config."""
    levels = len(vae.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "act_fn": "silu"}
    config |= {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    config |= dataclasses.asdict(vae) | {"block_out_channels": list(vae.block_out_channels)}
    return config


def taesd_from_diffusers(config: dict) -> TAESDConfig:
    """Read a diffusers AutoencoderTiny `config.json` dict; CheckpointError names any option TAESD lacks."""
    fixed = {  # the one architecture TAESD has: {key: allowed values}
        "in_channels": (3,),
        "out_channels": (3,),
        "encoder_block_out_channels": ((64, 64, 64, 64),),
        "decoder_block_out_channels": ((64, 64, 64, 64),),
        "block_out_channels": ((64, 64, 64, 64),),
        "num_encoder_blocks": ((1, 3, 3, 3),),
        "num_decoder_blocks": ((3, 3, 3, 1),),
        "act_fn": ("relu",),
        "upsample_fn": ("nearest",),
        "upsampling_scaling_factor": (2,),
        "latent_magnitude": (3,),
        "latent_shift": (0.5,),
        "scaling_factor": (1.0,),
        "shift_factor": (0.0, None),
    }
    return TAESDConfig(**read_diffusers_config(config, "AutoencoderTiny", TAESDConfig, fixed,
                                               ignored=("force_upcast",)))


def taesd_to_diffusers(taesd: TAESDConfig) -> dict:
    """The diffusers AutoencoderTiny `config.json` dict of this config (its defaults plus latent_channels)."""
    return {"_class_name": "AutoencoderTiny", "latent_channels": taesd.latent_channels}


def read_diffusers_config(config: dict, class_name: str, config_class, fixed: dict, ignored=()) -> dict:
    """The keyword arguments of `config_class` in a diffusers config dict, refusing what it cannot express."""
    found = config.get("_class_name", class_name)
    if found != class_name:
        hint = " (load it with minidiff.taesd.TAESD)" if found == "AutoencoderTiny" else ""
        raise CheckpointError(f"this config describes a {found}, not an {class_name}{hint}")
    fields = {field.name for field in dataclasses.fields(config_class)}
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        value = tuple(value) if isinstance(value, (list, tuple)) else value  # JSON arrays arrive as lists
        if key in fields:
            kwargs[key] = value
        elif key not in fixed:
            raise CheckpointError(f"unsupported {class_name} option {key!r}={value!r}: minidiff does not implement it")
        elif value not in fixed[key]:
            allowed = " or ".join(repr(v) for v in fixed[key])
            raise CheckpointError(
                f"unsupported {class_name} option {key}={value!r}: minidiff implements only {allowed}"
            )
    return kwargs


# --- the text encoder: transformers' CLIPTextModel -------------------------------------------------------------


def clip_from_diffusers(config: dict) -> CLIPTextConfig:
    """Read a transformers `text_encoder/config.json` dict."""
    config = config.get("text_config", config)  # a full CLIPConfig nests the text tower
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures not in (["CLIPTextModel"], ["CLIPTextModelWithProjection"]):
        raise CheckpointError(
            f"text encoder architecture {architectures} is not supported: minidiff reads CLIPTextModel "
            "(SD 1.x/2.x, SDXL's first) and CLIPTextModelWithProjection (SDXL's second: with a text_projection)"
        )
    if config.get("hidden_act") not in ACTIVATIONS:
        raise CheckpointError(
            f"text encoder hidden_act {config.get('hidden_act')!r} is not supported: "
            f"minidiff implements {', '.join(ACTIVATIONS)}"
        )
    names = [field.name for field in fields(CLIPTextConfig) if field.name != "projection_dim"]
    missing = [name for name in names if name not in config]
    if missing:
        raise CheckpointError(f"text encoder config.json lacks {', '.join(missing)}: is it a CLIP text config?")
    projected = architectures == ["CLIPTextModelWithProjection"]  # transformers' default projection_dim: 512
    return CLIPTextConfig(**{name: config[name] for name in names},
                          projection_dim=config.get("projection_dim", 512) if projected else None)


def clip_to_diffusers(clip: CLIPTextConfig) -> dict:
    """The keyword arguments of transformers.CLIPTextConfig for the same model."""
    if clip.projection_dim is None:
        return {**{k: v for k, v in asdict(clip).items() if k != "projection_dim"}, "architectures": ["CLIPTextModel"]}
    return {**asdict(clip), "architectures": ["CLIPTextModelWithProjection"]}


_READERS = {UNetConfig: unet_from_diffusers, VAEConfig: vae_from_diffusers, TAESDConfig: taesd_from_diffusers,
            CLIPTextConfig: clip_from_diffusers}
_WRITERS = {UNetConfig: unet_to_diffusers, VAEConfig: vae_to_diffusers, TAESDConfig: taesd_to_diffusers,
            CLIPTextConfig: clip_to_diffusers}
