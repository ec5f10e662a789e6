"""A table of bad inputs, as a careless or hostile user would give them, against the command and the Python API.

Each row is the input and what must come of it: the error class (the command: exit status 2 and one line
`minidiff: error: ...`) and a fragment of the message. Every row also checks that no traceback is printed,
that no file is left behind or changed, and that it finishes within ROW_SECONDS (no hang).
"""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.cli import main
from minidiff.course.viz import tiny_pipeline
from minidiff.errors import CheckpointError, InputError, MinidiffError, OutputError, SamplerError
from minidiff.hub import WEIGHTS
from minidiff.images import from_pil
from minidiff.load import load_taesd, load_text_encoder, load_tokenizer, load_unet, load_vae
from minidiff.pipeline import load_pipeline
from minidiff.refiner import refine
from minidiff.samplers import sample

ROOT = Path(__file__).resolve().parent.parent
SHAPES = WEIGHTS / "shapes"
ROW_SECONDS = 60  # generous on a loaded 2-core machine; a hang is minutes
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --- files the rows use -------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (a decompression bomb: the header is all that is read)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs, bad and good, in a folder of their own (outside each row's output folder)."""
    root = tmp_path_factory.mktemp("inputs")
    good = root / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not a picture")
    (root / "bomb.png").write_bytes(png_claiming(40000, 40000))
    see_through = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    see_through.putpixel((0, 0), (0, 0, 0, 0))
    see_through.save(root / "transparent.png")
    Image.new("I;16", (64, 64)).save(root / "sixteen_bit.png")
    Image.new("RGB", (60, 60), "red").save(root / "odd_size.png")
    save_file({"noise": torch.zeros(1, 4, 8, 8)}, root / "noise.safetensors", metadata={"steps": "2"})
    save_file({"noise": torch.zeros(1, 3, 8, 8)}, root / "noise_3ch.safetensors", metadata={"steps": "2"})
    save_file({"noise": torch.zeros(4, 8, 8)}, root / "noise_3d.safetensors")
    save_file({"latents": torch.zeros(1, 4, 8, 8)}, root / "noise_other_key.safetensors")
    save_file({"noise": torch.zeros(1, 4, 8, 8)}, root / "noise_bad_steps.safetensors", metadata={"steps": "many"})
    os.symlink(root / "loop_a", root / "loop_b")
    os.symlink(root / "loop_b", root / "loop_a")
    os.mkfifo(root / "fifo.safetensors")
    os.mkfifo(root / "fifo.png")
    (root / "folder.png").mkdir()
    unet_state = load_file(SHAPES / "unet" / "diffusion_pytorch_model.safetensors")

    def model_copy(name, change=None):
        """A copy of the shapes model with one component changed by change(folder)."""
        folder = root / name
        shutil.copytree(SHAPES, folder, ignore=shutil.ignore_patterns("*.png", "train_log.json"))
        if change:
            change(folder)
        return folder

    def evil_names(folder):
        save_file(unet_state | {"\x1b[2J\x1b]0;pwned\x07evil": torch.zeros(1)},
                  folder / "unet" / "diffusion_pytorch_model.safetensors")

    def int64_weights(folder):
        key = next(k for k in unet_state if k.endswith("conv_in.weight"))
        save_file(unet_state | {key: unet_state[key].to(torch.int64)},
                  folder / "unet" / "diffusion_pytorch_model.safetensors")

    def config_change(component, **changes):
        def change(folder):
            path = folder / component / "config.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | changes))
        return change

    def scheduler_change(**changes):
        def change(folder):
            path = folder / "scheduler" / "scheduler_config.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | changes))
        return change

    def truncate(folder):
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])

    def lfs_pointer(folder):
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")

    def pickle_only(folder):
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(unet_state, folder / "unet" / "diffusion_pytorch_model.bin")

    def fifo_weights(folder):
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        path.unlink()
        os.mkfifo(path)

    def loop_weights(folder):
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        path.unlink()
        os.symlink(path, path)

    def folder_weights(folder):
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        path.unlink()
        path.mkdir()

    def two_variants(folder):
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        shutil.copy(path, path.with_name("diffusion_pytorch_model.fp16.safetensors"))

    def broken_vocab(folder):
        (folder / "tokenizer" / "vocab.json").write_text("{not json")

    def vocab_list(folder):
        (folder / "tokenizer" / "vocab.json").write_text("[1, 2, 3]")

    def no_scheduler(folder):
        shutil.rmtree(folder / "scheduler")

    def config_not_object(folder):
        (folder / "unet" / "config.json").write_text("[1, 2]")

    def vae_as_unet(folder):
        shutil.copy(folder / "vae" / "config.json", folder / "unet" / "config.json")

    models = {
        "evil_names": model_copy("evil_names", evil_names),
        "int64": model_copy("int64", int64_weights),
        "block_out_string": model_copy("block_out_string", config_change("unet", block_out_channels="48,96")),
        "sample_size_string": model_copy("sample_size_string", config_change("unet", sample_size="8")),
        "layers_bool": model_copy("layers_bool", config_change("unet", layers_per_block=True)),
        "vae_channels_negative": model_copy("vae_channels_negative", config_change("vae", latent_channels=-4)),
        "clip_width_string": model_copy("clip_width_string", config_change("text_encoder", hidden_size="64")),
        "timesteps_zero": model_copy("timesteps_zero", scheduler_change(num_train_timesteps=0)),
        "beta_string": model_copy("beta_string", scheduler_change(beta_start="small")),
        "truncated": model_copy("truncated", truncate),
        "lfs": model_copy("lfs", lfs_pointer),
        "pickle_only": model_copy("pickle_only", pickle_only),
        "fifo_weights": model_copy("fifo_weights", fifo_weights),
        "loop_weights": model_copy("loop_weights", loop_weights),
        "folder_weights": model_copy("folder_weights", folder_weights),
        "two_variants": model_copy("two_variants", two_variants),
        "broken_vocab": model_copy("broken_vocab", broken_vocab),
        "vocab_list": model_copy("vocab_list", vocab_list),
        "no_scheduler": model_copy("no_scheduler", no_scheduler),
        "config_not_object": model_copy("config_not_object", config_not_object),
        "vae_as_unet": model_copy("vae_as_unet", vae_as_unet),
    }
    (root / "empty_folder").mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "empty.safetensors").write_bytes(b"")
    torch.save({"model": torch.nn.Linear(1, 1)}, root / "object.ckpt")
    torch.save([1, 2, 3], root / "list.ckpt")
    (root / "garbage.ckpt").write_bytes(b"\x80\x04garbage")
    # adapters (minidiff.lora, minidiff.embeddings): a LoRA and an embedding that fit the shapes model, and bad ones
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{to_k}.lora_down.weight": torch.zeros(2, 96), f"{to_k}.lora_up.weight": torch.zeros(48, 2)},
              root / "lora.safetensors")
    save_file({f"{to_k}.lora_down.weight": torch.zeros(2, 768), f"{to_k}.lora_up.weight": torch.zeros(48, 2)},
              root / "lora_sd15.safetensors")  # made for SD 1.5's 768-wide text
    save_file({f"{to_k}.lora_down.weight": torch.zeros(2, 96), f"{to_k}.lora_up.weight": torch.zeros(48, 4)},
              root / "lora_ranks.safetensors")
    torch.save({f"{to_k}.lora_down.weight": torch.zeros(2, 96)}, root / "lora.pt")
    save_file({"<w>": torch.zeros(96)}, root / "embedding.safetensors")
    lora_parts = {f"{to_k}.lora_down.weight": torch.zeros(2, 96), f"{to_k}.lora_up.weight": torch.zeros(48, 2)}
    save_file(lora_parts | {"bundle_emb.<v>.string_to_param.*": torch.zeros(1, 768)},
              root / "lora_bundle_sd15.safetensors")  # pivotal tuning's word, made for SD 1.5's 768-wide text
    save_file(lora_parts | {"bundle_emb.<v>.clip_l": torch.zeros(1, 768)}, root / "lora_bundle_sdxl.safetensors")
    save_file(lora_parts | {"bundle_emb.<v>.string_to_param.*": torch.zeros(1, 96),
                            "bundle_emb.a.string_to_param.*": torch.zeros(1, 96)},
              root / "lora_bundle_taken.safetensors")
    save_file({"emb_params": torch.zeros(1, 768)}, root / "embedding_sd15.safetensors")
    # generate --prompts FILE: one prompt per line
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    (root / "prompts_blank.txt").write_text("\n   \n\t\n")
    (root / "prompts_latin1.txt").write_bytes("a red circle\nun carr\u00e9 bleu\n".encode("latin-1"))
    (root / "prompts_many.txt").write_text("a red circle\n" * 1001)
    (root / "prompts_huge.txt").write_text("a red circle " * 90000)  # 1.1 MiB on one line
    # inpainting: masks and pictures that --mask refuses
    Image.new("L", (32, 32), 255).save(root / "mask_small.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(root / "transparent.png")
    Image.new("I;16", (64, 64), 300).save(root / "deep.png")
    # training folders (minidiff.finetune): pictures with same-named captions, good and bad, and a real checkpoint
    def train_folder(name, captions: dict, pictures=None):
        folder = root / name
        folder.mkdir()
        for stem in pictures if pictures is not None else captions:
            shutil.copy(good, folder / (stem if "." in stem else stem + ".png"))
        for stem, text in captions.items():
            (folder / f"{stem.partition('.')[0]}.txt").write_bytes(text)
    train_folder("train_data", {"a": b"a <w> picture", "b": b"a red <w>"})
    train_folder("train_no_caption", {"a": b"a <w>"}, pictures=["a", "b"])
    train_folder("train_empty_caption", {"a": b"  \n"})
    train_folder("train_not_utf8", {"a": b"a \xff picture"})
    train_folder("train_no_pictures", {"a": b"a <w>"}, pictures=[])
    train_folder("train_shared_caption", {"a": b"a <w>"}, pictures=["a.png", "a.jpg"])
    train_folder("train_truncated", {"a": b"a <w>"})
    (root / "train_truncated" / "a.png").write_bytes(good.read_bytes()[:60])
    from minidiff.finetune import FinetuneConfig, finetune

    finetune(load_pipeline("shapes", device="cpu"), root / "train_data", FinetuneConfig(steps=1, batch=1),
             root / "trained.safetensors", checkpoint=root / "train.checkpoint.safetensors", progress=False)
    return {"root": root, **{name: root / name for name in os.listdir(root)}, **models}


def file_listing(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if not p.is_symlink()}


# --- the command ---------------------------------------------------------------------------------------------

# (id, argv, fragment); "{x}" in an argument is replaced by files[x] (an input) and "@name" by tmp_path/name
# (an output folder of the row's own). Prepared outputs are listed in PREPARED.
GENERATE = ["generate", "a red circle", "--steps", "1", "--device", "cpu"]
INVERT = ["invert", "{good.png}", "--prompt", "a red circle", "--steps", "1", "--out", "@noise.safetensors",
          "--device", "cpu"]
TRAIN_AT = lambda folder, out="@l.safetensors": ["train", "lora", folder, "--device", "cpu", "--out", out]
TRAIN = TRAIN_AT("{train_data}")
TRAIN_WORD = ["train", "textual-inversion", "{train_data}", "--device", "cpu", "--out", "@w.safetensors"]
CLI_ROWS = [
    # numbers: type and range
    ("steps-zero", [*GENERATE, "--steps", "0"], "--steps must be an integer from 1 to 1000"),
    ("steps-negative", [*GENERATE, "--steps", "-3"], "--steps must be an integer from 1"),
    ("steps-word", [*GENERATE, "--steps", "ten"], "invalid int value: 'ten'"),
    ("steps-fraction", [*GENERATE, "--steps", "1.5"], "invalid int value"),
    ("steps-too-many", [*GENERATE, "--steps", "1001"], "from 1 to 1000"),
    ("guidance-nan", [*GENERATE, "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("guidance-inf", [*GENERATE, "--guidance", "inf"], "--guidance must be a finite number"),
    ("guidance-minus-inf", [*GENERATE, "--guidance=-inf"], "--guidance must be a finite number"),
    ("guidance-word", [*GENERATE, "--guidance", "high"], "invalid float value"),
    ("seed-negative", [*GENERATE, "--seed", "-1"], "--seed must be an integer from 0"),
    ("seed-huge", [*GENERATE, "--seed", "9" * 40], "use a seed from 0 to 2**63 - 1"),
    ("seed-2-64", [*GENERATE, "--seed", str(2**64)], "--seed must be an integer"),
    ("seed-word", [*GENERATE, "--seed", "lucky"], "invalid int value"),
    ("size-zero", [*GENERATE, "--size", "0"], "--size 0: each side must be a multiple of 8"),
    ("size-negative", [*GENERATE, "--size", "-64"], "multiple of 8"),
    # adapters: --lora FILE[:SCALE], --embedding FILE[:TOKEN]
    ("lora-missing", [*GENERATE, "--lora", "nowhere.safetensors"], "--lora 'nowhere.safetensors': no such file"),
    ("lora-scale-word", [*GENERATE, "--lora", "{lora.safetensors}:abc"], "the scale after ':' must be a number"),
    ("lora-scale-nan", [*GENERATE, "--lora", "{lora.safetensors}:nan"], "must be a number, got 'nan'"),
    ("lora-pickle", [*GENERATE, "--lora", "{lora.pt}"], "is a pickle file"),
    ("lora-wrong-base", [*GENERATE, "--lora", "{lora_sd15.safetensors}"], "made for another base model"),
    ("lora-wrong-rank", [*GENERATE, "--lora", "{lora_ranks.safetensors}"], "rank 2 but lora_up rank 4"),
    ("lora-not-a-lora", [*GENERATE, "--lora", "{embedding.safetensors}"], "is not a LoRA"),
    ("lora-bundle-wrong-base", [*GENERATE, "--lora", "{lora_bundle_sd15.safetensors}"],
     "the bundled word '<v>' is 768 wide but this text encoder is 96 wide"),
    ("lora-bundle-sdxl", [*GENERATE, "--lora", "{lora_bundle_sdxl.safetensors}"], "bundles an SDXL word"),
    ("lora-bundle-word-taken", [*GENERATE, "--lora", "{lora_bundle_taken.safetensors}"], "clashes with 'a'"),
    ("embedding-missing", [*GENERATE, "--embedding", "gone.safetensors:<w>"], "no such file"),
    ("embedding-empty-token", [*GENERATE, "--embedding", "{embedding.safetensors}:"], "the token after ':'"),
    ("embedding-wrong-base", [*GENERATE, "--embedding", "{embedding_sd15.safetensors}:<w>"], "768 wide"),
    ("size-not-multiple", [*GENERATE, "--size", "63"], "try 64"),
    ("size-huge", [*GENERATE, "--size", "100000"], "from 8 to 16384"),
    ("size-word", [*GENERATE, "--size", "big"], "--size must be N or WIDTHxHEIGHT"),
    ("size-half-pair", [*GENERATE, "--size", "64x"], "--size must be N or WIDTHxHEIGHT"),
    ("size-three", [*GENERATE, "--size", "64x64x64"], "--size must be N or WIDTHxHEIGHT"),
    ("size-zero-height", [*GENERATE, "--size", "64x0"], "multiple of 8"),
    ("size-odd-width", [*GENERATE, "--size", "65x64"], "multiple of 8"),
    ("size-empty", [*GENERATE, "--size", ""], "--size must be N or WIDTHxHEIGHT"),
    ("num-images-zero", [*GENERATE, "--num-images", "0"], "--num-images must be an integer from 1 to 1000"),
    ("num-images-negative", [*GENERATE, "--num-images", "-2"], "--num-images must be"),
    ("num-images-million", [*GENERATE, "--num-images", "1000000"], "generate in several runs"),
    ("num-images-word", [*GENERATE, "--num-images", "many"], "invalid int value"),
    ("strength-without-image", [*GENERATE, "--strength", "0.5"], "give --image too"),
    ("strength-above-one", [*GENERATE, "--image", "{good.png}", "--strength", "1.5"],
     "--strength must be a number from 0.0 to 1.0"),
    ("strength-negative", [*GENERATE, "--image", "{good.png}", "--strength", "-0.1"], "--strength must be"),
    ("strength-nan", [*GENERATE, "--image", "{good.png}", "--strength", "nan"], "--strength must be"),
    ("strength-zero-trace", [*GENERATE, "--image", "{good.png}", "--strength", "0", "--trace", "@t.gif"],
     "nothing to trace"),
    ("strength-rounds-to-zero-grid", [*GENERATE, "--image", "{good.png}", "--strength", "0.5", "--grid", "@g.png"],
     "runs 0 of the 1 steps"),
    ("early-exit-fraction-over-one", [*GENERATE, "--early-exit", "1.5"], "a whole number of steps"),
    ("early-exit-zero", [*GENERATE, "--early-exit", "0"], "--early-exit must be a fraction in (0, 1]"),
    ("early-exit-negative", [*GENERATE, "--early-exit", "-0.5"], "--early-exit must be"),
    ("early-exit-nan", [*GENERATE, "--early-exit", "nan"], "--early-exit must be"),
    ("early-exit-inf", [*GENERATE, "--early-exit", "inf"], "--early-exit must be"),
    ("early-exit-past-steps", [*GENERATE, "--early-exit", "5"], "--early-exit must be an integer from 1 to 1"),
    # SDXL's refiner as the second stage: --refiner PATH_OR_NAME [--refiner-start FRACTION]
    ("refiner-start-without-refiner", [*GENERATE, "--refiner-start", "0.7"], "give --refiner too, or drop it"),
    ("refiner-start-zero", [*GENERATE, "--refiner", "sdxl-refiner", "--refiner-start", "0"],
     "--refiner-start must be a fraction strictly between 0 and 1 (e.g. 0.8), got 0.0"),
    ("refiner-start-one", [*GENERATE, "--refiner", "sdxl-refiner", "--refiner-start", "1"], "strictly between 0 and 1"),
    ("refiner-start-nan", [*GENERATE, "--refiner", "sdxl-refiner", "--refiner-start", "nan"], "got nan"),
    ("refiner-start-word", [*GENERATE, "--refiner", "sdxl-refiner", "--refiner-start", "late"], "invalid float value"),
    ("refiner-empty", [*GENERATE, "--refiner", ""], "--refiner is empty: give the refiner's path or known name"),
    ("refiner-with-image", [*GENERATE, "--refiner", "sdxl-refiner", "--image", "{good.png}"],
     "--image does not go with --refiner"),
    ("refiner-with-trace", [*GENERATE, "--refiner", "sdxl-refiner", "--trace", "@t.gif"], "drop --trace or --refiner"),
    ("refiner-missing", [*GENERATE, "--refiner", "nowhere"], "'nowhere' is neither a file or folder nor a known model"),
    ("refiner-non-sdxl-base", [*GENERATE, "--refiner", str(SHAPES)], "is not an SDXL base model"),
    # names and choices
    ("sampler-unknown", [*GENERATE, "--sampler", "dpm"], "unknown sampler 'dpm': use one of ddim"),
    ("sampler-empty", [*GENERATE, "--sampler", ""], "unknown sampler ''"),
    ("sampler-escape", [*GENERATE, "--sampler", "\x1b[31mred"], "unknown sampler '\\x1b[31mred'"),
    ("device-unknown", [*GENERATE, "--device", "gpu9"], "unknown device 'gpu9'"),
    ("device-cuda-index", [*GENERATE, "--device", "cuda:99"], "cuda"),
    ("device-number", [*GENERATE, "--device", "-1"], "device"),
    ("dtype-unknown", [*GENERATE, "--dtype", "float64"], "invalid choice: 'float64'"),
    ("preview-unknown", [*GENERATE, "--preview", "fast"], "invalid choice: 'fast'"),
    ("unknown-option", [*GENERATE, "--colour", "red"], "unrecognized arguments: --colour red"),
    ("no-prompt", ["generate"], "give a prompt (in quotes), or --prompts FILE"),
    # --prompts FILE
    ("prompts-and-prompt", [*GENERATE, "--prompts", "{prompts.txt}"], "give a prompt, or --prompts FILE (one "
     "prompt per line), not both"),
    ("prompts-missing", ["generate", "--prompts", "nowhere.txt"], "--prompts nowhere.txt does not exist"),
    ("prompts-folder", ["generate", "--prompts", "{empty_folder}"], "is a folder"),
    ("prompts-fifo", ["generate", "--prompts", "{fifo.png}"], "is a FIFO, not a regular file"),
    ("prompts-blank", ["generate", "--prompts", "{prompts_blank.txt}"], "has no prompts: write one prompt per line"),
    ("prompts-not-utf8", ["generate", "--prompts", "{prompts_latin1.txt}"], "is not UTF-8 text (line 2, byte 20)"),
    ("prompts-too-many", ["generate", "--prompts", "{prompts_many.txt}"], "has 1001 prompts, more than 1000"),
    ("prompts-huge", ["generate", "--prompts", "{prompts_huge.txt}"], "MiB, more than the 1 MiB allowed"),
    ("prompts-num-images", ["generate", "--prompts", "{prompts.txt}", "--num-images", "2"],
     "--num-images goes with one prompt, not --prompts"),
    ("prompts-trace", ["generate", "--prompts", "{prompts.txt}", "--trace", "@t.gif"], "--trace goes with one prompt"),
    ("prompts-grid", ["generate", "--prompts", "{prompts.txt}", "--grid", "@g.png"], "drop --grid"),
    ("prompts-seed-past-max", ["generate", "--prompts", "{prompts.txt}", "--seed", str(2**63 - 1)],
     "(the last prompt's seed) is past"),
    ("prompts-out-exists", ["generate", "--prompts", "{prompts.txt}", "--out", "@many.png"],
     "many_1.png already exists"),
    ("no-command", [], "the following arguments are required: command"),
    ("unknown-command", ["paint"], "invalid choice: 'paint'"),
    ("prompt-not-utf8", ["generate", "a red \udcff circle", "--steps", "1"], "is not valid UTF-8 text"),
    ("negative-not-utf8", [*GENERATE, "--negative", "\udcfe"], "--negative '\\udcfe' is not valid UTF-8"),
    # prompt weights: (word:1.3) in the prompt text; --no-prompt-weights reads it as plain text
    ("weight-word", ["generate", "a (red:abc) circle", "--steps", "1"], "the weight 'abc' in '(red:abc)' is not a"),
    ("weight-nan", ["generate", "(red:nan) circle", "--steps", "1"], "the weight 'nan' in '(red:nan)' is not a"),
    ("weight-negative", ["generate", "(red:-2) circle", "--steps", "1"], "the weight -2 in '(red:-2)' must lie"),
    ("weight-huge", ["generate", "(red:1000) circle", "--steps", "1"], "must lie from 0 to 10"),
    ("weight-in-negative", [*GENERATE, "--negative", "(red:x)"], "the weight 'x' in '(red:x)'"),
    ("weight-nested-too-deep", ["generate", "(" * 30 + "red" + ")" * 30, "--steps", "1"], "multiply to a weight"),
    ("model-not-utf8", [*GENERATE, "--model", "mod\udce9l"], "--model"),
    ("out-not-utf8", [*GENERATE, "--out", "@\udcffa.png"], "--out"),
    ("trace-not-utf8", [*GENERATE, "--trace", "@\udcfft.gif"], "is not valid UTF-8"),
    # outputs: extension, folder, collisions, existing files
    ("out-is-folder", [*GENERATE, "--out", "@"], "is a folder: give a file name"),
    ("out-no-extension", [*GENERATE, "--out", "@picture"], "has no extension: name it e.g."),
    ("out-unknown-extension", [*GENERATE, "--out", "@picture.xyz"], "unknown extension .xyz; use one of"),
    ("out-psd", [*GENERATE, "--out", "@picture.psd"], "unknown extension .psd"),
    ("out-missing-folder", [*GENERATE, "--out", "@no/such/folder/a.png"], "does not exist; create it first"),
    ("out-exists", [*GENERATE, "--out", "@old.png"], "old.png already exists: pass --overwrite"),
    ("out-numbered-exists", [*GENERATE, "--out", "@many.png", "--num-images", "2"], "many_1.png already exists"),
    ("out-under-a-file", [*GENERATE, "--out", "@old.png/a.png"], "the folder"),
    ("out-same-as-trace", [*GENERATE, "--out", "@same.gif", "--trace", "@same.gif"],
     "--trace and --out both write"),
    ("out-same-as-grid", [*GENERATE, "--out", "@same.png", "--grid", "@same.png"], "--grid and --out both write"),
    ("trace-same-as-grid-spelled-apart", [*GENERATE, "--trace", "@x.png", "--grid", "@./x.png"], "both write"),
    ("trace-jpeg", [*GENERATE, "--trace", "@t.jpg"], "t.jpg: unknown extension .jpg"),
    ("trace-no-extension", [*GENERATE, "--trace", "@trace"], "has no extension"),
    ("trace-folder", [*GENERATE, "--trace", "@"], "is a folder"),
    ("trace-exists", [*GENERATE, "--trace", "@old.gif"], "old.gif already exists"),
    ("grid-unknown-extension", [*GENERATE, "--grid", "@g.mp4"], "unknown extension .mp4"),
    ("grid-exists-under-symlink", [*GENERATE, "--grid", "@link.png"], "already exists"),
    ("attention-maps-extension", [*GENERATE, "--attention-maps", "@maps.mp4"], "unknown extension .mp4"),
    ("attention-maps-exists", [*GENERATE, "--attention-maps", "@old.png"], "old.png already exists"),
    ("attention-maps-same-as-out", [*GENERATE, "--out", "@same.png", "--attention-maps", "@same.png"], "both write"),
    ("guidance-cutoff-over", [*GENERATE, "--guidance-cutoff", "1.5"], "--guidance-cutoff must be a number from 0.0"),
    ("guidance-cutoff-nan", [*GENERATE, "--guidance-cutoff", "nan"], "--guidance-cutoff must be a number"),
    ("guidance-cutoff-word", [*GENERATE, "--guidance-cutoff", "half"], "invalid float value: 'half'"),
    ("out-dangling-symlink", [*GENERATE, "--out", "@dangling.png"], "not a regular file"),
    # inputs: the starting image
    ("image-missing", [*GENERATE, "--image", "@nothing.png"], "does not exist: check the path"),
    ("image-folder", [*GENERATE, "--image", "{folder.png}"], "is a folder"),
    ("image-fifo", [*GENERATE, "--image", "{fifo.png}"], "is a FIFO, not a regular file"),
    ("image-symlink-loop", [*GENERATE, "--image", "{loop_a}"], "a symlink loop?"),
    ("image-empty", [*GENERATE, "--image", "{empty.png}"], "cannot read the input image"),
    ("image-truncated", [*GENERATE, "--image", "{truncated.png}"], "cannot read the input image"),
    ("image-text", [*GENERATE, "--image", "{text.png}"], "cannot identify image file"),
    ("image-bomb", [*GENERATE, "--image", "{bomb.png}"], "more than 64 megapixels"),
    # inputs: inpainting's mask (--mask) and the picture it masks
    ("mask-without-image", [*GENERATE, "--mask", "{good.png}"], "--mask marks the part of --image to repaint"),
    ("mask-wrong-size", [*GENERATE, "--image", "{good.png}", "--mask", "{mask_small.png}"],
     "the mask is 32x32 px but the image is 64x64 px"),
    ("mask-text", [*GENERATE, "--image", "{good.png}", "--mask", "{text.png}"], "cannot read the mask"),
    ("mask-truncated", [*GENERATE, "--image", "{good.png}", "--mask", "{truncated.png}"], "cannot read the mask"),
    ("mask-missing", [*GENERATE, "--image", "{good.png}", "--mask", "@nothing.png"], "does not exist"),
    ("mask-folder", [*GENERATE, "--image", "{good.png}", "--mask", "{folder.png}"], "is a folder"),
    ("mask-bomb", [*GENERATE, "--image", "{good.png}", "--mask", "{bomb.png}"], "more than 64 megapixels"),
    ("mask-16-bit", [*GENERATE, "--image", "{good.png}", "--mask", "{deep.png}"], "the mask is a I"),
    ("mask-image-transparent", [*GENERATE, "--image", "{transparent.png}", "--mask", "{good.png}"],
     "the input image has transparent pixels"),
    ("mask-image-16-bit", [*GENERATE, "--image", "{deep.png}", "--mask", "{good.png}"], "16/32-bit"),
    ("mask-strength-above-one", [*GENERATE, "--image", "{good.png}", "--mask", "{good.png}", "--strength", "2"],
     "--strength must be a number from 0.0 to 1.0"),
    # the model
    ("model-unknown-name", [*GENERATE, "--model", "sd99"], "neither a file or folder nor a known model"),
    ("model-missing-path", [*GENERATE, "--model", "@nothing/model.safetensors"], "neither a file or folder"),
    ("model-empty-folder", [*GENERATE, "--model", "{empty_folder}"], "neither a diffusers model folder"),
    ("model-text-file", [*GENERATE, "--model", "{notes.txt}"], "not a weights file minidiff knows"),
    ("model-empty-safetensors", [*GENERATE, "--model", "{empty.safetensors}"], "damaged or incomplete"),
    ("model-symlink-loop", [*GENERATE, "--model", "{loop_a}"], "a symlink loop?"),
    ("model-fifo", [*GENERATE, "--model", "{fifo.safetensors}"], "is a FIFO"),
    ("model-pickle", [*GENERATE, "--model", "{object.ckpt}"], "pickle file: unpickling can run arbitrary code"),
    ("model-evil-names", [*GENERATE, "--model", "{evil_names}"], "\\x1b[2J\\x1b]0;pwned\\x07evil"),
    ("model-int64", [*GENERATE, "--model", "{int64}"], "not floating point: conv_in.weight (torch.int64)"),
    ("model-config-string-list", [*GENERATE, "--model", "{block_out_string}"],
     'block_out_channels="48,96" should be a non-empty list of whole numbers'),
    ("model-config-string-number", [*GENERATE, "--model", "{sample_size_string}"], 'sample_size="8" should be'),
    ("model-config-bool-count", [*GENERATE, "--model", "{layers_bool}"], "layers_per_block=true should be"),
    ("model-config-negative", [*GENERATE, "--model", "{vae_channels_negative}"], "latent_channels=-4 should be"),
    ("model-clip-config-string", [*GENERATE, "--model", "{clip_width_string}"], 'hidden_size="64" should be'),
    ("model-timesteps-zero", [*GENERATE, "--model", "{timesteps_zero}"], "num_train_timesteps must be an integer"),
    ("model-beta-string", [*GENERATE, "--model", "{beta_string}"], "beta_start must be a number"),
    ("model-truncated", [*GENERATE, "--model", "{truncated}"], "damaged or incomplete"),
    ("model-lfs-pointer", [*GENERATE, "--model", "{lfs}"], "Git LFS pointer"),
    ("model-pickle-only", [*GENERATE, "--model", "{pickle_only}"], "allow_pickle=True from Python"),
    ("model-weights-loop", [*GENERATE, "--model", "{loop_weights}"], "a symlink loop?"),
    ("model-weights-folder", [*GENERATE, "--model", "{folder_weights}"], "is a folder: give the file inside"),
    ("model-broken-vocab", [*GENERATE, "--model", "{broken_vocab}"], "vocab.json"),
    ("model-vocab-list", [*GENERATE, "--model", "{vocab_list}"], "tokenizer"),
    ("model-no-scheduler", [*GENERATE, "--model", "{no_scheduler}"], "no scheduler/scheduler_config.json"),
    ("model-config-not-object", [*GENERATE, "--model", "{config_not_object}"], "must hold a JSON object"),
    ("model-vae-config-as-unet", [*GENERATE, "--model", "{vae_as_unet}"], "describes a AutoencoderKL"),
    # after loading, before the work: sizes against memory, the step grid
    ("size-past-memory", [*GENERATE, "--size", "16384"], "more than the"),
    ("steps-past-the-grid", [*GENERATE, "--steps", "1000"], "use fewer steps (or, from Python"),
    # invert: a picture back to its noise, and generate --noise
    ("invert-image-missing", [*INVERT[:1], "@nothing.png", *INVERT[2:]], "does not exist: check the path"),
    ("invert-image-text", [*INVERT[:1], "{text.png}", *INVERT[2:]], "cannot identify image file"),
    ("invert-image-transparent", [*INVERT[:1], "{transparent.png}", *INVERT[2:]], "has transparent pixels"),
    ("invert-image-16-bit", [*INVERT[:1], "{sixteen_bit.png}", *INVERT[2:]], "16/32-bit"),
    ("invert-image-odd-size", [*INVERT[:1], "{odd_size.png}", *INVERT[2:]], "pass --size 64x64"),
    ("invert-no-prompt", INVERT[:2] + INVERT[4:], "the following arguments are required: --prompt"),
    ("invert-out-exists", [*INVERT, "--out", "@old.safetensors"], "already exists: pass --overwrite"),
    ("invert-out-extension", [*INVERT, "--out", "@noise.pt"], "unknown extension .pt; use one of .safetensors"),
    ("invert-out-no-extension", [*INVERT, "--out", "@noise"], "has no extension"),
    ("invert-reconstruction-extension", [*INVERT, "--reconstruction", "@again.xyz"], "unknown extension .xyz"),
    ("invert-steps-zero", [*INVERT, "--steps", "0"], "--steps must be an integer from 1 to 1000"),
    ("invert-steps-word", [*INVERT, "--steps", "ten"], "invalid int value"),
    ("invert-guidance-nan", [*INVERT, "--guidance", "nan"], "--guidance must be a finite number"),
    ("invert-size-odd", [*INVERT, "--size", "60"], "try 64"),
    ("invert-model-missing", [*INVERT, "--model", "@nothing"], "neither a file or folder"),
    ("invert-steps-past-the-grid", [*INVERT, "--steps", "1000"], "use fewer steps (or, from Python"),
    ("noise-missing", [*GENERATE, "--noise", "@nothing.safetensors"], "--noise"),
    ("noise-not-safetensors", [*GENERATE, "--noise", "{notes.txt}"], "is not a safetensors file"),
    ("noise-other-key", [*GENERATE, "--noise", "{noise_other_key.safetensors}"], "holds no 'noise' tensor"),
    ("noise-3d", [*GENERATE, "--noise", "{noise_3d.safetensors}"], "not float latents (batch, channels"),
    ("noise-wrong-size", [*GENERATE, "--noise", "{noise.safetensors}", "--size", "128"],
     "holds noise for 64x64 px pictures, but --size asks for 128x128"),
    ("noise-wrong-count", [*GENERATE, "--noise", "{noise.safetensors}", "--num-images", "2"], "pass --num-images 1"),
    ("noise-wrong-channels", [*GENERATE, "--noise", "{noise_3ch.safetensors}"], "holds 3-channel latents"),
    ("noise-bad-metadata", [*GENERATE[:2], *GENERATE[4:], "--noise", "{noise_bad_steps.safetensors}"],
     "its metadata steps='many' is not a whole number: give --steps yourself"),
    ("noise-with-image", [*GENERATE, "--noise", "{noise.safetensors}", "--image", "{good.png}"], "give one of them"),
    # minidiff train lora | textual-inversion: the folder, the numbers, the outputs, a resume
    ("train-folder-missing", [*TRAIN_AT("@nowhere")], "is not a folder: give a folder of pictures"),
    ("train-folder-a-file", [*TRAIN_AT("{notes.txt}")], "is not a folder"),
    ("train-folder-no-pictures", [*TRAIN_AT("{train_no_pictures}")], "holds no pictures"),
    ("train-picture-without-caption", [*TRAIN_AT("{train_no_caption}")], "b.png has no caption: write it in"),
    ("train-caption-empty", [*TRAIN_AT("{train_empty_caption}")], "a.txt is empty"),
    ("train-caption-not-utf8", [*TRAIN_AT("{train_not_utf8}")], "a.txt is not UTF-8 text"),
    ("train-caption-shared", [*TRAIN_AT("{train_shared_caption}")], "share the caption file a.txt"),
    ("train-picture-truncated", [*TRAIN_AT("{train_truncated}")], "cannot read the input image"),
    ("train-method-unknown", ["train", "dreambooth", "{train_data}"], "invalid choice: 'dreambooth'"),
    ("train-steps-zero", [*TRAIN, "--steps", "0"], "--steps must be an integer from 1"),
    ("train-steps-word", [*TRAIN, "--steps", "many"], "invalid int value: 'many'"),
    ("train-batch-zero", [*TRAIN, "--batch", "0"], "--batch must be an integer from 1 to 4096"),
    ("train-lr-nan", [*TRAIN, "--lr", "nan"], "--lr must be a number from 1e-08 to 1.0, got nan"),
    ("train-lr-zero", [*TRAIN, "--lr", "0"], "--lr must be a number from 1e-08"),
    ("train-warmup-negative", [*TRAIN, "--warmup", "-1"], "--warmup must be an integer from 0"),
    ("train-rank-zero", [*TRAIN, "--rank", "0"], "--rank must be an integer from 1 to 1024"),
    ("train-alpha-negative", [*TRAIN, "--alpha", "-4"], "--alpha must be a number from 1e-06"),
    ("train-seed-negative", [*TRAIN, "--seed", "-1"], "--seed must be an integer from 0"),
    ("train-save-every-zero", [*TRAIN, "--save-every", "0"], "--save-every must be an integer from 1"),
    ("train-device-unknown", [*TRAIN, "--device", "gpu9"], "unknown device 'gpu9'"),
    ("train-model-unknown", [*TRAIN, "--model", "sd99"], "neither a file or folder nor a known model"),
    ("train-out-extension", [*TRAIN_AT("{train_data}", "@l.pt")],
     "l.pt: unknown extension .pt; use one of .safetensors"),
    ("train-out-exists", [*TRAIN_AT("{train_data}", "@old.safetensors")], "old.safetensors already exists"),
    ("train-out-is-folder", [*TRAIN_AT("{train_data}", "@")], "is a folder"),
    ("train-checkpoint-extension", [*TRAIN, "--checkpoint", "@c.ckpt"], "unknown extension .ckpt"),
    ("train-checkpoint-same-as-out", [*TRAIN, "--checkpoint", "@l.safetensors"], "both write"),
    ("train-loss-curve-jpeg", [*TRAIN, "--loss-curve", "@curve.jpg"], "--loss-curve"),
    ("train-loss-curve-exists", [*TRAIN, "--loss-curve", "@old.png"], "old.png already exists"),
    ("train-resume-missing", [*TRAIN, "--resume", "@gone.safetensors"], "does not exist"),
    ("train-resume-pickle", [*TRAIN, "--resume", "{object.ckpt}"], "--resume"),
    ("train-resume-not-a-checkpoint", [*TRAIN, "--resume", "{lora.safetensors}"],
     "is not a minidiff fine-tuning checkpoint"),
    ("train-resume-other-rank", [*TRAIN, "--batch", "1", "--rank", "8", "--resume", "{train.checkpoint.safetensors}"],
     "was trained with rank = 4, this run asks for 8"),
    ("train-resume-finished", [*TRAIN, "--batch", "1", "--steps", "1", "--resume", "{train.checkpoint.safetensors}"],
     "is at step 1 already: ask for more --steps"),
    ("train-word-no-token", ["train", "textual-inversion", "{train_data}"], "required: --token"),
    ("train-word-token-spaces", [*TRAIN_WORD, "--token", "my word"], "--token must be one word without spaces"),
    ("train-word-token-empty", [*TRAIN_WORD, "--token", ""], "--token must be one word"),
    ("train-word-not-in-captions", [*TRAIN_WORD, "--token", "<zz>"], "no caption in"),
    ("train-word-taken", [*TRAIN_WORD, "--token", "a"], "clashes with"),
    ("train-word-vectors-zero", [*TRAIN_WORD, "--token", "<w>", "--vectors", "0"],
     "--vectors must be an integer from 1"),
    ("train-word-vectors-many", [*TRAIN_WORD, "--token", "<w>", "--vectors", "17"], "77 positions"),
    ("train-word-init-empty", [*TRAIN_WORD, "--token", "<w>", "--init-word", " "], "has no tokens"),
    ("train-lora-token-spaces", [*TRAIN, "--token", "my word"], "--token must be one word without spaces"),
    ("train-lora-token-not-in-captions", [*TRAIN, "--token", "<zz>"], "no caption in"),
    ("train-lora-token-taken", [*TRAIN, "--token", "a"], "clashes with"),
    ("train-lora-word-lr-nan", [*TRAIN, "--token", "<w>", "--word-lr", "nan"], "--word-lr must be a number"),
    ("train-lora-word-lr-big", [*TRAIN, "--token", "<w>", "--word-lr", "3"], "--word-lr must be a number from"),
    ("train-lora-vectors-without-token", [*TRAIN, "--vectors", "2"], "give --token <my-word> too"),
    ("train-lora-init-word-without-token", [*TRAIN, "--init-word", "red"], "--init-word shapes the new word"),
    ("train-lora-vectors-zero", [*TRAIN, "--token", "<w>", "--vectors", "0"], "--vectors must be an integer"),
    # the other commands
    ("info-missing", ["info", "@nothing"], "neither a file or folder"),
    ("download-unknown", ["download", "sd99"], "unknown model 'sd99'"),
    ("sampler-table-batch-zero", ["sampler-table", "--batch", "0"], "--batch must be an integer from 1"),
    ("sampler-table-prompts-zero", ["sampler-table", "--prompts", "0"], "--prompts must be"),
    ("sampler-table-guidance-nan", ["sampler-table", "--guidance", "nan"], "--guidance must be a finite number"),
    ("sampler-table-seed-negative", ["sampler-table", "--seed", "-5"], "--seed must be"),
    ("sampler-table-grid-extension", ["sampler-table", "--grid", "@g.xyz"], "unknown extension .xyz"),
    ("sampler-table-grid-exists", ["sampler-table", "--grid", "@old.png"], "already exists"),
    ("sampler-table-device", ["sampler-table", "--device", "tpu"], "unknown device"),
    ("bench-size-zero", ["bench", "--size", "0"], "--size must be an integer from 8"),
    ("bench-size-odd", ["bench", "--config", "tiny", "--size", "100"], "multiple of 64"),
    ("bench-images-zero", ["bench", "--images", "0"], "--images must be"),
    ("bench-threads-zero", ["bench", "--threads", "0"], "--threads must be"),
    ("bench-steps-zero", ["bench", "--steps", "0"], "--steps must be"),
    ("bench-same-outputs", ["bench", "--json", "@r.txt", "--csv", "@r.txt"], "both write"),
    ("bench-device", ["bench", "--device", "abacus"], "unknown device"),
    ("profile-rows-zero", ["profile", "--rows", "0"], "--rows must be"),
    ("profile-trace-extension", ["profile", "--trace", "@p.txt"], "unknown extension .txt"),
    ("export-onnx-to-file", ["export-onnx", "{notes.txt}"], "is a file, not a folder"),
    ("export-onnx-missing-folder", ["export-onnx", "@nothing"], "does not exist: create it first"),
    ("export-onnx-size", ["export-onnx", "@", "--size", "0"], "--size 0"),
    ("export-onnx-exists", ["export-onnx", "@", "--size", "64"], "unet.onnx already exists"),
]
PREPARED = {"old.safetensors": b"old",
            "old.png": b"old", "old.gif": b"old", "many_1.png": b"old", "target.png": b"old", "unet.onnx": b"old"}


def expand(argv, files, out: Path):
    expanded = []
    for arg in argv:
        if arg.startswith("{") and arg.endswith("}"):
            arg = str(files[arg[1:-1]])
        elif arg.startswith("{") and "}:" in arg:  # an adapter spec, {file}:tail
            name, _, tail = arg[1:].partition("}:")
            arg = f"{files[name]}:{tail}"
        elif arg.startswith("@"):
            arg = str(out / arg[1:]) if arg != "@" else str(out)
        expanded.append(arg)
    return expanded


def prepare(out: Path):
    for name, data in PREPARED.items():
        (out / name).write_bytes(data)
    os.symlink(out / "target.png", out / "link.png")
    os.symlink(out / "nowhere.png", out / "dangling.png")


@pytest.mark.parametrize(("argv", "fragment"), [row[1:] for row in CLI_ROWS], ids=[row[0] for row in CLI_ROWS])
def test_command_refuses_with_one_line(files, tmp_path, monkeypatch, capsys, argv, fragment):
    out = tmp_path / "out"
    out.mkdir()
    prepare(out)
    monkeypatch.chdir(out)
    before = file_listing(out), file_listing(files["root"])
    start = time.monotonic()
    try:
        status = main(expand(argv, files, out))
    except SystemExit as exit:  # argparse
        status = exit.code
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("minidiff: error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert "\x1b" not in err and "\x07" not in err  # nothing from a file reaches the terminal raw
    assert (file_listing(out), file_listing(files["root"])) == before  # nothing written, nothing replaced
    assert elapsed < ROW_SECONDS


def test_the_table_covers_enough(files):
    assert len(CLI_ROWS) + len(API_ROWS) + len(SUBPROCESS_ROWS) + len(NUMBER_ROWS) >= 150


# --- numbers from the model: NaN from the UNet or the VAE is an error, never a black image with exit 0 --------


def nan_unet(monkeypatch):
    from minidiff.unet import UNet

    original = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))


def nan_vae(monkeypatch):
    from minidiff.vae import AutoencoderKL

    original = AutoencoderKL.decode
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, *a, **k: original(self, *a, **k) * float("nan"))


NUMBER_ROWS = [
    ("unet-nan", nan_unet, [], "the model returned NaN or inf at step 0"),
    ("vae-nan-fp16-with-trace", nan_vae, ["--dtype", "float16", "--trace", "t.gif"], "NaN/inf in float32 too"),
    ("vae-nan-fp32", nan_vae, ["--dtype", "float32"], "also after its float32 redo"),
]


@pytest.mark.parametrize(("break_it", "extra", "fragment"), [row[1:] for row in NUMBER_ROWS],
                         ids=[row[0] for row in NUMBER_ROWS])
def test_nan_is_an_error_and_writes_nothing(tmp_path, monkeypatch, capsys, break_it, extra, fragment):
    break_it(monkeypatch)
    monkeypatch.chdir(tmp_path)
    status = main([*GENERATE, "--out", "image.png", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("minidiff")]
    assert status == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# --- in a subprocess: signals, hangs, bytes that are not UTF-8 ---------------------------------------------------

SIGTERM_WHILE_WRITING = """
import os, signal, sys
from minidiff.files import atomic_save
def save(path):
    with open(path, "wb") as f:
        f.write(b"GIF89a half")
        f.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        f.write(b"never")
atomic_save(sys.argv[1], save)
"""


def run(args, cwd, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, timeout=timeout)


SUBPROCESS_ROWS = ["sigterm-while-writing", "fifo-weights", "prompt-bytes"]


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path):
    result = run([sys.executable, "-c", SIGTERM_WHILE_WRITING, str(tmp_path / "t.gif")], tmp_path)
    assert result.returncode == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_fifo_as_weights_is_refused_without_hanging(files, tmp_path):
    result = run([sys.executable, "-m", "minidiff", *GENERATE, "--model", str(files["fifo_weights"]), "--out", "a.png"],
                 tmp_path, timeout=ROW_SECONDS)
    err = result.stderr.decode()
    assert result.returncode == 2 and "is a FIFO, not a regular file" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_that_is_not_utf8(tmp_path):
    argv = [b"generate", b"a red \xff circle", b"--steps", b"1", b"--out", b"a.png"]
    result = run([sys.executable.encode(), b"-m", b"minidiff", *argv], tmp_path)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 2 and "minidiff: error: the prompt" in err and "not valid UTF-8" in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# --- the Python API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def model_ok(x, t):
    return torch.zeros_like(x)


def call(**options):
    return lambda ctx: ctx["pipe"]("a red circle", **({"steps": 1, "progress": False} | options))


def sample_with(**options):
    noise = options.pop("noise", torch.randn(1, 4, 8, 8))
    model = options.pop("model", model_ok)
    return lambda ctx: sample(model, noise, **({"steps": 2} | options))


def optimize_with(**options):
    return lambda ctx: minidiff.optimize(ctx["pipe"], **options)


def load_with(**options):
    return lambda ctx: load_pipeline(**({"path_or_name": "shapes", "device": "cpu"} | options))


def loader(function, name, **options):
    return lambda ctx: function(ctx["files"][name] if name in ctx["files"] else name, **options)


API_ROWS = [
    # Pipeline.__call__: types and ranges of every argument
    ("prompt-none", lambda ctx: ctx["pipe"](None, steps=1), InputError, "prompt must be a string or a non-empty list"),
    ("prompt-int", lambda ctx: ctx["pipe"](123, steps=1), InputError, "got 123 (int)"),
    ("prompt-dict", lambda ctx: ctx["pipe"]({"a": 1}, steps=1), InputError, "(dict)"),
    ("prompt-empty-list", lambda ctx: ctx["pipe"]([], steps=1), InputError, "non-empty list"),
    ("prompt-list-of-ints", lambda ctx: ctx["pipe"]([1, 2], steps=1), InputError, "prompt must be a string"),
    ("prompt-surrogate", lambda ctx: ctx["pipe"]("\udcff", steps=1), InputError, "not valid UTF-8"),
    ("prompt-weight-word", lambda ctx: ctx["pipe"]("(red:abc)", steps=1), InputError, "'abc' in '(red:abc)' is not"),
    ("prompt-weight-inf", lambda ctx: ctx["pipe"]("(red:inf)", steps=1), InputError, "'inf' in '(red:inf)' is not"),
    ("prompt-weight-negative", call(negative_prompt="(red:-0.5)"), InputError, "-0.5 in '(red:-0.5)' must lie"),
    ("prompt-too-long", lambda ctx: ctx["pipe"]("red " * 1300, steps=1), InputError, "chunks of 75 tokens, more"),
    ("prompt-weights-string", call(prompt_weights="no"), InputError, "prompt_weights must be True or False"),
    ("negative-int", call(negative_prompt=5), InputError, "negative_prompt must be a string"),
    ("negative-count", call(negative_prompt=["a", "b"]), MinidiffError, "1 prompts but 2 negative prompts"),
    ("steps-zero", call(steps=0), InputError, "steps must be an integer from 1 to 1000, got 0"),
    ("steps-string", call(steps="5"), InputError, "got '5' (str)"),
    ("steps-float", call(steps=1.5), InputError, "steps must be an integer"),
    ("steps-bool", call(steps=True), InputError, "got True (bool)"),
    ("steps-too-many", call(steps=5000), InputError, "from 1 to 1000"),
    ("sampler-unknown", call(sampler="dpm"), InputError, "unknown sampler 'dpm'"),
    ("sampler-none", call(sampler=None), InputError, "unknown sampler None"),
    ("guidance-string", call(guidance_scale="7"), InputError, "guidance_scale must be a finite number"),
    ("guidance-nan", call(guidance_scale=float("nan")), InputError, "got nan"),
    ("guidance-inf", call(guidance_scale=float("inf")), InputError, "got inf"),
    ("guidance-rescale-nan", call(guidance_rescale=float("nan")), InputError, "guidance_rescale must be a number"),
    ("guidance-rescale-two", call(guidance_rescale=2.0), InputError, "from 0.0 to 1.0"),
    ("seed-negative", call(seed=-1), InputError, "seed must be an integer from 0"),
    ("seed-float", call(seed=1.5), InputError, "seed must be an integer"),
    ("seed-string", call(seed="1"), InputError, "got '1' (str)"),
    ("seed-huge", call(seed=2**70), InputError, "2**63 - 1"),
    ("height-string", call(height="64"), InputError, "height must be an integer"),
    ("height-zero", call(height=0), InputError, "height must be a positive multiple of 8"),
    ("height-odd", call(height=60), InputError, "try 64"),
    ("height-negative", call(height=-64), InputError, "multiple of 8"),
    ("width-float", call(width=64.0), InputError, "width must be an integer"),
    ("size-past-memory", call(height=65536, width=65536), InputError, "more than the"),
    ("num-images-zero", call(num_images=0), InputError, "num_images must be an integer from 1"),
    ("num-images-string", call(num_images="2"), InputError, "(str)"),
    ("num-images-huge", call(num_images=10**6), InputError, "generate in several calls"),
    ("image-int", call(image=123), InputError, "must be a path"),
    ("image-missing", call(image="/no/such/picture.png"), InputError, "does not exist"),
    ("image-folder", lambda ctx: ctx["pipe"]("x", steps=1, image=ctx["files"]["folder.png"]), InputError, "folder"),
    ("image-truncated", lambda ctx: ctx["pipe"]("x", steps=1, image=ctx["files"]["truncated.png"]), InputError,
     "truncated.png"),
    ("strength-string", call(strength="0.5", image=Image.new("RGB", (64, 64))), InputError, "strength must be"),
    ("mask-without-image", call(mask=Image.new("L", (64, 64))), InputError, "pass image= (--image) too"),
    ("mask-wrong-size", call(image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 32))), InputError,
     "the mask is 64x32 px but the image is 64x64 px"),
    ("mask-int", call(image=Image.new("RGB", (64, 64)), mask=5), InputError, "must be a path"),
    ("mask-missing", call(image=Image.new("RGB", (64, 64)), mask="/no/such/mask.png"), InputError, "does not exist"),
    ("mask-text", lambda ctx: ctx["pipe"]("x", steps=1, image=Image.new("RGB", (64, 64)),
                                          mask=ctx["files"]["text.png"]), InputError, "cannot read the mask"),
    ("mask-image-transparent", call(image=Image.new("RGBA", (64, 64), (0, 0, 0, 10)), mask=Image.new("L", (64, 64))),
     InputError, "transparent pixels"),
    ("mask-image-float", call(image=Image.new("F", (64, 64)), mask=Image.new("L", (64, 64))), InputError,
     "the input image is a F (16/32-bit) picture"),
    ("strength-nan", call(strength=float("nan"), image=Image.new("RGB", (64, 64))), InputError, "got nan"),
    ("strength-zero-trace", call(strength=0.0, trace=True, image=Image.new("RGB", (64, 64))), InputError,
     "nothing to trace"),
    ("early-exit-over", call(early_exit=1.5), SamplerError, "early_exit must be a fraction in (0, 1]"),
    ("early-exit-string", call(early_exit="half"), SamplerError, "early_exit must be"),
    ("denoising-end-over", call(denoising_end=1.5), InputError, "denoising_end must be a number from 0.0 to 1.0"),
    ("denoising-end-string", call(denoising_end="0.8"), InputError, "got '0.8' (str)"),
    ("denoising-end-one", call(denoising_end=1.0), InputError, "strictly between 0 and 1 (e.g. 0.8), got 1.0"),
    ("denoising-start-zero", call(denoising_start=0.0), InputError, "denoising_start must be a fraction strictly"),
    ("denoising-start-without-latents", call(denoising_start=0.8), InputError, "denoising_start needs latents="),
    ("denoising-start-with-image", call(denoising_start=0.8, image=Image.new("RGB", (64, 64))), InputError,
     "give latents=, not image="),
    ("denoising-start-with-strength", call(denoising_start=0.8, strength=0.5, latents=torch.zeros(1, 4, 8, 8)),
     InputError, "drop strength"),
    ("denoising-start-after-end", call(denoising_start=0.8, denoising_end=0.5), InputError, "must come before"),
    ("denoising-end-before-first-step", call(denoising_end=0.01, steps=4), InputError, "stops before the first"),
    ("output-unknown", call(output="png"), InputError, "unknown output 'png': use one of pil, latent"),
    ("refine-not-sdxl", lambda ctx: refine(ctx["pipe"], ctx["pipe"], "x"), InputError, "is not an SDXL base model"),
    ("preview-unknown", call(preview="fast"), MinidiffError, "preview must be 'vae' or 'taesd'"),
    ("preview-taesd-missing", call(preview="taesd"), MinidiffError, "needs a TAESD"),
    ("callback-not-callable", call(callback=5), InputError, "callback must be a function"),
    ("callback-returns-number", call(callback=lambda **info: 3), InputError, "return None (nothing changes)"),
    ("callback-returns-unknown-key", call(callback=lambda **info: {"latents": 0}), InputError,
     "a dict with 'x' and/or 'guidance_scale'"),
    ("callback-guidance-string", call(callback=lambda **info: {"guidance_scale": "off"}), InputError,
     "the callback's guidance_scale must be a finite number, got 'off'"),
    ("callback-guidance-nan", call(callback=lambda **info: {"guidance_scale": float("nan")}), InputError,
     "guidance_scale must be a finite number, got nan"),
    ("callback-latent-shape", call(callback=lambda **info: torch.zeros(1, 4, 2, 2)), SamplerError,
     "return None (nothing changes) or a latent shaped like its x, (1, 4, 8, 8)"),
    ("callback-latent-nan", call(callback=lambda x, **info: {"x": x * float("nan")}), SamplerError, "NaN or inf"),
    ("attention-maps-string", call(attention_maps="yes"), InputError, "attention_maps must be True or False"),
    ("trace-string", call(trace="yes"), InputError, "trace must be True or False"),
    ("progress-string", call(progress="no"), InputError, "progress must be True or False"),
    ("latents-small", call(latents=torch.randn(1, 4, 4, 4)), InputError, "which is a 32x32 px image"),
    ("latents-channels", call(latents=torch.randn(1, 3, 8, 8)), InputError, "pass latents of shape (1, 4, 8, 8)"),
    ("latents-batch", call(latents=torch.randn(2, 4, 8, 8)), InputError, "1 image(s)"),
    ("latents-int", call(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), InputError, "float tensor"),
    ("latents-list", call(latents=[[0.0]]), InputError, "got list"),
    ("latents-nan", call(latents=torch.full((1, 4, 8, 8), float("nan"))), InputError, "latents hold NaN"),
    ("sampler-option-unknown", call(flavour=1), SamplerError, "has no option 'flavour'"),
    ("timesteps-empty", call(timesteps=[]), SamplerError, "empty"),
    ("timesteps-out-of-range", call(timesteps=[5000, 1]), SamplerError, "custom timesteps must be integers"),
    ("eta-two", call(sampler="ddim", eta=2.0), SamplerError, "eta must be a number from 0"),
    ("karras-ddim", call(sampler="ddim", karras=True), SamplerError, "karras=True is for the samplers"),
    ("spacing-unknown", call(spacing="random"), SamplerError, "unknown timestep spacing"),
    # Pipeline.invert (minidiff.inversion)
    ("invert-image-missing", lambda ctx: ctx["pipe"].invert("/no/such/picture.png", "x"), InputError, "does not exist"),
    ("invert-image-int", lambda ctx: ctx["pipe"].invert(5, "x"), InputError, "must be a path"),
    ("invert-transparent", lambda ctx: ctx["pipe"].invert(ctx["files"]["transparent.png"], "x"), InputError,
     "transparent pixels"),
    ("invert-prompt-none", lambda ctx: ctx["pipe"].invert(Image.new("RGB", (64, 64)), None), InputError,
     "prompt must be a string"),
    ("invert-steps-zero", lambda ctx: ctx["pipe"].invert(Image.new("RGB", (64, 64)), "x", steps=0), InputError,
     "steps must be an integer from 1 to 1000"),
    ("invert-guidance-nan", lambda ctx: ctx["pipe"].invert(Image.new("RGB", (64, 64)), "x", guidance_scale=math.nan),
     InputError, "guidance_scale must be a finite number"),
    ("invert-odd-size", lambda ctx: ctx["pipe"].invert(Image.new("RGB", (60, 64)), "x"), InputError,
     "pass width=64"),
    ("invert-callback", lambda ctx: ctx["pipe"].invert(Image.new("RGB", (64, 64)), "x", callback=3), InputError,
     "callback must be a function"),
    ("load-noise-missing", lambda ctx: minidiff.inversion.load_noise("/no/such/noise.safetensors"), InputError,
     "does not exist"),
    ("load-noise-text", lambda ctx: minidiff.inversion.load_noise(ctx["files"]["notes.txt"]), InputError,
     "is not a safetensors file"),
    # sample(): the samplers' front end
    ("sample-unknown-sampler", sample_with(sampler="x"), SamplerError, "unknown sampler 'x'"),
    ("sample-model-not-callable", sample_with(model=5), SamplerError, "model must be a function"),
    ("sample-noise-list", sample_with(noise=[1.0]), SamplerError, "noise must be a floating-point tensor"),
    ("sample-noise-int", sample_with(noise=torch.zeros(1, 4, 8, 8, dtype=torch.int32)), SamplerError,
     "floating-point"),
    ("sample-noise-scalar", sample_with(noise=torch.tensor(1.0)), SamplerError, "a batch of latents"),
    ("sample-noise-empty", sample_with(noise=torch.zeros(0, 4, 8, 8)), SamplerError, "a batch of latents"),
    ("sample-noise-nan", sample_with(noise=torch.full((1, 4, 8, 8), float("nan"))), SamplerError,
     "noise holds NaN"),
    ("sample-noise-inf", sample_with(noise=torch.full((1, 4, 8, 8), float("inf"))), SamplerError, "or inf"),
    ("sample-model-wrong-shape", sample_with(model=lambda x, t: torch.zeros(1, 1, 1, 1)), SamplerError,
     "the model returned (1, 1, 1, 1) for x_t of shape (1, 4, 8, 8)"),
    ("sample-model-channels", sample_with(model=lambda x, t: torch.zeros(1, 8, 8, 8)), SamplerError, "out_channels"),
    ("sample-model-not-tensor", sample_with(model=lambda x, t: 0.0), SamplerError, "the model returned float"),
    ("sample-model-nan", sample_with(model=lambda x, t: x * float("nan")), SamplerError,
     "the model returned NaN or inf"),
    ("sample-steps-zero", sample_with(steps=0), SamplerError, "steps must be an integer from 1"),
    ("sample-steps-string", sample_with(steps="2"), SamplerError, "steps must be an integer"),
    ("sample-early-exit", sample_with(early_exit=2.5), SamplerError, "early_exit"),
    ("sample-karras-string", sample_with(karras="yes"), SamplerError, "karras must be True or False"),
    ("sample-callback", sample_with(callback="print"), SamplerError, "callback must be a function"),
    ("sample-callback-returns-list", sample_with(callback=lambda **info: [1.0]), SamplerError,
     "the callback returned list"),
    ("sample-schedule", sample_with(schedule="sd"), SamplerError, "schedule must be a minidiff NoiseSchedule"),
    ("sample-prediction", sample_with(prediction_type="x0"), SamplerError, "unknown prediction_type"),
    ("sample-option", sample_with(sampler="euler", eta=0.5), SamplerError, "euler has no option 'eta'"),
    # optimize()
    ("optimize-compile-string", optimize_with(compile="yes"), MinidiffError, "compile must be True or False"),
    ("optimize-tile-small", optimize_with(vae_tile_size=4), MinidiffError, "vae_tile_size is a size in latent"),
    ("optimize-tile-bool", optimize_with(vae_tile_size=True), MinidiffError, "vae_tile_size"),
    ("optimize-attention", optimize_with(attention="flash9"), MinidiffError, "unknown attention backend"),
    ("optimize-attention-int", optimize_with(attention=5), MinidiffError, "attention must be one of"),
    ("optimize-slice-zero", optimize_with(attention_slice=0), MinidiffError, "slice_size must be a positive"),
    ("optimize-slice-float", optimize_with(attention_slice=2.5), MinidiffError, "whole number of queries"),
    ("optimize-compile-options", optimize_with(compile_options=5), MinidiffError, "compile_options must be a dict"),
    ("optimize-freeze-alone", optimize_with(freeze=True), MinidiffError, "use it with compile=True"),
    ("optimize-autotune-alone", optimize_with(autotune=True), MinidiffError, "autotune=True tunes the compiled"),
    ("optimize-autotune-string", optimize_with(compile=True, autotune="max"), MinidiffError,
     "autotune must be True or False"),
    ("optimize-cuda-graphs-cpu", optimize_with(cuda_graphs=True), MinidiffError, "needs the model on a CUDA GPU"),
    ("optimize-not-a-model", lambda ctx: minidiff.optimize(5), MinidiffError, "takes a Pipeline or a UNet"),
    # calibrate_int8(): before any call
    ("calibrate-int8-not-quantized", lambda ctx: minidiff.speed.calibrate_int8(ctx["pipe"].unet, lambda unet: None),
     MinidiffError, "call quantize_int8(model) first"),
    ("calibrate-int8-not-callable", lambda ctx: minidiff.speed.calibrate_int8(
        minidiff.speed.quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4))), [torch.ones(1, 4)]),
     MinidiffError, "takes run(model), a function that calls the model"),
    # load_pipeline: checked before anything loads
    ("load-unknown-option", load_with(turbo=True), InputError, "load_pipeline() has no option 'turbo'"),
    ("load-dtype-string", load_with(dtype="float64"), InputError, "unknown dtype 'float64'"),
    ("load-dtype-int8", load_with(dtype=torch.int8), InputError, "unknown dtype torch.int8"),
    ("load-device-int", load_with(device=3), InputError, "device must be a string"),
    ("load-device-unknown", load_with(device="gpu"), InputError, "unknown device 'gpu'"),
    ("load-allow-pickle-string", load_with(allow_pickle="yes"), InputError, "allow_pickle must be True or False"),
    ("load-path-none", load_with(path_or_name=None), InputError, "path_or_name must be a path"),
    ("load-path-int", load_with(path_or_name=5), InputError, "path_or_name must be a path"),
    ("load-path-empty", load_with(path_or_name=""), InputError, "path_or_name must be a path"),
    ("load-variant-int", load_with(variant=16), InputError, "variant must be a string"),
    ("load-prediction", load_with(prediction_type="x0"), InputError, "unknown prediction_type 'x0'"),
    ("load-taesd-int", load_with(taesd=1), InputError, "taesd must be a path"),
    ("load-unknown-model", load_with(path_or_name="sd99"), MinidiffError, "neither a file or folder"),
    ("load-pickle-opt-in-object", lambda ctx: load_pipeline(ctx["files"]["object.ckpt"], allow_pickle=True),
     CheckpointError, "it holds something other than tensors"),
    ("load-pickle-opt-in-list", lambda ctx: load_pipeline(ctx["files"]["list.ckpt"], allow_pickle=True),
     CheckpointError, "it holds a list, not a dict of tensors"),
    ("load-pickle-opt-in-garbage", lambda ctx: load_pipeline(ctx["files"]["garbage.ckpt"], allow_pickle=True),
     CheckpointError, "could not be read with torch.load(weights_only=True)"),
    # the loaders
    ("unet-none", lambda ctx: load_unet(None), InputError, "the model must be a path"),
    ("unet-missing", loader(load_unet, "/no/such/unet"), CheckpointError, "no such file or folder"),
    ("unet-fifo", loader(load_unet, "fifo.safetensors"), InputError, "is a FIFO"),
    ("unet-loop", loader(load_unet, "loop_a"), InputError, "a symlink loop?"),
    ("unet-pickle", loader(load_unet, "object.ckpt"), CheckpointError, "allow_pickle=True from Python"),
    ("unet-pickle-opt-in", loader(load_unet, "object.ckpt", allow_pickle=True), CheckpointError,
     "minidiff reads only tensors from a pickle"),
    ("unet-evil-names", loader(load_unet, "evil_names"), CheckpointError, "1 unexpected key(s): \\x1b[2J"),
    ("unet-int64", loader(load_unet, "int64"), CheckpointError, "not floating point"),
    ("unet-two-variants", loader(load_unet, "two_variants", variant="bf16"), CheckpointError,
     "choose one with variant='fp16' or None"),
    ("unet-config-string", loader(load_unet, "block_out_string"), CheckpointError, "block_out_channels=\"48,96\""),
    ("unet-empty-safetensors", loader(load_unet, "empty.safetensors"), CheckpointError, "damaged or incomplete"),
    ("unet-text", loader(load_unet, "notes.txt"), CheckpointError, "not a weights file"),
    ("unet-vae-config", loader(load_unet, "vae_as_unet"), CheckpointError, "load it with load_vae"),
    ("vae-negative-channels", loader(load_vae, "vae_channels_negative"), CheckpointError, "latent_channels=-4"),
    ("vae-folder", loader(load_vae, "empty_folder"), CheckpointError, "neither a diffusers model folder"),
    ("text-encoder-string", loader(load_text_encoder, "clip_width_string"), CheckpointError, 'hidden_size="64"'),
    ("tokenizer-broken", loader(load_tokenizer, "broken_vocab"), CheckpointError, "the tokenizer in"),
    ("tokenizer-list", loader(load_tokenizer, "vocab_list"), CheckpointError, "tokenizer"),
    ("taesd-empty-folder", loader(load_taesd, "empty_folder"), CheckpointError, "holds no TAESD"),
    # images and export
    ("from-pil-bomb", lambda ctx: from_pil(ctx["files"]["bomb.png"]), InputError, "more than 64 megapixels"),
    ("from-pil-truncated", lambda ctx: from_pil(ctx["files"]["truncated.png"]), InputError,
     "cannot read the input image"),
    ("from-pil-empty", lambda ctx: from_pil(ctx["files"]["empty.png"]), InputError, "cannot read the input image"),
    ("from-pil-fifo", lambda ctx: from_pil(ctx["files"]["fifo.png"]), InputError, "is a FIFO"),
    ("export-to-file", lambda ctx: minidiff.export.export_pipeline(ctx["pipe"], ctx["files"]["notes.txt"]),
     MinidiffError, "is a file, not a folder"),
    ("export-missing-folder", lambda ctx: minidiff.export.export_pipeline(ctx["pipe"], "/no/such/folder"),
     MinidiffError, "does not exist: create it first"),
    ("export-height-string", lambda ctx: minidiff.export.export_pipeline(ctx["pipe"], ctx["files"]["root"], "64"),
     InputError, "height must be an integer"),
    ("export-not-a-pipeline", lambda ctx: minidiff.export.export_pipeline(5, ctx["files"]["root"]),
     MinidiffError, "takes a minidiff Pipeline"),
    # outputs written through minidiff.files
    ("check-writable-exists", lambda ctx: minidiff.files.check_writable(ctx["files"]["notes.txt"], overwrite=False),
     OutputError, "already exists: pass --overwrite"),
    ("check-writable-folder", lambda ctx: minidiff.files.check_writable(ctx["files"]["empty_folder"]),
     OutputError, "it is a folder"),
    ("atomic-save-missing-folder", lambda ctx: minidiff.files.atomic_save("/no/such/folder/a.png", print),
     OutputError, "does not exist"),
]


@pytest.mark.parametrize(("action", "error", "fragment"), [row[1:] for row in API_ROWS],
                         ids=[row[0] for row in API_ROWS])
def test_python_api_refuses_with_a_named_error(files, pipe, action, error, fragment):
    import minidiff.export  # noqa: F401
    import minidiff.files  # noqa: F401
    import minidiff.inversion  # noqa: F401

    before = file_listing(files["root"])
    start = time.monotonic()
    with pytest.raises(error) as raised:
        action({"pipe": pipe, "files": files})
    message = str(raised.value)
    assert fragment in message, message
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only=False" not in message  # torch's advice is not minidiff's
    assert file_listing(files["root"]) == before
    assert time.monotonic() - start < ROW_SECONDS


def test_a_refused_overwrite_is_allowed_with_the_flag_and_outputs_get_normal_permissions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.png").write_bytes(b"old")
    assert main([*GENERATE, "--out", "image.png", "--trace", "trace.png", "--overwrite"]) == 0
    assert Image.open(tmp_path / "image.png").size == (64, 64)
    assert Image.open(tmp_path / "trace.png").format == "PNG"  # the extension decides: an animated PNG
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "image.png").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "trace.png"]


@pytest.mark.skipif(IS_ROOT, reason="root may write any file: read-only means nothing to it")
def test_a_read_only_output_is_not_replaced(tmp_path, capsys):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    path.chmod(0o444)
    assert main([*GENERATE, "--out", str(path), "--overwrite"]) == 2
    assert "is read-only" in capsys.readouterr().err and path.read_bytes() == b"old"
