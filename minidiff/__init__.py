"""minidiff: a from-scratch, readable and fast Stable Diffusion toolkit in plain PyTorch.

`import minidiff` is light: the public names below are imported on first use.
"""

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "MinidiffError": "minidiff.errors",
    "SamplerError": "minidiff.errors",
    "CheckpointError": "minidiff.errors",
    "set_attention": "minidiff.speed",
    "NoiseSchedule": "minidiff.schedule",
    "sample": "minidiff.samplers",
    "SAMPLERS": "minidiff.samplers",
    "UNet": "minidiff.unet",
    "UNetConfig": "minidiff.unet",
    "AutoencoderKL": "minidiff.vae",
    "VAEConfig": "minidiff.vae",
    "TAESD": "minidiff.taesd",
    "CLIPTextModel": "minidiff.clip",
    "CLIPTextConfig": "minidiff.clip",
    "CLIPTokenizer": "minidiff.tokenizer",
    "load_unet": "minidiff.load",
    "load_vae": "minidiff.load",
    "load_taesd": "minidiff.load",
    "load_text_encoder": "minidiff.load",
    "load_tokenizer": "minidiff.load",
    "load_components": "minidiff.load",
    "load_pipeline": "minidiff.pipeline",
    "Pipeline": "minidiff.pipeline",
    "optimize": "minidiff.speed",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minidiff' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
