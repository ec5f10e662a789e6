"""Loading the official weights: diffusers folders, original single-file checkpoints and TAESD; strict and fast.

Three layouts are read:
    a diffusers folder  model_index.json and unet/ vae/ text_encoder/ tokenizer/ scheduler/, each with its
                        config.json and diffusion_pytorch_model[.fp16].safetensors (text_encoder: model[...]);
                        a component folder works on its own too: load_unet("sd15/unet")
    an original file    v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.safetensors: the three networks in
                        one file in the CompVis layout; the architecture is read from the tensor shapes, and the
                        keys are converted by minidiff.keymap; SDXL's sd_xl_base_1.0.safetensors has two text
                        encoders (text_encoder and text_encoder_2, as in its diffusers folder)
    TAESD               madebyollin's taesd_encoder.safetensors + taesd_decoder.safetensors, or its diffusers folder

Strict: every missing, unexpected or wrong-shape key is named in a CheckpointError with what it likely means.
Fast: safetensors files are memory-mapped (a tensor is read from disk when used, never copied when its dtype and
device are already right), models are built on the `meta` device (no random initialisation) and
`load_state_dict(assign=True)` adopts the tensors, each converted to the wanted dtype and device once.
Pickle files (.ckpt, .pt, .pth, .bin) run code when unpickled: they are refused unless allow_pickle=True, and even
then read with torch.load(weights_only=True).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from minidiff import keymap
from minidiff.checkpoint import (
    WEIGHTS_STEM,
    build,
    component_folder,
    kind_of,
    locate,
    meta_model,
    read_checkpoint,
    read_config,
    read_json,
    weights_file,
    with_prefix_of,
)
from minidiff.checks import check_input_file, shown
from minidiff.config import from_diffusers, to_diffusers
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.schedule import NoiseSchedule, check_prediction_type
from minidiff.speed import cpu_defaults


def built(model, state: dict, source, dtype=None, device=None):
    """checkpoint.build, then, on a CPU, the kernels that measured faster there (minidiff.speed.cpu_defaults)."""
    return cpu_defaults(build(model, state, source, dtype, device))


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
    except CheckpointError:  # already names the problem (a ValueError too)
        raise
    except (KeyError, StopIteration, ValueError, IndexError) as error:
        raise CheckpointError(f"cannot read the architecture from the tensors of {shown(source)} "
                              f"({type(error).__name__}: {shown(error)}): not an SD 1.x/2.x checkpoint? "
                              "Pass config=... to say what it is") from None


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
        config = config or from_diffusers(UNetConfig, inferred(keymap.infer_unet_config, source, state,
                                                              prediction_type))
        state = converted(state, "unet", to_diffusers(config), keymap.PREFIXES["unet"])
    else:
        config = config or from_diffusers(UNetConfig, found)
        prediction_type = prediction_type or scheduler_config(folder).get("prediction_type", "epsilon")
    check_prediction_type(prediction_type)
    unet = built(meta_model(UNet, config), state, source, dtype, device)
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
        sdxl = keymap.is_sdxl_file(state)
        scale = {"scaling_factor": VAEConfig.sdxl().scaling_factor} if sdxl else {}  # not in the weights
        state = original_part(state, prefix, source)
        config = config or from_diffusers(VAEConfig, inferred(keymap.infer_vae_config, source, state) | scale)
        state = converted(state, "vae", to_diffusers(config), prefix)
    else:
        config = config or from_diffusers(VAEConfig, found)
    return built(meta_model(AutoencoderKL, config), state, source, dtype, device)


def load_text_encoder(path, dtype=None, device=None, variant=None, config=None, allow_pickle=False,
                      part="text_encoder"):
    """The CLIP text encoder of a diffusers model (or its text_encoder/ folder) or of an original single file
    (SD 1.x: CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H/14 without its last layer). dtype: default float32.
    part="text_encoder_2": SDXL's second encoder, OpenCLIP ViT-bigG/14 with its text_projection."""
    from minidiff.clip import CLIPTextConfig, CLIPTextModel

    state, found, _, source = read_component(path, part, variant, allow_pickle)
    if found is None:
        component, prefix = keymap.single_file_text_encoder(state, part, source)
        open_clip, projected = component == "open_clip", prefix.startswith("conditioner.")
        state = original_part(state, prefix, source)
        preset = CLIPTextConfig.sdxl_bigg() if open_clip and projected else \
            CLIPTextConfig.sd21() if open_clip else CLIPTextConfig.sd15()
        shapes = inferred(keymap.infer_text_config, source, state, open_clip, open_clip and projected)
        config = config or from_diffusers(CLIPTextConfig, to_diffusers(preset) | shapes)
        state = converted(state, component, to_diffusers(config), prefix)
    else:
        config = config or from_diffusers(CLIPTextConfig, found)
    model = meta_model(CLIPTextModel, config)
    return built(model, with_prefix_of(state, model.state_dict()), source, dtype, device)


def load_tokenizer(path, allow_pickle=False, part="tokenizer"):
    """The tokenizer/ folder of a diffusers model; for an original single file, the CLIP vocabulary shipped with
    minidiff (SD 2.x and SDXL's tokenizer_2 pad with "!", SD 1.x and SDXL's first tokenizer with <|endoftext|>)."""
    from minidiff.tokenizer import CLIPTokenizer

    path = locate(path)
    if path.is_dir():
        folder = component_folder(path, part)
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            if (folder / name).exists():
                check_input_file(folder / name, "the tokenizer file", max_bytes=256 * 2**20)
        try:
            return CLIPTokenizer.from_folder(folder)
        except MinidiffError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise CheckpointError(f"the tokenizer in {shown(folder)} is damaged ({type(error).__name__}: "
                                  f"{shown(error)}): restore vocab.json and merges.txt from the model's "
                                  "repository") from None
    state = read_checkpoint(path, allow_pickle)
    open_clip = any(key.startswith(keymap.PREFIXES["open_clip"]) for key in state) or part == "tokenizer_2"
    return CLIPTokenizer.sd21() if open_clip else CLIPTokenizer.sd15()


# --- SDXL ---------------------------------------------------------------------------------------------------------


def is_sdxl(path: Path, allow_pickle: bool = False) -> bool:
    """A diffusers folder with a second text encoder (or listing one in model_index.json), or an SDXL single file."""
    if path.is_dir():
        index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
        return (path / "text_encoder_2").is_dir() or "text_encoder_2" in index or "XL" in index.get("_class_name", "")
    return keymap.is_sdxl_file(read_checkpoint(path, allow_pickle))


def is_sdxl_refiner(path: Path, allow_pickle: bool = False) -> bool:
    """The SDXL refiner: a folder with text_encoder_2/ and no text_encoder/, or a file with bigG alone."""
    if path.is_dir():
        return (path / "text_encoder_2").is_dir() and not (path / "text_encoder").is_dir()
    return keymap.is_sdxl_refiner_file(read_checkpoint(path, allow_pickle))


def load_taesd(path, dtype=None, device=None, allow_pickle=False):
    """TAESD from its diffusers folder (config.json + diffusion_pytorch_model.safetensors), or from
    madebyollin's taesd_encoder + taesd_decoder files (a folder holding them, or either file). dtype: float32."""
    from minidiff.taesd import TAESD, TAESDConfig

    path = locate(path)
    if path.is_dir() and (path / "config.json").is_file():
        state, found, _, source = read_component(path, "taesd", None, allow_pickle)
        return built(meta_model(TAESD, from_diffusers(TAESDConfig, found)), state, source, dtype, device)
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
    return built(meta_model(TAESD, config), state, path, dtype, device)


@dataclass
class Components:
    """Everything a Stable Diffusion pipeline is made of, loaded."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None  # None for the SDXL refiner (bigG alone, as text_encoder_2)
    tokenizer: object
    schedule: NoiseSchedule
    prediction_type: str
    scheduler_config: dict  # the diffusers scheduler_config.json (timestep_spacing, steps_offset, ...)
    text_encoder_2: torch.nn.Module | None = None  # SDXL's OpenCLIP ViT-bigG (with text_projection)
    tokenizer_2: object = None  # SDXL's second tokenizer (pads with "!")
    force_zeros_for_empty_prompt: bool = True  # SDXL: no negative prompt -> zeros (model_index.json)


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
    schedule = NoiseSchedule.from_config(found)
    if not is_sdxl(path, allow_pickle):
        return Components(unet, load_vae(path, **options), load_text_encoder(path, **options),
                          load_tokenizer(path, allow_pickle), schedule, unet.prediction_type, found)
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if path.is_dir() and not (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path} is an SDXL folder without text_encoder_2/ (OpenCLIP ViT-bigG): SDXL needs both "
                              "text encoders; download it again (`minidiff download sdxl`)")
    refiner = is_sdxl_refiner(path, allow_pickle)  # bigG alone: no text_encoder, no tokenizer (minidiff.refiner)
    return Components(unet, load_vae(path, **options), None if refiner else load_text_encoder(path, **options),
                      None if refiner else load_tokenizer(path, allow_pickle), schedule, unet.prediction_type, found,
                      load_text_encoder(path, part="text_encoder_2", **options),
                      load_tokenizer(path, allow_pickle, part="tokenizer_2"),
                      index.get("force_zeros_for_empty_prompt", not refiner))  # the refiner's index: false
