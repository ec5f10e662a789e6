"""ONNX export of the UNet and the VAE decoder, run with onnxruntime and compared with PyTorch (float32, tiny
configs, on inputs of another size than the export's so that the dynamic axes are checked too).
Pass: max |onnxruntime - torch| <= 1e-4 * max |torch|."""

import types

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime: pip install 'minidiff[onnx]'")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript: pip install 'minidiff[onnx]'")

from minidiff.errors import MinidiffError  # noqa: E402
from minidiff.export import VAEDecode, check_onnx, export_pipeline, export_vae_decoder  # noqa: E402
from minidiff.unet import UNet, UNetConfig  # noqa: E402
from minidiff.vae import AutoencoderKL, VAEConfig  # noqa: E402

RELATIVE_TOLERANCE = 1e-4  # float32


def perturbed(model):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def test_vae_decoder_export_matches_pytorch_at_another_size(tmp_path):
    vae = perturbed(AutoencoderKL(VAEConfig.tiny()))
    path = export_vae_decoder(vae, tmp_path / "vae_decoder.onnx", batch=1, latent_size=(8, 8))
    latent = torch.randn(2, 4, 12, 16)  # another batch and size than the export's
    with torch.no_grad():
        scale = vae.decode(latent).abs().max().item()
    error = check_onnx(path, VAEDecode(vae), {"latent": latent})
    assert error <= RELATIVE_TOLERANCE * scale, f"max error {error:.2e} vs scale {scale:.2f}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]


@pytest.mark.slow  # the UNet's export takes ~60 s of CPU
def test_unet_and_vae_export_of_a_pipeline(tmp_path):
    unet, vae = perturbed(UNet(UNetConfig.tiny())), perturbed(AutoencoderKL(VAEConfig.tiny()))
    pipe = types.SimpleNamespace(unet=unet, vae=vae)
    results = export_pipeline(pipe, tmp_path, height=128, width=128)
    with torch.no_grad():  # the scale of the UNet's output on inputs like the check's
        scale = pipe.unet(torch.randn(1, 4, 24, 16), 500, torch.randn(1, 11, 32)).abs().max().item()
    path, error = results["unet"]
    assert path == tmp_path / "unet.onnx" and error <= RELATIVE_TOLERANCE * scale, error
    assert results["vae_decoder"][1] <= RELATIVE_TOLERANCE * 4  # the tiny VAE decodes to |x| < 4


def test_export_into_a_missing_folder_says_so(tmp_path):
    pipe = types.SimpleNamespace(unet=UNet(UNetConfig.tiny()), vae=AutoencoderKL(VAEConfig.tiny()))
    with pytest.raises(MinidiffError, match="mkdir"):
        export_pipeline(pipe, tmp_path / "missing")
    with pytest.raises(MinidiffError, match="multiples of 64"):
        export_pipeline(pipe, tmp_path, height=100, width=128)
