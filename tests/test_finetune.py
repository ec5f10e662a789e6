"""Training a LoRA, a new word, or both (pivotal tuning) (minidiff.finetune, `minidiff train`): the files load back
through load_lora / load_textual_inversion and draw what training left; only the adapter's tensors change; a resumed
run equals one run; shards of a global batch average to its loss (the data-parallel contract)."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from minidiff.cli import main
from minidiff.course.viz import tiny_pipeline
from minidiff.finetune import (
    FinetuneConfig,
    attach_lora,
    batch_loss,
    draw_batch,
    encode_pictures,
    finetune,
    read_folder,
)
from minidiff.lora import unload_lora

COLOURS = ("red", "blue", "green", "white", "yellow", "purple")


@pytest.fixture
def folder(tmp_path):
    """Six one-colour pictures captioned with the new word <w> and the colour."""
    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a <w> picture, {colour}\n")
    return data


def config(method, **changes):
    """A short run; "pivotal" is a LoRA with the new word <w> (a plain LoRA has no token)."""
    token = {"lora": None}.get(method, "<w>")
    return FinetuneConfig(**({"method": method.replace("pivotal", "lora"), "steps": 6, "batch": 4, "lr": 1e-2,
                              "warmup": 2, "token": token, "save_every": 2} | changes))


def outputs(pipe, prompt="a <w> picture, red"):
    """The text encoder's states and one UNet prediction for a fixed x_t and t."""
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer([prompt]))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        return context, pipe.unet(x, torch.tensor([500]), context)


def test_read_folder_pairs_each_picture_with_its_caption(folder):
    pictures, captions = read_folder(folder)
    assert [p.name for p in pictures] == [f"{i}.png" for i in range(6)]
    assert captions[1] == "a <w> picture, blue"


def test_a_trained_lora_is_a_kohya_file_that_load_lora_reads_back_exactly(folder, tmp_path):
    pipe = tiny_pipeline()
    finetune(pipe, folder, config("lora"), tmp_path / "lora.safetensors", progress=False)
    trained = outputs(pipe)
    fresh = tiny_pipeline()
    untouched = outputs(fresh)
    fresh.load_lora(tmp_path / "lora.safetensors")
    loaded = outputs(fresh)
    for a, b, base in zip(trained, loaded, untouched):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert (a - base).abs().max() > 1e-4  # training moved the model
    state = load_file(tmp_path / "lora.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in state)
    assert any(k.startswith("lora_unet_") and "attn2_to_k.lora_up" in k for k in state)
    assert all(v.item() == 4.0 for k, v in state.items() if k.endswith(".alpha"))


def test_only_the_lora_matrices_are_trained(folder, tmp_path):
    pipe = tiny_pipeline()
    before = {name: p.clone() for name, p in pipe.unet.state_dict().items()}
    finetune(pipe, folder, config("lora"), tmp_path / "lora.safetensors", progress=False)
    unload_lora(pipe)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_trained_word_is_an_embedding_file_that_moves_only_its_prompts(folder, tmp_path):
    pipe = tiny_pipeline()
    table = pipe.text_encoder.text_model.embeddings.token_embedding.weight.clone()
    finetune(pipe, folder, config("textual_inversion", vectors=2, init_word="picture"), tmp_path / "w.safetensors",
             progress=False)
    grown = pipe.text_encoder.text_model.embeddings.token_embedding.weight
    assert grown.shape[0] == table.shape[0] + 2 and torch.equal(grown[: table.shape[0]], table)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as file:
        assert list(file.keys()) == ["<w>"] and file.get_tensor("<w>").shape == (2, 32)
    fresh = tiny_pipeline()
    assert fresh.load_textual_inversion(tmp_path / "w.safetensors") == "<w>"
    torch.testing.assert_close(outputs(fresh)[0], outputs(pipe)[0], rtol=0, atol=0)
    assert (outputs(fresh)[0] - outputs(tiny_pipeline(), "a picture, red")[0]).abs().max() > 1e-4
    without = "a picture, red"
    assert torch.equal(outputs(fresh, without)[0], outputs(tiny_pipeline(), without)[0])


def test_pivotal_tuning_trains_the_word_and_a_unet_lora_and_leaves_other_prompts_exactly(folder, tmp_path):
    """A LoRA with a token: the word's rows and a LoRA on the UNet alone; the file bundles the word (kohya's
    bundle_emb) and load_lora adds it; a prompt without the word gets the text states it had, bit for bit."""
    pipe = tiny_pipeline()
    finetune(pipe, folder, config("pivotal", vectors=2), tmp_path / "p.safetensors", progress=False)
    state = load_file(tmp_path / "p.safetensors")
    assert state["bundle_emb.<w>.string_to_param.*"].shape == (2, 32)
    assert not any(k.startswith("lora_te_") for k in state) and any(k.startswith("lora_unet_") for k in state)
    without, plain = "a picture, red", tiny_pipeline()
    fresh = tiny_pipeline()
    fresh.load_lora(tmp_path / "p.safetensors")
    assert fresh.tokenizer.added_tokens["<w>"] == pipe.tokenizer.added_tokens["<w>"]
    for a, b in zip(outputs(pipe), outputs(fresh)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(outputs(fresh, without)[0], outputs(plain, without)[0])  # the text encoder is untouched
    assert (outputs(fresh, without)[1] - outputs(plain, without)[1]).abs().max() > 1e-4  # the UNet's LoRA moved
    initial = plain.text_encoder.text_model.embeddings.token_embedding.weight.mean(0)
    assert (state["bundle_emb.<w>.string_to_param.*"] - initial).abs().max() > 1e-3  # the word moved
    fresh.unload_lora()
    fresh.load_lora(tmp_path / "p.safetensors")  # the word is kept on unload; loading the file again reuses it
    assert fresh.tokenizer.added_tokens["<w>"] == pipe.tokenizer.added_tokens["<w>"]


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "pivotal"])
def test_k_steps_then_resume_to_2k_equals_2k_steps_in_one_go(folder, tmp_path, method):
    whole = finetune(tiny_pipeline(), folder, config(method), tmp_path / "whole.safetensors", progress=False)
    first = config(method, steps=3)
    finetune(tiny_pipeline(), folder, first, tmp_path / "half.safetensors", checkpoint=tmp_path / "ck.safetensors",
             progress=False)
    with safe_open(str(tmp_path / "ck.safetensors"), "pt") as file:
        assert file.metadata()["step"] == "3"
        assert any(".exp_avg_sq" in key for key in file.keys())  # AdamW's moments travel with the weights
    resumed = finetune(tiny_pipeline(), folder, config(method), tmp_path / "resumed.safetensors",
                       checkpoint=tmp_path / "ck.safetensors", resume=tmp_path / "ck.safetensors",
                       loss_curve=tmp_path / "loss.png", progress=False)
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 6
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Image.open(tmp_path / "loss.png").format == "PNG"


def test_the_mean_of_equal_shards_is_the_global_batch_loss_and_gradient(folder):
    """What data-parallel training relies on: each rank's loss on its slice of the one global batch."""
    pipe = tiny_pipeline()
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):  # float64: what is left is the maths, not rounding
        model.requires_grad_(False).double()
    generator = torch.Generator().manual_seed(0)
    params = attach_lora(pipe, 2, 2.0, generator)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.1, generator=generator)
    pictures, captions = read_folder(folder)
    latents, ids = encode_pictures(pipe, pictures), pipe.tokenizer(captions)
    index, t, noise = draw_batch(generator, len(latents), 8, 1000, latents.shape[1:])
    noise = noise.double()
    gradients, whole = [], None
    for shards in (1, 2, 4):
        losses = []
        for rows in torch.arange(8).chunk(shards):
            loss = batch_loss(pipe, latents[index[rows]], ids[index[rows]], t[rows], noise[rows]) / shards
            loss.backward()
            losses.append(loss.item())
        gradients.append(torch.cat([p.grad.flatten().clone() for p in params.values()]))
        for p in params.values():
            p.grad = None
        whole = sum(losses) if whole is None else whole
        assert sum(losses) == pytest.approx(whole, rel=1e-12)
    scale = gradients[0].abs().max().item()
    torch.testing.assert_close(gradients[1], gradients[0], rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(gradients[2], gradients[0], rtol=0, atol=1e-10 * scale)
    assert scale > 1e-3  # the gradients compared are not all zero


def test_the_command_trains_both_and_generate_uses_them(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "2", "--batch", "2", "--device", "cpu"]
    assert main(["train", "lora", str(folder), "--out", "l.safetensors", *common]) == 0
    assert main(["train", "textual-inversion", str(folder), "--token", "<w>", "--out", "w.safetensors", *common]) == 0
    written = {p.name for p in tmp_path.iterdir()}
    assert {"l.safetensors", "l.loss.png", "l.checkpoint.safetensors", "w.safetensors", "w.loss.png",
            "w.checkpoint.safetensors"} <= written
    assert main(["train", "lora", str(folder), "--out", "l.safetensors", *common[:1], "4", *common[2:],
                 "--resume", "l.checkpoint.safetensors", "--overwrite"]) == 0
    assert "4 steps" in capsys.readouterr().out
    assert main(["generate", "a <w> picture", "--steps", "2", "--lora", "l.safetensors", "--embedding",
                 "w.safetensors", "--out", "image.png"]) == 0
    assert Image.open(tmp_path / "image.png").size == (64, 64)
    assert main(["train", "lora", str(folder), "--token", "<w>", "--out", "p.safetensors", *common]) == 0
    assert "bundle_emb.<w>.string_to_param.*" in load_file(tmp_path / "p.safetensors")
    assert main(["generate", "a <w> picture", "--steps", "2", "--lora", "p.safetensors", "--out", "p.png"]) == 0
