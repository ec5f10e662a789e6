"""Export the UNet and the VAE decoder to ONNX, and check the files against PyTorch with onnxruntime.

The exporter is PyTorch's (torch.export, then onnxscript's translation to ONNX); batch size, latent height and
width and the text length stay dynamic, so one file serves every image size. Models over 2 GB (the SD UNet in
float32) keep their weights in a `NAME.onnx.data` file beside the graph, as ONNX requires.

    minidiff export-onnx OUT_DIR [--model shapes]   ->  OUT_DIR/unet.onnx, OUT_DIR/vae_decoder.onnx

Needs the optional extra `pip install minidiff[onnx]` (onnx, onnxscript; onnxruntime for the check).
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from minidiff.errors import MinidiffError

TEXT_LENGTH = 77  # CLIP's context length, for the example input


class VAEDecode(nn.Module):
    """The VAE's decode (post_quant_conv + decoder) as a module with one input, unscaled z -> image."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


def require(module: str):
    """Import an optional dependency, or say which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MinidiffError(f"ONNX export needs the package {module!r}: pip install 'minidiff[onnx]' "
                            "(onnx, onnxscript, onnxruntime)") from None


def export_module(module: nn.Module, inputs: dict, path, dynamic: dict) -> Path:
    """torch.onnx.export of module(**inputs) to path, written atomically (a temporary folder, then renamed);
    dynamic: input name -> the axes that stay dynamic."""
    require("onnxscript")
    path = Path(path)
    if not path.parent.is_dir():
        raise MinidiffError(f"cannot write {path}: the folder {path.parent} does not exist")
    from torch.export import Dim

    dynamic_shapes = {name: {axis: Dim.AUTO for axis in axes} for name, axes in dynamic.items()}
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        with torch.no_grad():
            torch.onnx.export(module.eval(), (), staging / path.name, kwargs=inputs, input_names=list(inputs),
                              output_names=["output"], dynamic_shapes=dynamic_shapes, external_data=True,
                              verbose=False)
        for file in sorted(staging.iterdir()):  # the graph, and NAME.onnx.data when the weights went beside it
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def unet_inputs(unet, batch: int = 2, latent_size: tuple = (64, 64), text_length: int = TEXT_LENGTH,
                generator=None) -> dict:
    """Example UNet inputs: x (B, C, h, w), t (B,) float32, context (B, L, D), in the UNet's dtype and device."""
    parameter = next(unet.parameters())
    config = unet.config
    randn = lambda *shape: torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype)
    return {"x": randn(batch, config.in_channels, *latent_size),
            "t": torch.full((batch,), 500.0, device=parameter.device),
            "context": randn(batch, text_length, config.cross_attention_dim)}


def export_unet(unet, path, batch: int = 2, latent_size: tuple = (64, 64)) -> Path:
    """UNet (x, t, context) -> eps to ONNX, dynamic in batch, latent size and text length."""
    inputs = unet_inputs(unet, batch, latent_size)
    return export_module(unet, inputs, path, {"x": (0, 2, 3), "t": (0,), "context": (0, 1)})


def export_vae_decoder(vae, path, batch: int = 1, latent_size: tuple = (64, 64)) -> Path:
    """The VAE decode (unscaled z -> image in [-1, 1]) to ONNX, dynamic in batch and latent size."""
    parameter = next(vae.parameters())
    latent = torch.randn(batch, vae.latent_channels, *latent_size).to(parameter.device, parameter.dtype)
    return export_module(VAEDecode(vae), {"latent": latent}, path, {"latent": (0, 2, 3)})


def check_onnx(path, module: nn.Module, inputs: dict) -> float:
    """max |onnxruntime(path)(inputs) - module(**inputs)|: how far the exported file is from PyTorch."""
    onnxruntime = require("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
    (onnx_out,) = session.run(None, feed)
    with torch.no_grad():
        torch_out = module(**inputs).float().cpu()
    return (torch.from_numpy(onnx_out).float() - torch_out).abs().max().item()


def export_pipeline(pipe, out_dir, height: int = 512, width: int = 512, check: bool = True) -> dict:
    """Export pipe's UNet and VAE decoder into out_dir; returns {name: (path, max error vs PyTorch or None)}.

    The check runs both on new inputs of another size than the export's, so it also tests the dynamic axes.
    """
    from minidiff.checks import check_bool, check_int, check_path_like, shown

    out_dir = check_path_like("out_dir", out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MinidiffError(f"{shown(out_dir)} is a file, not a folder: give a folder for the .onnx files")
    if not out_dir.is_dir():
        raise MinidiffError(f"the folder {shown(out_dir)} does not exist: create it first (mkdir -p {shown(out_dir)})")
    check_int("height", height, 8, 16384)
    check_int("width", width, 8, 16384)
    check_bool("check", check)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
        raise MinidiffError(f"export_pipeline takes a minidiff Pipeline (load_pipeline(...)), got "
                            f"{type(pipe).__name__}")
    unet = getattr(pipe.unet, "unet", pipe.unet)  # the plain UNet behind a minidiff.speed.FastUNet
    factor = 8 * unet.config.downsample_factor
    if height % factor or width % factor:
        raise MinidiffError(f"height and width must be multiples of {factor} px for this UNet, got {height}x{width}")
    latent_size = (height // 8, width // 8)
    results = {}
    path = export_unet(unet, out_dir / "unet.onnx", 2, latent_size)
    other = (latent_size[0] + factor // 8, latent_size[1])  # another size: the dynamic axes are checked too
    generator = torch.Generator().manual_seed(0)
    error = check_onnx(path, unet, unet_inputs(unet, 1, other, 11, generator)) if check else None
    results["unet"] = (path, error)
    path = export_vae_decoder(pipe.vae, out_dir / "vae_decoder.onnx", 1, latent_size)
    if check:
        parameter = next(pipe.vae.parameters())
        latent = torch.randn((2, pipe.vae.latent_channels, *other), generator=generator).to(parameter.device,
                                                                                              parameter.dtype)
        error = check_onnx(path, VAEDecode(pipe.vae), {"latent": latent})
    results["vae_decoder"] = (path, error)
    return results
