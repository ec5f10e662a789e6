"""The original single-file layout (CompVis / Stability-AI "ldm") <-> the diffusers layout minidiff uses.

A checkpoint such as `v1-5-pruned-emaonly.safetensors` holds three networks under three prefixes:
    model.diffusion_model.*        the UNet (ldm openaimodel.py): input_blocks.N.{0 resnet, 1 transformer},
                                   middle_block.{0, 1, 2}, output_blocks.N.{0, 1, 2 upsampler}, time_embed, out
    first_stage_model.*            the VAE (ldm model.py): encoder.down.N.block.M, mid.block_1, mid.attn_1, ...
    cond_stage_model.transformer.* SD 1.x text encoder: Hugging Face CLIP, with or without `text_model.`
    cond_stage_model.model.*       SD 2.x text encoder: OpenCLIP, transformer.resblocks.N with fused q/k/v
SDXL's file (sd_xl_base_1.0.safetensors) keeps the UNet and VAE prefixes (its UNet adds label_emb, the size/crop
MLP) and holds two text encoders:
    conditioner.embedders.0.transformer.*  CLIP ViT-L, the Hugging Face layout (text_encoder)
    conditioner.embedders.1.model.*        OpenCLIP ViT-bigG, all 32 layers and its text_projection (text_encoder_2;
                                           the refiner has it alone, as conditioner.embedders.0.model.*)

Each map is a list of rules `(original prefix, diffusers prefix, renames)`, one per block, computed from the
config: a key is converted by its longest matching prefix, then `renames` apply to the rest of the key
(`in_layers.2` -> `conv1`). The same rules inverted write the original layout (`to_original`). Three changes
are more than a rename, and `from_original` / `to_original` make them:
    VAE attention q, k, v, proj_out are 1x1 convolutions (C, C, 1, 1) in the original, linear (C, C) here;
    OpenCLIP's fused attn.in_proj (3C, C) is q_proj, k_proj and v_proj stacked;
    OpenCLIP's last resblock, text_projection and logit_scale are dropped: SD 2.x conditions on the
    penultimate layer's output (then final_layer_norm), so its text encoder has one layer fewer.
The `infer_*_config` functions read the architecture (a diffusers / transformers config dict) from the tensor
shapes; what the shapes cannot tell is taken from the official configs: SD 1.x has 8 heads, SD 2.x heads of
64 channels; only the file name tells an SD 2.x v-prediction (768 px) model from an epsilon (512 px) one.
"""

from pathlib import Path

import torch

from minidiff.errors import CheckpointError

PREFIXES = {  # component -> its prefix in an original single-file checkpoint
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
    "open_clip": "cond_stage_model.model.",
    "clip_sdxl": "conditioner.embedders.0.transformer.",
    "open_clip_sdxl": "conditioner.embedders.1.model.",
    "open_clip_sdxl_refiner": "conditioner.embedders.0.model.",
}

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn": "self_attn",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")  # not part of the text encoder SD uses
TAESD_DEPTH = {"encoder": 15, "decoder": 20}  # len() of the original nn.Sequential encoder / decoder


def unet_rules(config: dict) -> list:
    """ldm UNetModel -> diffusers UNet2DConditionModel, from a diffusers unet/config.json dict."""
    down, up, per_block = config["down_block_types"], config["up_block_types"], config["layers_per_block"]
    rules = [("time_embed.0", "time_embedding.linear_1", {}), ("time_embed.2", "time_embedding.linear_2", {}),
             ("input_blocks.0.0", "conv_in", {}), ("out.0", "conv_norm_out", {}), ("out.2", "conv_out", {})]
    if config.get("addition_embed_type") == "text_time":  # SDXL's MLP of the pooled text and the size/crop ids
        rules += [("label_emb.0.0", "add_embedding.linear_1", {}), ("label_emb.0.2", "add_embedding.linear_2", {})]
    index = 1  # input_blocks.0 is conv_in; then each stage's resnets, then its downsampler
    for stage, kind in enumerate(down):
        for j in range(per_block):
            rules.append((f"input_blocks.{index}.0", f"down_blocks.{stage}.resnets.{j}", UNET_RESNET))
            if kind.startswith("CrossAttn"):
                rules.append((f"input_blocks.{index}.1", f"down_blocks.{stage}.attentions.{j}", {}))
            index += 1
        if stage < len(down) - 1:
            rules.append((f"input_blocks.{index}.0.op", f"down_blocks.{stage}.downsamplers.0.conv", {}))
            index += 1
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        rules += [("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
                  ("middle_block.1", "mid_block.attentions.0", {}),
                  ("middle_block.2", "mid_block.resnets.1", UNET_RESNET)]
    index = 0  # each up stage has one resnet more than its down stage; the upsampler joins the last of them
    for stage, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        for j in range(per_block + 1):
            rules.append((f"output_blocks.{index}.0", f"up_blocks.{stage}.resnets.{j}", UNET_RESNET))
            if attention:
                rules.append((f"output_blocks.{index}.1", f"up_blocks.{stage}.attentions.{j}", {}))
            index += 1
        if stage < len(up) - 1:
            rules.append((f"output_blocks.{index - 1}.{2 if attention else 1}.conv",
                          f"up_blocks.{stage}.upsamplers.0.conv", {}))
    return rules


def vae_rules(config: dict) -> list:
    """ldm AutoencoderKL -> diffusers AutoencoderKL, from a diffusers vae/config.json dict."""
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    rules = [(name, name, {}) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {}),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET)]
    for level in range(levels):
        rules += [(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET)
                  for j in range(per_block)]
        if level < levels - 1:
            rules.append((f"encoder.down.{level}.downsample.conv",
                          f"encoder.down_blocks.{level}.downsamplers.0.conv", {}))
        # the original decoder numbers its levels from the lowest resolution up: up.{levels-1} runs first
        stage = levels - 1 - level
        rules += [(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{stage}.resnets.{j}", VAE_RESNET)
                  for j in range(per_block + 1)]
        if level > 0:
            rules.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{stage}.upsamplers.0.conv", {}))
    return rules


def clip_rules(legacy: bool = True) -> list:
    """SD 1.x: the Hugging Face CLIP layout already; `legacy` also reads files without the `text_model.` level."""
    names = ("embeddings", "encoder", "final_layer_norm") if legacy else ()
    return [("text_model", "text_model", {})] + [(name, f"text_model.{name}", {}) for name in names]


def open_clip_rules(num_layers: int, projected: bool = False) -> list:
    """SD 2.x: OpenCLIP ViT-H/14's text tower -> CLIPTextModel, for the first `num_layers` resblocks; SDXL
    (projected): ViT-bigG/14's whole tower -> CLIPTextModelWithProjection."""
    rules = [("text_projection", "text_projection.weight", {})] if projected else []
    rules += [("token_embedding", "text_model.embeddings.token_embedding", {}),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight", {}),
             ("ln_final", "text_model.final_layer_norm", {})]
    return rules + [(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPEN_CLIP_LAYER)
                    for i in range(num_layers)]


def taesd_rules(part: str) -> list:
    """madebyollin's taesd_encoder / taesd_decoder nn.Sequential -> AutoencoderTiny's encoder/decoder.layers.

    The original decoder starts with a parameter-free Clamp module that diffusers folds into forward(),
    so its layer N is diffusers' layer N - 1."""
    shift = 1 if part == "decoder" else 0
    return [(str(i), f"{part}.layers.{i - shift}", {}) for i in range(shift, TAESD_DEPTH[part])]


# --- applying the rules ----------------------------------------------------------------------------------------


def invert(rules: list) -> list:
    """The rules that map the other way."""
    return [(new, old, {b: a for a, b in renames.items()}) for old, new, renames in rules]


def _longest_prefix(key: str, table: dict):
    """The longest dotted prefix of `key` in `table` (the whole key included), and the rest of the key."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return head, ".".join(parts[cut:])
    return None, key


def rename(state: dict, rules: list) -> tuple[dict, dict]:
    """Rename every key of `state` by `rules`; returns (renamed state, the entries no rule matches)."""
    table = {old: (new, renames) for old, new, renames in rules}
    out, unmatched = {}, {}
    for key, value in state.items():
        head, rest = _longest_prefix(key, table)
        if head is None:
            unmatched[key] = value
            continue
        new, renames = table[head]
        inner, tail = _longest_prefix(rest, renames) if rest else (None, rest)
        if inner is not None:
            rest = ".".join(filter(None, [renames[inner], tail]))
        out[".".join(filter(None, [new, rest]))] = value
    return out, unmatched


def from_original(state: dict, component: str, config: dict) -> tuple[dict, dict]:
    """One component's tensors of an original checkpoint (prefix already removed) -> diffusers keys.

    component: "unet", "vae", "clip", "open_clip", "taesd_encoder" or "taesd_decoder"; config: the diffusers
    config dict of the network (for open_clip: {"num_hidden_layers": N}). Tensors stay views of the input.
    Returns (converted state, the entries no rule matches)."""
    if component == "clip":
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    if component == "vae":
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # the training loss's networks
    if component == "open_clip":
        unused = OPEN_CLIP_UNUSED[1:] if config.get("projection_dim") else OPEN_CLIP_UNUSED  # SDXL keeps the projection
        state = {k: v for k, v in state.items() if k not in unused}
        unused = f"transformer.resblocks.{config['num_hidden_layers']}."  # the last resblock: SD skips it
        state = {k: v for k, v in state.items() if not k.startswith(unused)}
    out, unmatched = rename(state, _rules(component, config))
    for key in list(out):
        if component == "open_clip" and key == "text_projection.weight":
            out[key] = out[key].T.contiguous()  # OpenCLIP multiplies x @ P; a linear layer stores P^T
        if component == "vae" and ".mid_block.attentions.0.to_" in key and out[key].ndim == 4:
            out[key] = out[key][:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        if key.endswith((".in_proj_weight", ".in_proj_bias")):
            fused, kind = out.pop(key), key.rsplit("_", 1)[1]
            base = key.rsplit(".", 1)[0]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                out[f"{base}.{name}.{kind}"] = part
    return out, unmatched


def to_original(state: dict, component: str, config: dict) -> dict:
    """The inverse of `from_original` (diffusers keys -> original keys, prefix not added); for tests and export.

    For open_clip the unused last resblock and text_projection are not written."""
    if component in ("clip", "open_clip"):  # transformers >= 5.6 saves CLIPTextModel without `text_model.`
        state = {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
                 for k, v in state.items()}
    state = dict(state)
    for key in [k for k in state if component == "open_clip" and k.endswith((".q_proj.weight", ".q_proj.bias"))]:
        base, kind = key.rsplit(".q_proj.", 1)
        parts = [state.pop(f"{base}.{name}.{kind}") for name in ("q_proj", "k_proj", "v_proj")]
        state[f"{base}.in_proj_{kind}"] = torch.cat(parts, dim=0)
    rules = clip_rules(legacy=False) if component == "clip" else _rules(component, config)
    out, unmatched = rename(state, invert(rules))
    if unmatched:
        raise KeyError(f"no rule for {list(unmatched)[:5]} ({len(unmatched)} keys)")
    if "text_projection" in out:
        out["text_projection"] = out["text_projection"].T.contiguous()
    for key in out:
        if component == "vae" and ".mid.attn_1." in key and key.endswith("weight") and out[key].ndim == 2:
            out[key] = out[key][:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
    return out


def _rules(component: str, config: dict) -> list:
    if component == "unet":
        return unet_rules(config)
    if component == "vae":
        return vae_rules(config)
    if component == "clip":
        return clip_rules()
    if component == "open_clip":
        return open_clip_rules(config["num_hidden_layers"], bool(config.get("projection_dim")))
    if component in ("taesd_encoder", "taesd_decoder"):
        return taesd_rules(component.split("_")[1])
    raise ValueError(f"unknown component {component!r}")


# --- the architecture, from the shapes of an original checkpoint ---------------------------------------------


def infer_unet_config(state: dict, prediction_type) -> dict:
    """The diffusers unet config of an ldm UNetModel state dict (keys without model.diffusion_model.)."""
    first = state["input_blocks.0.0.weight"]
    inputs = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    stages = 1 + sum(1 for k in state if k.startswith("input_blocks.") and k.endswith(".0.op.weight"))
    per_block = (inputs - stages) // stages  # inputs = 1 + stages * per_block + (stages - 1) downsamplers
    starts = [1 + stage * (per_block + 1) for stage in range(stages)]
    channels = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in starts]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in state for i in starts]
    to_k = next(v for k, v in state.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in state.items() if k.endswith("proj_in.weight"))
    # transformer blocks per Transformer2D in each stage (1 where a stage has no attention, as diffusers writes it)
    blocks = lambda start: len({k[len(start):].split(".")[0] for k in state if k.startswith(start)})
    depths = [blocks(f"input_blocks.{i}.1.transformer_blocks.") for i in starts]  # 0 where a stage has no attention
    used = {d for d in depths if d} | {blocks("middle_block.1.transformer_blocks.")} - {0}
    context = to_k.shape[1]
    added = state.get("label_emb.0.0.weight")  # SDXL: the MLP of [pooled text, PE(time ids)]
    # not in the weights: SD 1.x uses 8 heads; SD 2.x (OpenCLIP context, 1024) and SDXL heads of 64 channels
    heads = [c // 64 for c in channels] if context == 1024 or added is not None else [8] * stages
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    return {
        "in_channels": first.shape[1], "out_channels": state["out.2.weight"].shape[0], "down_block_types": down,
        "up_block_types": [kind.replace("Down", "Up") for kind in reversed(down)], "block_out_channels": channels,
        "layers_per_block": per_block, "attention_head_dim": heads, "cross_attention_dim": context,
        "use_linear_projection": proj_in.ndim == 2,
        "transformer_layers_per_block": used.pop() if len(used) == 1 else [d or 1 for d in depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "middle_block.1.proj_in.weight" in state else None,
        # 1024 px SDXL, 768 px v-models, 512 px otherwise
        "sample_size": 128 if added is not None else 96 if prediction_type == "v_prediction" else 64,
        # SDXL: each time id gets a 256-wide PE (not in the weights: the official value)
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": added.shape[1]} if added is not None else {}),
    }


def infer_vae_config(state: dict) -> dict:
    """The diffusers vae config of an ldm AutoencoderKL state dict (keys without first_stage_model.)."""
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    per_block = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "block_out_channels": [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        "layers_per_block": per_block, "latent_channels": state["post_quant_conv.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def infer_text_config(state: dict, open_clip: bool, projected: bool = False) -> dict:
    """The transformers config of the text encoder in an original checkpoint (keys without the prefix).

    projected: SDXL's OpenCLIP ViT-bigG, kept whole with its text_projection (SD 2.x drops the last layer)."""
    if open_clip:  # SD 2.x: OpenCLIP ViT-H/14 without its last resblock
        vocab, width = state["token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
        extra = {"projection_dim": state["text_projection"].shape[1]} if projected else {}
        return {**extra, "vocab_size": vocab, "hidden_size": width, "hidden_act": "gelu",
                "num_hidden_layers": layers if projected else layers - 1,
                "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                "num_attention_heads": width // 64, "max_position_embeddings": state["positional_embedding"].shape[0]}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    vocab, width = state["embeddings.token_embedding.weight"].shape
    return {"vocab_size": vocab, "hidden_size": width, "hidden_act": "quick_gelu", "num_attention_heads": width // 64,
            "num_hidden_layers": 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")),
            "intermediate_size": state["encoder.layers.0.mlp.fc1.weight"].shape[0],
            "max_position_embeddings": state["embeddings.position_embedding.weight"].shape[0]}


def single_file_prediction_type(path: Path, unet_state: dict) -> str:
    """SD 1.x predicts eps; SD 2.x 768 px models predict v, and only the file name can tell which one this is."""
    context = next(v.shape[1] for k, v in unet_state.items() if k.endswith("attn2.to_k.weight"))
    name = path.name.lower()
    if context != 1024 or "label_emb.0.0.weight" in unet_state or "512" in name or "base" in name:
        return "epsilon"
    if "768" in name:
        return "v_prediction"
    raise CheckpointError(f"{path} is an SD 2.x checkpoint, and the weights do not say what it predicts: pass "
                          "prediction_type='v_prediction' (the 768 px models, e.g. v2-1_768-ema-pruned) or "
                          "'epsilon' (the 512 px base models)")


# --- SDXL's text encoders in the original single file (sd_xl_base_1.0.safetensors) ------------------------------


def is_sdxl_file(state: dict) -> bool:
    """An original SDXL checkpoint (base or refiner): its text encoders live under conditioner.embedders.N."""
    return any(key.startswith("conditioner.embedders.") for key in state)


def is_sdxl_refiner_file(state: dict) -> bool:
    """The original SDXL refiner file: OpenCLIP bigG alone, as conditioner.embedders.0 (no CLIP ViT-L)."""
    has = lambda name: any(key.startswith(PREFIXES[name]) for key in state)
    return has("open_clip_sdxl_refiner") and not has("clip_sdxl")


def single_file_text_encoder(state: dict, part: str, source) -> tuple:
    """(keymap component, prefix) of text_encoder or text_encoder_2 in an original file; CheckpointError if absent."""
    prefixes = PREFIXES
    has = lambda name: any(key.startswith(prefixes[name]) for key in state)
    if not is_sdxl_file(state):
        if part == "text_encoder_2":
            raise CheckpointError(f"{source} is not an SDXL checkpoint: it has one text encoder, no text_encoder_2")
        return ("open_clip", prefixes["open_clip"]) if has("open_clip") else ("clip", prefixes["clip"])
    if part == "text_encoder_2":
        for name in ("open_clip_sdxl", "open_clip_sdxl_refiner"):
            if has(name):
                return "open_clip", prefixes[name]
        raise CheckpointError(f"{source} has no second text encoder ({prefixes['open_clip_sdxl']}*, OpenCLIP "
                              "ViT-bigG): SDXL needs both; the file is incomplete")
    if has("clip_sdxl"):
        return "clip", prefixes["clip_sdxl"]
    if has("open_clip_sdxl_refiner"):
        raise CheckpointError(f"{source} is the SDXL refiner (OpenCLIP bigG alone, no CLIP ViT-L): it refines a base "
                              "model's latents; load the base model (sd_xl_base_1.0, `minidiff download sdxl`)")
    raise CheckpointError(f"{source} has no first text encoder ({prefixes['clip_sdxl']}*, CLIP ViT-L): "
                          "SDXL needs both; the file is incomplete")
