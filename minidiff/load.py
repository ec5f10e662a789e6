"""Loading the official weights: diffusers folders, original single-file checkpoints and TAESD; strict and fast.

Three layouts are read:
    a diffusers folder  model_index.json and unet/ vae/ text_encoder/ tokenizer/ scheduler/, each with its
                        config.json and diffusion_pytorch_model[.fp16].safetensors (text_encoder: model[...]);
                        a component folder works on its own too: load_unet("sd15/unet")
    an original file    v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.safetensors: the three networks in
                        one file in the CompVis layout; the architecture is read from the tensor shapes, and the
                        keys are converted by minidiff.keymap
    TAESD               madebyollin's taesd_encoder.safetensors + taesd_decoder.safetensors, or its diffusers folder

Strict: every missing, unexpected or wrong-shape key is named in a CheckpointError with what it likely means.
Fast: safetensors files are memory-mapped (a tensor is read from disk when used, never copied when its dtype and
device are already right), models are built on the `meta` device (no random initialisation) and
`load_state_dict(assign=True)` adopts the tensors, each converted to the wanted dtype and device once.
Pickle files (.ckpt, .pt, .pth, .bin) run code when unpickled: they are refused unless allow_pickle=True, and even
then read with torch.load(weights_only=True).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minidiff import keymap
from minidiff.errors import CheckpointError
from minidiff.schedule import NoiseSchedule, check_prediction_type
from minidiff.speed import cpu_defaults

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHTS_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "taesd": "diffusion_pytorch_model"}
LOADER = {"unet": "load_unet", "vae": "load_vae", "text_encoder": "load_text_encoder", "taesd": "load_taesd"}
CLASS_NAME = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "taesd": "AutoencoderTiny"}  # what each component's config.json says it is


# --- reading files ---------------------------------------------------------------------------------------------


def read_safetensors(path) -> dict:
    """All tensors of a .safetensors file, memory-mapped: nothing is read from disk until it is used."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as error:  # SafetensorError: a bad header, or a file shorter than its header says
        with open(path, "rb") as file:
            start = file.read(100)
        if start.startswith(b"version https://git-lfs"):
            raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in its "
                                  "repository, or download the model with `minidiff download NAME`") from None
        raise CheckpointError(f"{path} is damaged or incomplete ({error}): probably a download cut short. "
                              "Delete it and download it again") from None


def read_pickle(path, allow_pickle: bool) -> dict:
    """A .ckpt/.pt/.bin state dict, only with allow_pickle=True, and then with torch.load(weights_only=True)."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle file: unpickling can run arbitrary code, so minidiff reads safetensors only. "
            "Use the .safetensors version of this checkpoint (most models publish one), convert it with a tool "
            "you trust, or pass allow_pickle=True to read it with torch.load(weights_only=True)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError: it holds objects other than tensors
        raise CheckpointError(f"{path} could not be read with torch.load(weights_only=True): {error}") from None
    state = state.get("state_dict", state)  # original .ckpt files wrap it: {"state_dict": ..., "global_step": ...}
    return {key: value for key, value in state.items() if torch.is_tensor(value)}


def read_checkpoint(path, allow_pickle: bool = False) -> dict:
    """The tensors of one weights file, by name."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle)
    raise CheckpointError(f"{path}: not a weights file minidiff knows (.safetensors; or .ckpt/.pt/.bin pickles)")


def locate(path) -> Path:
    """A path as given if it exists, else a known model name (see minidiff.hub) resolved in the local cache."""
    if Path(path).exists():
        return Path(path)
    from minidiff.hub import KNOWN_MODELS, resolve

    if str(path) in KNOWN_MODELS:
        return resolve(str(path))
    raise CheckpointError(f"no such file or folder: {path} (nor a known model name: {', '.join(KNOWN_MODELS)})")


def component_folder(path: Path, name: str) -> Path:
    """path itself if it is a `name` folder (has config.json), else path/name in a diffusers model folder."""
    if (path / "config.json").is_file() or (name == "tokenizer" and (path / "vocab.json").is_file()):
        return path
    if (path / name).is_dir():
        return path / name
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES)
    hint = f"; it holds {', '.join(found)}: pass the file itself" if found else ""
    if (path / "model_index.json").is_file():
        raise CheckpointError(f"{path} is a diffusers model folder without a {name}/ folder{hint}")
    raise CheckpointError(f"{path} is neither a diffusers model folder (model_index.json, {name}/, ...) "
                          f"nor a {name} folder (config.json and its weights){hint}")


def weights_file(folder: Path, stem: str, variant, allow_pickle: bool) -> Path:
    """stem[.variant].safetensors in folder; without a variant, the only variant present (e.g. fp16) will do."""
    wanted = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    if wanted.is_file():
        return wanted
    present = sorted(p.name for p in folder.iterdir() if p.name.startswith(stem + "."))
    variants = [name for name in present if name.endswith(".safetensors")]
    if variant is None and len(variants) == 1:
        return folder / variants[0]
    if variants:
        raise CheckpointError(f"no {wanted.name} in {folder}; it has {', '.join(variants)}: "
                              f"choose one with variant=" + " or ".join(repr(v.split(".")[1]) for v in variants))
    pickles = [folder / name for name in present if Path(name).suffix in PICKLE_SUFFIXES]
    if pickles:
        read_pickle(pickles[0], allow_pickle)  # explains the refusal unless allow_pickle
        return pickles[0]
    raise CheckpointError(f"no weights in {folder}: expected {wanted.name}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def read_config(folder: Path, name: str) -> dict:
    """folder/config.json, checked to describe a `name` (diffusers' _class_name, transformers' architectures)."""
    config = read_json(folder / "config.json")
    found = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if found and found != CLASS_NAME[name]:
        other = next((LOADER[k] for k, v in CLASS_NAME.items() if v == found), None)
        raise CheckpointError(f"{folder / 'config.json'} describes a {found}, not a {CLASS_NAME[name]}"
                              + (f": load it with {other}" if other else ""))
    return config


# --- building a model from a state dict, strictly ---------------------------------------------------------------


def meta_model(model_class, config):
    """model_class(config) with parameters that take no memory and no time to initialise."""
    with torch.device("meta"):
        return model_class(config)


def build(model, state: dict, source, dtype=None, device=None):
    """A meta-device model checked against `state` key by key, then given its tensors (assign=True)."""
    check_state(model, state, source)
    dtype = dtype or torch.float32
    for key, tensor in state.items():  # one conversion per tensor; none when it is already right
        state[key] = tensor.to(device=device or "cpu", dtype=dtype if tensor.is_floating_point() else None)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the checkpoint cannot fill: a bug in the model class
        raise CheckpointError(f"{type(model).__name__} kept meta tensors after loading: {', '.join(left[:5])}")
    return cpu_defaults(model.eval())  # on a CPU, the kernels that measured faster there (minidiff.speed)


def check_state(model, state: dict, source) -> None:
    """CheckpointError naming every missing, unexpected and wrong-shape key, with a hint of what it means."""
    expected = model.state_dict()  # meta tensors: names and shapes only
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not fit {type(model).__name__}({model.config}):"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {label} key(s): {', '.join(keys[:6])}" + (" ..." if len(keys) > 6 else ""))
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model" for k in wrong]
        lines.append(f"  {len(wrong)} wrong shape(s): " + "; ".join(shapes[:4]) + (" ..." if len(wrong) > 4 else ""))
    lines += [f"  -> {hint}" for hint in hints(expected, state, missing, unexpected, wrong)]
    raise CheckpointError("\n".join(lines))


def hints(expected: dict, state: dict, missing: list, unexpected: list, wrong: list) -> list:
    """What a mismatch most likely means."""
    out = []
    if missing and len(missing) == len(expected):
        prefix = next((p for p in keymap.PREFIXES.values() if any(k.startswith(p) for k in unexpected)), None)
        if prefix:
            out.append(f"keys start with {prefix.rstrip('.')}: this is an original single-file checkpoint; "
                       "pass the .safetensors file itself to load_unet / load_vae / load_text_encoder")
        kind = kind_of(state)
        if kind and kind != kind_of(expected):
            out.append(f"this file holds a {kind}: load it with {LOADER[kind]}")
    for key in wrong:
        found, want = tuple(state[key].shape), tuple(expected[key].shape)
        if key.endswith("attn2.to_k.weight"):
            family = {768: "an SD 1.x", 1024: "an SD 2.x"}
            out.append(f"context dim {found[1]} vs {want[1]}: {family.get(found[1], 'a different')} checkpoint into "
                       f"{family.get(want[1], 'a different')} config")
        elif key.endswith("token_embedding.weight") and found[1] != want[1]:
            family = {768: "an SD 1.x (CLIP ViT-L)", 1024: "an SD 2.x (OpenCLIP ViT-H)"}
            out.append(f"text width {found[1]} vs {want[1]}: {family.get(found[1], 'a different')} text encoder "
                       f"into {family.get(want[1], 'a different')} config")
        elif key == "conv_in.weight" and found[1] != want[1]:
            extra = " (9: an inpainting UNet: latent + mask + masked image)" if found[1] == 9 else ""
            out.append(f"{found[1]} input channels vs {want[1]}{extra}")
        elif key.endswith("proj_in.weight") and len(found) != len(want):
            out.append("proj_in is linear in one and a 1x1 conv in the other: use_linear_projection differs "
                       "(SD 2.x: linear)")
        else:
            continue
        break  # one shape hint says it
    for side, keys in (("the file has no", missing), ("the config has no", unexpected)):
        if keys and all(".mid_block." in f".{k}" for k in keys):
            out.append(f"{side} mid block: BK-SDM small/tiny UNets drop it (UNetConfig.mid_block)")
    return out


def kind_of(state: dict):
    """Which network a state dict holds, from its keys."""
    keys = " ".join(list(state)[:2000])
    for kind, marker in (("unet", "time_embedding."), ("taesd", "encoder.layers."), ("vae", "encoder.down_blocks."),
                         ("text_encoder", "token_embedding.")):
        if marker in keys:
            return kind
    return None


def with_prefix_of(state: dict, model_keys, prefix: str = "text_model.") -> dict:
    """Add or drop `prefix` so the keys match the model's (transformers >= 5.6 saves CLIP without text_model.)."""
    model_has = any(key.startswith(prefix) for key in model_keys)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer in old files
    if model_has:
        return {(k if k.startswith(prefix) else prefix + k): v for k, v in state.items()}
    return {k.removeprefix(prefix): v for k, v in state.items()}


# --- the original single-file layout ----------------------------------------------------------------------------


def original_part(state: dict, prefix: str, path) -> dict:
    """The tensors under `prefix` with the prefix removed, or a CheckpointError saying what is missing."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(f"{path} has no {prefix}* tensors: not an original SD checkpoint with this network "
                              f"(it holds a {kind_of(state) or 'something else'})")
    return part


def inferred(infer, source, *args) -> dict:
    """keymap.infer_*_config(*args), with a missing or odd tensor reported as a CheckpointError."""
    try:
        return infer(*args)
    except (KeyError, StopIteration, ValueError, IndexError) as error:
        raise CheckpointError(f"cannot read the architecture from the tensors of {source} ({type(error).__name__}: "
                              f"{error}): not an SD 1.x/2.x checkpoint? Pass config=... to say what it is") from None


def converted(state: dict, component: str, config: dict, prefix: str) -> dict:
    """from_original, with the keys no rule knows kept under their original names so check_state names them."""
    state, unmatched = keymap.from_original(state, component, config)
    return state | {prefix + key: value for key, value in unmatched.items()}


# --- the public loaders -----------------------------------------------------------------------------------------


def read_component(path, name: str, variant, allow_pickle: bool):
    """(state, diffusers config dict or None for an original single file, folder or None, source file)."""
    path = locate(path)
    if path.is_dir():
        folder = component_folder(path, name)
        file = weights_file(folder, WEIGHTS_STEM[name], variant, allow_pickle)
        return read_checkpoint(file, allow_pickle), read_config(folder, name), folder, file
    state = read_checkpoint(path, allow_pickle)
    original = any(key.startswith(tuple(keymap.PREFIXES.values())) for key in state)
    if not original and (path.parent / "config.json").is_file():  # e.g. unet/diffusion_pytorch_model.safetensors
        return state, read_config(path.parent, name), path.parent, path
    return state, None, None, path


def scheduler_config(folder) -> dict:
    """scheduler/scheduler_config.json of the model a component folder belongs to ({} if there is none)."""
    for root in (folder, folder.parent) if folder else ():
        if (root / "scheduler" / "scheduler_config.json").is_file():
            return read_json(root / "scheduler" / "scheduler_config.json")
    return {}


def load_unet(path, dtype=None, device=None, variant=None, prediction_type=None, config=None, allow_pickle=False):
    """The UNet of a diffusers model (or its unet/ folder) or of an original single file.

    prediction_type (recorded as `unet.prediction_type`): by default from scheduler/scheduler_config.json, or for
    a single file "epsilon", except SD 2.x 768 px files ("v_prediction"). config: a UNetConfig, to override what
    is read from config.json or inferred from the shapes of a single file. dtype: default float32."""
    from minidiff.unet import UNet, UNetConfig

    state, found, folder, source = read_component(path, "unet", variant, allow_pickle)
    if found is None:  # an original single file
        state = original_part(state, keymap.PREFIXES["unet"], source)
        prediction_type = prediction_type or inferred(keymap.single_file_prediction_type, source, source, state)
        config = config or UNetConfig.from_diffusers(inferred(keymap.infer_unet_config, source, state,
                                                              prediction_type))
        state = converted(state, "unet", config.to_diffusers(), keymap.PREFIXES["unet"])
    else:
        config = config or UNetConfig.from_diffusers(found)
        prediction_type = prediction_type or scheduler_config(folder).get("prediction_type", "epsilon")
    check_prediction_type(prediction_type)
    unet = build(meta_model(UNet, config), state, source, dtype, device)
    unet.prediction_type = prediction_type
    return unet


def load_vae(path, dtype=None, device=None, variant=None, config=None, allow_pickle=False):
    """The AutoencoderKL of a diffusers model (or its vae/ folder), of an original single file, or an original
    standalone VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors). dtype: default float32."""
    from minidiff.vae import AutoencoderKL, VAEConfig

    state, found, _, source = read_component(path, "vae", variant, allow_pickle)
    if found is None:
        standalone = "encoder.down.0.block.0.conv1.weight" in state  # the VAE alone, without a prefix
        prefix = "" if standalone else keymap.PREFIXES["vae"]
        state = original_part(state, prefix, source)
        config = config or VAEConfig.from_diffusers(inferred(keymap.infer_vae_config, source, state))
        state = converted(state, "vae", config.to_diffusers(), prefix)
    else:
        config = config or VAEConfig.from_diffusers(found)
    return build(meta_model(AutoencoderKL, config), state, source, dtype, device)


def load_text_encoder(path, dtype=None, device=None, variant=None, config=None, allow_pickle=False):
    """The CLIP text encoder of a diffusers model (or its text_encoder/ folder) or of an original single file
    (SD 1.x: CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H/14 without its last layer). dtype: default float32."""
    from minidiff.clip import CLIPTextConfig, CLIPTextModel

    state, found, _, source = read_component(path, "text_encoder", variant, allow_pickle)
    if found is None:
        open_clip = any(key.startswith(keymap.PREFIXES["open_clip"]) for key in state)
        component = "open_clip" if open_clip else "clip"
        prefix = keymap.PREFIXES[component]
        state = original_part(state, prefix, source)
        preset = CLIPTextConfig.sd21() if open_clip else CLIPTextConfig.sd15()
        shapes = inferred(keymap.infer_text_config, source, state, open_clip)
        config = config or CLIPTextConfig.from_diffusers(preset.to_transformers() | shapes)
        state = converted(state, component, config.to_transformers(), prefix)
    else:
        config = config or CLIPTextConfig.from_diffusers(found)
    model = meta_model(CLIPTextModel, config)
    return build(model, with_prefix_of(state, model.state_dict()), source, dtype, device)


def load_tokenizer(path, allow_pickle=False):
    """The tokenizer/ folder of a diffusers model; for an original single file, the CLIP vocabulary shipped with
    minidiff (SD 2.x pads with "!", SD 1.x with <|endoftext|>)."""
    from minidiff.tokenizer import CLIPTokenizer

    path = locate(path)
    if path.is_dir():
        return CLIPTokenizer.from_folder(component_folder(path, "tokenizer"))
    state = read_checkpoint(path, allow_pickle)
    open_clip = any(key.startswith(keymap.PREFIXES["open_clip"]) for key in state)
    return CLIPTokenizer.sd21() if open_clip else CLIPTokenizer.sd15()


def load_taesd(path, dtype=None, device=None, allow_pickle=False):
    """TAESD from its diffusers folder (config.json + diffusion_pytorch_model.safetensors), or from
    madebyollin's taesd_encoder + taesd_decoder files (a folder holding them, or either file). dtype: float32."""
    from minidiff.taesd import TAESD, TAESDConfig

    path = locate(path)
    if path.is_dir() and (path / "config.json").is_file():
        state, found, _, source = read_component(path, "taesd", None, allow_pickle)
        return build(meta_model(TAESD, TAESDConfig.from_diffusers(found)), state, source, dtype, device)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.stem in ("taesd_encoder", "taesd_decoder")]
        if not files:
            raise CheckpointError(f"{path} holds no TAESD: expected config.json + diffusion_pytorch_model.safetensors"
                                  " or taesd_encoder.safetensors + taesd_decoder.safetensors")
        path = next((p for p in files if p.suffix == ".safetensors"), files[0])
    state = {}
    for part in ("encoder", "decoder"):
        file = path.with_name(path.name.replace("encoder", part).replace("decoder", part))
        if not file.is_file():
            raise CheckpointError(f"TAESD needs both halves: {file.name} is missing next to {path.name}")
        part_state = converted(read_checkpoint(file, allow_pickle), f"taesd_{part}", {}, f"{file.name}:")
        state |= part_state
    config = TAESDConfig(latent_channels=state["encoder.layers.14.weight"].shape[0])
    return build(meta_model(TAESD, config), state, path, dtype, device)


@dataclass
class Components:
    """Everything a Stable Diffusion pipeline is made of, loaded."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: NoiseSchedule
    prediction_type: str
    scheduler_config: dict  # the diffusers scheduler_config.json (timestep_spacing, steps_offset, ...)


def load_components(path, dtype=None, device=None, variant=None, prediction_type=None, allow_pickle=False):
    """UNet, VAE, text encoder, tokenizer and noise schedule of a diffusers model folder or an original file."""
    path = locate(path)
    options = dict(dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle)
    unet = load_unet(path, prediction_type=prediction_type, **options)
    found = scheduler_config(path) if path.is_dir() else {}
    if not found and path.is_dir():
        raise CheckpointError(f"{path} has no scheduler/scheduler_config.json: pass the model folder itself")
    found = found or {"timestep_spacing": "leading", "steps_offset": 1}  # what SD 1.x/2.x ship with
    found = found | {"prediction_type": unet.prediction_type}
    return Components(unet, load_vae(path, **options), load_text_encoder(path, **options),
                      load_tokenizer(path, allow_pickle), NoiseSchedule.from_config(found),
                      unet.prediction_type, found)
