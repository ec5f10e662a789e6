"""SDXL without the oracles: the micro-conditioning, what the UNet refuses, `minidiff info sdxl` from the config alone,
the files `minidiff download sdxl` fetches, and an incomplete SDXL folder named in one line."""

import shutil

import pytest
import torch

from minidiff import cli, hub
from minidiff.errors import CheckpointError, InputError, MinidiffError
from minidiff.load import load_components
from minidiff.pipeline import load_pipeline
from minidiff.sdxl import time_ids
from minidiff.speed import FastUNet
from minidiff.unet import UNet, UNetConfig


def test_time_ids_are_original_size_crop_and_target_size():
    assert time_ids((768, 512), (64, 32), (1024, 1024)).tolist() == [768, 512, 64, 32, 1024, 1024]
    assert time_ids((768, 512), (0, 0), (1024, 1024), aesthetic_score=6.0).tolist() == [768, 512, 0, 0, 6.0]
    with pytest.raises(MinidiffError, match="original_size"):
        time_ids((768,), (0, 0), (1024, 1024))


def test_sdxl_unet_names_missing_or_misshaped_added_conditioning():
    config = UNetConfig(block_out_channels=(32, 32), cross_attention=(False, True), num_attention_heads=(1, 1),
                        cross_attention_dim=16, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    unet = UNet(config).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    for added in (None, {"text_embeds": torch.randn(1, 8)}, {"text_embeds": torch.randn(1, 8),
                                                              "time_ids": torch.randn(1, 5)}):
        with pytest.raises(MinidiffError, match="added_cond_kwargs"):
            unet(x, 10, context, added_cond_kwargs=added)
    assert unet(x, 10, context, added_cond_kwargs={"text_embeds": torch.randn(1, 8),
                                                    "time_ids": torch.randn(1, 6)}).shape == x.shape
    assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 2  # the last stage's depth
    added = {"text_embeds": torch.randn(1, 8), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():  # behind the speed options (optimize wraps a pipeline's UNet in FastUNet)
        fast = FastUNet(unet, channels_last=True)(x, 10, context, added_cond_kwargs=added)
        assert torch.allclose(fast, unet(x, 10, context, added_cond_kwargs=added), atol=1e-5)


def test_info_sdxl_from_the_config_alone(capsys, monkeypatch):
    monkeypatch.setattr(hub, "local_path", lambda *args, **kwargs: None)  # as if not downloaded
    cli.main(["info", "sdxl"])
    out = capsys.readouterr().out
    assert "UNet (UNetConfig.sdxl()), 2,567,463,684 parameters" in out
    assert "CLIPTextConfig.sdxl_bigg()" in out and "not downloaded" in out


def test_download_sdxl_fetches_both_text_encoders_and_tokenizers():
    wanted = hub.files("sdxl", "fp16")
    for needed in ("text_encoder_2/model.fp16.safetensors", "tokenizer_2/vocab.json",
                   "unet/diffusion_pytorch_model.fp16.safetensors", "scheduler/scheduler_config.json"):
        assert needed in wanted


def test_download_sdxl_refiner_fetches_bigg_alone_and_info_counts_its_parameters(capsys, monkeypatch):
    wanted = hub.files("sdxl-refiner", "fp16")
    assert {"text_encoder_2/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"} <= set(wanted)
    assert not any(name.startswith(("text_encoder/", "tokenizer/")) for name in wanted)
    monkeypatch.setattr(hub, "local_path", lambda *args, **kwargs: None)  # as if not downloaded
    cli.main(["info", "sdxl-refiner"])
    assert "UNet (UNetConfig.sdxl_refiner()), 2,259,526,660 parameters" in capsys.readouterr().out


def test_sdxl_folder_without_second_text_encoder_or_first_is_named(tmp_path):
    """A model_index.json that lists text_encoder_2 makes a folder SDXL; the folder must hold both encoders, or be
    the refiner (text_encoder_2/ and tokenizer_2/ alone), which refuses text-to-image from noise."""
    source = hub.bundled_path("shapes")
    folder = tmp_path / "sdxl"
    shutil.copytree(source, folder)
    index = (folder / "model_index.json").read_text()
    (folder / "model_index.json").write_text(index.replace('"_class_name": "StableDiffusionPipeline"',
                                                           '"_class_name": "StableDiffusionXLPipeline"'))
    with pytest.raises(CheckpointError, match="without text_encoder_2") as error:
        load_components(folder)
    assert "\n" not in str(error.value)
    shutil.move(folder / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="without a tokenizer_2/ folder"):
        load_components(folder)
    shutil.move(folder / "tokenizer", folder / "tokenizer_2")  # laid out as the refiner: one encoder, as the second
    refiner = load_pipeline(folder, device="cpu")
    assert refiner.is_refiner and refiner.text_encoder is None
    with pytest.raises(InputError, match="this is the SDXL refiner, trained on the low-noise steps only") as error:
        refiner("a red circle", steps=1)  # the refiner given as the base model
    assert "\n" not in str(error.value)
