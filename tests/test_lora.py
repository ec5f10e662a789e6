"""LoRA and textual inversion without a reference library: the layer's maths, the tokenizer's new words, the
`--lora` / `--embedding` flags and their one-line errors (parity with diffusers: tests/parity/test_lora.py)."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minidiff.cli import main
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.lora import LoRA, LoRALayer, lora_targets
from minidiff.pipeline import load_pipeline
from minidiff.tokenizer import CLIPTokenizer


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Conv2d(6, 5, 1)])
def test_lora_layer_is_w_x_plus_scaled_up_down_x_and_fuses_to_the_same_map(base):
    """y = W x + scale * alpha / rank * up(down(x)); fused, W + scale * alpha / rank * up @ down gives the same y."""
    conv = isinstance(base, nn.Conv2d)
    down = torch.randn(3, 6, *base.kernel_size) if conv else torch.randn(3, 6)
    up = torch.randn(5, 3, 1, 1) if conv else torch.randn(5, 3)
    x = torch.randn(2, 6, 7, 7) if conv else torch.randn(2, 6)
    layer = LoRALayer(base)
    layer.loras["a"], layer.scales["a"] = LoRA(base, down, up, alpha=1.5), 0.8
    with torch.no_grad():
        extra = nn.functional.conv2d(x, down, stride=base.stride, padding=base.padding) if conv else x @ down.T
        extra = nn.functional.conv2d(extra, up) if conv else extra @ up.T
        expected = base(x) + 0.8 * (1.5 / 3) * extra
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        original = base.weight.clone()
        layer.fuse()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unfuse()
        assert torch.equal(base.weight, original)


@pytest.fixture
def shapes():
    return load_pipeline("shapes", device="cpu", dtype=torch.float32)


def random_kohya_file(pipe, path, rank=2):
    state = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for module, layer in lora_targets(getattr(pipe, component)).items():
            name = prefix + module.replace(".", "_")
            if isinstance(layer, nn.Conv2d):
                down, up = torch.randn(rank, layer.in_channels, *layer.kernel_size), torch.randn(layer.out_channels,
                                                                                                  rank, 1, 1)
            else:
                down, up = torch.randn(rank, layer.in_features), torch.randn(layer.out_features, rank)
            state |= {f"{name}.lora_down.weight": 0.05 * down, f"{name}.lora_up.weight": 0.05 * up,
                      f"{name}.alpha": torch.tensor(1.0)}
    save_file(state, path)


def test_load_scale_unload(shapes, tmp_path):
    random_kohya_file(shapes, tmp_path / "style.safetensors")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 96)
    with torch.no_grad():
        plain = shapes.unet(x, t, context)
        assert shapes.load_lora(tmp_path / "style.safetensors", scale=0.0) == "style"
        torch.testing.assert_close(shapes.unet(x, t, context), plain)  # scale 0: off
        with pytest.raises(MinidiffError, match="already loaded"):
            shapes.load_lora(tmp_path / "style.safetensors")
        shapes.unload_lora("style")
        shapes.load_lora(tmp_path / "style.safetensors", scale=1.0)
        assert (shapes.unet(x, t, context) - plain).abs().max() > 1e-3
        shapes.unload_lora()
        assert torch.equal(shapes.unet(x, t, context), plain)
    with pytest.raises(MinidiffError, match="finite number"):
        shapes.load_lora(tmp_path / "style.safetensors", scale="strong")


def test_new_words_in_the_tokenizer():
    tokenizer = CLIPTokenizer.default()
    assert tokenizer.add_token("<my-word>", 2) == [49408, 49409]
    ids = tokenizer.encode("a <my-word>, red")
    assert ids == [*tokenizer.encode("a"), 49408, 49409, *tokenizer.encode(", red")]
    assert tokenizer.decode(tokenizer(["a <my-word> circle"])[0]) == "a <my-word> circle"
    with pytest.raises(MinidiffError, match="clashes"):
        tokenizer.add_token("<my-word>")


def test_textual_inversion_adds_a_row(shapes, tmp_path):
    width = shapes.text_encoder.config.hidden_size
    rows = shapes.text_encoder.text_model.embeddings.token_embedding.num_embeddings
    vector = torch.randn(width)
    save_file({"<zorb>": vector}, tmp_path / "learned_embeds.safetensors")
    assert shapes.load_textual_inversion(tmp_path / "learned_embeds.safetensors") == "<zorb>"
    table = shapes.text_encoder.text_model.embeddings.token_embedding
    assert table.num_embeddings == rows + 1 and torch.equal(table.weight[rows], vector)
    shapes.encode_prompt(["a <zorb> in the middle"])  # the new id is inside the table
    save_file({"emb_params": torch.randn(2, width + 1)}, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="wide"):
        shapes.load_textual_inversion(tmp_path / "wide.safetensors", token="<wide>")


def run_cli(args, capsys):
    status = main(args)
    return status, capsys.readouterr()


@pytest.mark.parametrize(("flag", "spec", "message"), [
    ("--lora", "missing.safetensors", "no such file"),
    ("--lora", "{file}:abc", "must be a number"),
    ("--lora", "{file}:inf", "must be a number"),
    ("--embedding", "{file}:", "token after ':'"),
    ("--embedding", "gone.safetensors:<w>", "no such file"),
])
def test_bad_adapter_flags_are_one_line(tmp_path, capsys, flag, spec, message):
    file = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, file)
    status, out = run_cli(["generate", "x", flag, spec.format(file=file), "--out", str(tmp_path / "o.png")], capsys)
    assert status == 2 and message in out.err and out.err.count("\n") == 1, out.err


def test_generate_with_lora_and_embedding(shapes, tmp_path, capsys):
    random_kohya_file(shapes, tmp_path / "style.safetensors")
    save_file({"emb_params": torch.randn(1, shapes.text_encoder.config.hidden_size)}, tmp_path / "zorb.safetensors")
    out = tmp_path / "o.png"
    status, printed = run_cli(["generate", "a <zorb>", "--steps", "2", "--device", "cpu", "--out", str(out),
                               "--lora", f"{tmp_path / 'style.safetensors'}:0.5",
                               "--embedding", f"{tmp_path / 'zorb.safetensors'}:<zorb>"], capsys)
    assert status == 0 and out.is_file(), printed.err
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 3),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(3, 2)}, bad)
    status, printed = run_cli(["generate", "x", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "o2.png"),
                               "--lora",
                               str(bad)], capsys)
    assert status == 2 and "another base model" in printed.err and printed.err.count("\n") == 1


def test_kohya_files_with_the_original_ldm_names_load_the_same(shapes, tmp_path):
    """lora_unet_input_blocks_1_1_proj_in names the layer diffusers calls down_blocks.0.attentions.0.proj_in."""
    from safetensors.torch import load_file

    from minidiff.lora import _ldm_paths

    random_kohya_file(shapes, tmp_path / "diffusers_names.safetensors")
    to_ldm = {path.replace(".", "_"): ldm.replace(".", "_")
              for ldm, path in _ldm_paths(shapes.unet, lora_targets(shapes.unet)).items()}
    renamed = {}
    for key, value in load_file(tmp_path / "diffusers_names.safetensors").items():
        name, _, part = key.partition(".")
        if name.startswith("lora_unet_"):
            name = "lora_unet_" + to_ldm[name.removeprefix("lora_unet_")]
        renamed[f"{name}.{part}"] = value
    assert "lora_unet_input_blocks_1_1_proj_in.alpha" in renamed
    save_file(renamed, tmp_path / "ldm_names.safetensors")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 96)
    with torch.no_grad():
        shapes.load_lora(tmp_path / "diffusers_names.safetensors")
        expected = shapes.unet(x, t, context)
        shapes.unload_lora()
        shapes.load_lora(tmp_path / "ldm_names.safetensors")
        assert torch.equal(shapes.unet(x, t, context), expected)
