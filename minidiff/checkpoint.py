"""Reading weight files and building a model from them, strictly: what every loader in load.py stands on.

    read_checkpoint(path)      the tensors of a .safetensors file (memory-mapped), or of a pickle with allow_pickle
    weights_file / read_config a component's weights and config.json in a diffusers folder (fp16 variants too)
    meta_model, build          a model built on the `meta` device, then given a state dict with assign=True
    check_state                every missing, unexpected or wrong-shape key named, with what it likely means

Pickle files (.ckpt, .pt, .pth, .bin) run code when unpickled: they are refused unless allow_pickle=True, and even
then read with torch.load(weights_only=True).
"""

import json
from pathlib import Path

import torch

from minidiff import keymap
from minidiff.checks import check_input_file, check_path_like, shown
from minidiff.errors import CheckpointError, MinidiffError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHTS_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model", "taesd": "diffusion_pytorch_model"}
LOADER = {"unet": "load_unet", "vae": "load_vae", "text_encoder": "load_text_encoder", "taesd": "load_taesd"}
CLASS_NAME = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "text_encoder_2": "CLIPTextModelWithProjection", "taesd": "AutoencoderTiny"}  # what config.json says
TEXT_CLASSES = {"CLIPTextModel", "CLIPTextModelWithProjection"}  # either may be read by load_text_encoder


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
        raise CheckpointError(f"{shown(path)} is damaged or incomplete ({shown(error)}): probably a download cut "
                              "short. Delete it and download it again") from None


def read_pickle(path, allow_pickle: bool) -> dict:
    """A .ckpt/.pt/.bin state dict, only with allow_pickle=True, and then with torch.load(weights_only=True)."""
    if not allow_pickle:
        raise CheckpointError(
            f"{shown(path)} is a pickle file: unpickling can run arbitrary code, so minidiff reads safetensors only. "
            "Use the .safetensors version of this checkpoint (most models publish one), or, only if you trust the "
            "file, pass allow_pickle=True from Python (load_pipeline, load_unet, ...): minidiff then reads its "
            "tensors with torch.load(weights_only=True)")
    import pickle

    def refused(reason):
        return CheckpointError(f"{shown(path)} could not be read with torch.load(weights_only=True): {reason}. "
                               "minidiff reads only tensors from a pickle; convert the file to safetensors with a "
                               "tool you trust")

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object that is not a tensor
        raise refused("it holds something other than tensors (Python objects, or damaged data)") from None
    except Exception:  # truncated, or not a torch file at all
        raise refused("it is damaged or not a PyTorch checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # original .ckpt files wrap it: {"state_dict": ..., "global_step": ...}
    if not isinstance(state, dict):
        raise refused(f"it holds a {type(state).__name__}, not a dict of tensors")
    return {key: value for key, value in state.items() if isinstance(key, str) and torch.is_tensor(value)}


def read_checkpoint(path, allow_pickle: bool = False) -> dict:
    """The tensors of one weights file, by name."""
    path = check_input_file(path, "the weights file")  # a regular, readable file: not a FIFO, folder or loop
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle)
    raise CheckpointError(f"{shown(path)}: not a weights file minidiff knows (.safetensors; or .ckpt/.pt/.bin "
                          "pickles)")


def locate(path) -> Path:
    """A path as given if it exists, else a known model name (see minidiff.hub) resolved in the local cache."""
    path = check_path_like("the model", path)
    if path.exists() or path.is_symlink():
        return check_input_file(path, "the model", folder_ok=True)
    from minidiff.hub import KNOWN_MODELS, resolve

    if str(path) in KNOWN_MODELS:
        return resolve(str(path))
    raise CheckpointError(f"no such file or folder: {shown(path)} (nor a known model name: "
                          f"{', '.join(KNOWN_MODELS)})")


def listing(folder: Path) -> list:
    """The entries of a folder, or a CheckpointError when it cannot be read."""
    try:
        return list(folder.iterdir())
    except OSError as error:
        raise CheckpointError(f"cannot list the folder {shown(folder)}: {error.strerror}. Check its permissions"
                              ) from None


def component_folder(path: Path, name: str) -> Path:
    """path itself if it is a `name` folder (has config.json), else path/name in a diffusers model folder."""
    if (path / "config.json").is_file() or (name == "tokenizer" and (path / "vocab.json").is_file()):
        return path
    if (path / name).is_dir():
        return path / name
    found = sorted(shown(p.name) for p in listing(path) if p.suffix in (".safetensors",) + PICKLE_SUFFIXES)
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
    present = sorted(p.name for p in listing(folder) if p.name.startswith(stem + "."))
    variants = [name for name in present if name.endswith(".safetensors")]
    if variant is None and len(variants) == 1:
        return folder / variants[0]
    if variants:  # stem.safetensors is variant=None, stem.fp16.safetensors variant='fp16'
        names = [repr(v[len(stem) + 1:-len(".safetensors")] or None) for v in variants]
        raise CheckpointError(f"no {wanted.name} in {shown(folder)}; it has {shown(', '.join(variants))}: "
                              f"choose one with variant=" + " or ".join(shown(n) for n in names))
    pickles = [folder / name for name in present if Path(name).suffix in PICKLE_SUFFIXES]
    if pickles:
        read_pickle(pickles[0], allow_pickle)  # explains the refusal unless allow_pickle
        return pickles[0]
    raise CheckpointError(f"no weights in {folder}: expected {wanted.name}")


def read_json(path: Path) -> dict:
    """A JSON object from a small regular file, or a CheckpointError saying what is wrong with it."""
    try:
        check_input_file(path, "the config file", max_bytes=16 * 2**20)
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON, bad UTF-8, or check_input_file's InputError
        reason = error if isinstance(error, MinidiffError) else shown(error)
        raise CheckpointError(f"cannot read {shown(path)}: {reason}") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{shown(path)} must hold a JSON object {{...}}, not a {type(found).__name__}")
    return found


def read_config(folder: Path, name: str) -> dict:
    """folder/config.json, checked to describe a `name` (diffusers' _class_name, transformers' architectures)."""
    config = read_json(folder / "config.json")
    found = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if found and found != CLASS_NAME[name] and not {found, CLASS_NAME[name]} <= TEXT_CLASSES:
        other = next((LOADER[k] for k, v in CLASS_NAME.items() if v == found), None)
        raise CheckpointError(f"{shown(folder / 'config.json')} describes a {shown(found)}, not a {CLASS_NAME[name]}"
                              + (f": load it with {other}" if other else ""))
    return config


# --- building a model from a state dict, strictly ---------------------------------------------------------------


def meta_model(model_class, config):
    """model_class(config) with parameters that take no memory and no time to initialise."""
    try:
        with torch.device("meta"):
            return model_class(config)
    except MinidiffError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"cannot build {model_class.__name__} from {config}: {shown(error)}. The config.json "
                              "is damaged or not for a Stable Diffusion network") from None


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
    return model.eval()


def check_state(model, state: dict, source) -> None:
    """CheckpointError naming every missing, unexpected and wrong-shape key, with a hint of what it means."""
    expected = model.state_dict()  # meta tensors: names and shapes only
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    not_float = [key for key in expected if key in state and expected[key].is_floating_point()
                 and not state[key].is_floating_point()]
    if not_float and not (missing or unexpected or wrong):
        found = ", ".join(f"{shown(k)} ({state[k].dtype})" for k in not_float[:4])
        raise CheckpointError(f"{shown(source)}: {len(not_float)} weight(s) are not floating point: {found}"
                              + (" ..." if len(not_float) > 4 else "") + ": the file is damaged or not a "
                              "checkpoint of this network")
    if not (missing or unexpected or wrong):
        return
    lines = [f"{shown(source)} does not fit {type(model).__name__}({model.config}):"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {label} key(s): {', '.join(shown(k) for k in keys[:6])}"
                         + (" ..." if len(keys) > 6 else ""))
    if wrong:
        shapes = [f"{shown(k)} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                  for k in wrong]
        lines.append(f"  {len(wrong)} wrong shape(s): " + "; ".join(shapes[:4]) + (" ..." if len(wrong) > 4 else ""))
    lines += [f"  -> {hint}" for hint in hints(expected, state, missing, unexpected, wrong)]
    raise CheckpointError(lines[0] + " " + "; ".join(line.strip() for line in lines[1:]))  # one line


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
        if key.endswith("attn2.to_k.weight") and found[1:] != want[1:]:
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
    if model_has:  # text_projection (SDXL's second encoder) sits beside text_model, never under it
        return {(k if k.startswith((prefix, "text_projection.")) else prefix + k): v for k, v in state.items()}
    return {k.removeprefix(prefix): v for k, v in state.items()}
