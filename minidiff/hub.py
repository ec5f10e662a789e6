"""The official checkpoints minidiff knows by name, found in (or downloaded into) the Hugging Face cache.

weights/manifest.json lists them: hub repository, components, fp16 variants, approximate sizes, licence and
prediction type. `resolve` never touches the network: a path is returned as it is, a known name is looked up in
the local cache (HF_HUB_CACHE, ~/.cache/huggingface/hub by default). Only `download` (`minidiff download NAME`)
goes online, and fetches just the files minidiff reads; a model already in the cache is not downloaded again.
"""

import json
from pathlib import Path

from minidiff.errors import MinidiffError

PACKAGE = Path(__file__).resolve().parent
# weights/ (the manifest and the bundled models): inside the package in an installed wheel (pyproject.toml ships it
# as minidiff/weights), beside the package in a checkout or an editable install
WEIGHTS = next((folder for folder in (PACKAGE / "weights", PACKAGE.parent / "weights")
                if (folder / "manifest.json").is_file()), PACKAGE.parent / "weights")
MANIFEST = WEIGHTS / "manifest.json"
KNOWN_MODELS = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
OPTIONAL = tuple(f"{folder}/{file}" for folder in ("tokenizer", "tokenizer_2")  # fetched if the repo has them
                 for file in ("special_tokens_map.json", "tokenizer_config.json"))
WEIGHTS_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def entry(name: str) -> dict:
    """The manifest entry of a known model, or a MinidiffError listing the known names."""
    if name not in KNOWN_MODELS:
        raise MinidiffError(f"unknown model {name!r}: known models are {', '.join(KNOWN_MODELS)} "
                            "(or pass the path of a diffusers folder or a .safetensors file)")
    return KNOWN_MODELS[name]


def files(name: str, variant: str | None = None) -> list:
    """The files minidiff needs from a known model's repository (diffusers folder layout), for one variant."""
    model = entry(name)
    if variant is not None and variant not in model.get("variants", []):
        raise MinidiffError(f"{name} has no {variant!r} variant (it has: {', '.join(model['variants']) or 'none'})")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    if model["layout"] == "taesd":
        return ["config.json", "diffusion_pytorch_model.safetensors"]
    needed = ["model_index.json"]
    for component in model["components"]:
        if component.startswith("tokenizer"):  # SDXL has tokenizer and tokenizer_2
            needed += [f"{component}/{file}" for file in ("vocab.json", "merges.txt", "special_tokens_map.json",
                                                          "tokenizer_config.json")]
        elif component == "scheduler":
            needed.append("scheduler/scheduler_config.json")
        else:
            needed += [f"{component}/config.json", f"{component}/{WEIGHTS_STEM[component]}{suffix}"]
    return needed


def bundled_path(name: str) -> Path:
    """Where a model that ships with minidiff lives (weights/NAME), whether or not it is there."""
    return WEIGHTS / entry(name)["bundled"]


def local_path(name: str, cache_dir=None, variant: str | None = None) -> Path | None:
    """The snapshot folder of a known model in the local Hugging Face cache, if every file is there (no network).

    Without a variant, the full-precision files or (failing those) the fp16 ones will do."""
    from huggingface_hub import snapshot_download

    model = entry(name)
    if "bundled" in model:  # ships with minidiff, in weights/
        folder = bundled_path(name)
        return folder if (folder / "model_index.json").is_file() else None
    choices = [variant] if variant else [None, *model.get("variants", [])]
    for choice in choices:
        wanted = files(name, choice)
        try:
            folder = Path(snapshot_download(model["repo"], allow_patterns=wanted, local_files_only=True,
                                            cache_dir=cache_dir))
        except Exception:  # LocalEntryNotFoundError and kin: not in the cache
            return None
        if all((folder / file).is_file() for file in wanted if file not in OPTIONAL):
            return folder
    return None


def resolve(name_or_path, cache_dir=None, variant: str | None = None) -> Path:
    """A path as it is; a known model name -> its folder in the local cache (never downloads)."""
    if Path(name_or_path).exists() or Path(name_or_path).is_symlink():  # a broken link: the loaders say why
        return Path(name_or_path)
    name = str(name_or_path)
    if name not in KNOWN_MODELS:
        raise MinidiffError(f"{name!r} is neither a file or folder nor a known model; known models: "
                            f"{', '.join(KNOWN_MODELS)}")
    folder = local_path(name, cache_dir, variant)
    if folder is None and "bundled" in KNOWN_MODELS[name]:
        raise MinidiffError(f"the bundled model {name} is missing from {bundled_path(name)}: "
                            "restore it with `git checkout -- weights/` (or reinstall minidiff) or retrain it with "
                            "`python -m minidiff.course.train shapes`")
    if folder is None:
        model = KNOWN_MODELS[name]
        size = model["size_gb"].get(variant or "fp32")
        raise MinidiffError(f"{name} ({model['repo']}) is not downloaded yet: run `minidiff download {name}`"
                            + (f" (about {size} GB)" if size else ""))
    return folder


def download(name: str, variant: str | None = None, cache_dir=None) -> Path:
    """Download a known model's needed files into the Hugging Face cache (nothing if they are there already)."""
    from huggingface_hub import snapshot_download

    model = entry(name)
    if "bundled" in model:
        return resolve(name)
    wanted = files(name, variant)  # checks the variant before anything is fetched
    folder = local_path(name, cache_dir, variant)
    if folder is not None:
        return folder
    try:
        return Path(snapshot_download(model["repo"], allow_patterns=wanted, cache_dir=cache_dir))
    except Exception as error:  # network, authentication (gated repositories), disk space
        raise MinidiffError(f"could not download {name} from {model['repo']}: {error}") from None


def describe_known(name: str) -> str:
    """Architecture and parameter counts of a known model from its manifest presets alone (models built on the meta
    device: nothing downloaded, no memory used), for `minidiff info` before `minidiff download`."""
    import torch

    from minidiff.clip import CLIPTextConfig, CLIPTextModel
    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig

    model = entry(name)
    if "architecture" not in model:
        raise MinidiffError(f"{name} is not downloaded and the manifest has no architecture for it: run "
                            f"`minidiff download {name}`, then `minidiff info {name}`")
    kinds = {"unet": (UNet, UNetConfig), "vae": (AutoencoderKL, VAEConfig), "text_encoder": (CLIPTextModel,
             CLIPTextConfig), "text_encoder_2": (CLIPTextModel, CLIPTextConfig)}
    lines = [f"model:       {name} ({model['repo']}), not downloaded: from the config alone",
             f"prediction:  {model['prediction_type']}", f"image size:  {model['image_size']} px"]
    for part, preset in model["architecture"].items():
        model_class, config_class = kinds[part]
        with torch.device("meta"):
            module = model_class(getattr(config_class, preset)())
        count = sum(p.numel() for p in module.parameters())
        lines.append(f"{part + ':':16s}{type(module).__name__} ({config_class.__name__}.{preset}()), "
                     f"{count:,} parameters")
    return "\n".join(lines)
