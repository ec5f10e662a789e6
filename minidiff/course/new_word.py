"""Teach the shapes model a new word, a made-up name for one colour and shape, from a few dozen pictures.

    python -m minidiff.course.new_word [--methods base lora textual_inversion] [--lora-steps 1200] [--word-steps 300]

The new word "<dax>" names an orange triangle. `write_folder` draws the pictures (shapes.render) at six of the nine
places and writes each one's caption with the word where the colour and shape would be ("a small <dax> in the top
left"), as a folder that `minidiff train lora` / `minidiff train textual-inversion` read (minidiff.finetune). Then:

    with the word     held-out prompts put the word at the three places no training picture shows it, both sizes;
                      the checker (shapes.check) must read an orange triangle at that place
    without the word  the held-out combinations of the bundled model's own evaluation (evaluate.evaluate), with
                      the LoRA or the word loaded against without: what the adapter costs the rest of the model

Both learn the new token "<dax>": the LoRA by pivotal tuning (`minidiff train lora --token <dax>`: the word's
embedding row and a LoRA on the UNet alone, the text encoder untouched, the word bundled into the LoRA file),
textual inversion the row alone. Each is read back from the file it was written to, as `minidiff generate --lora /
--embedding` would.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from minidiff.course import shapes
from minidiff.course.evaluate import evaluate, generate
from minidiff.files import atomic_save, atomic_write_text
from minidiff.finetune import FinetuneConfig, finetune
from minidiff.pipeline import load_pipeline

TOKEN = "<dax>"  # the new word, for both methods
COLOUR, SHAPE = "orange", "triangle"
HELD_OUT_PLACES = ("top right", "left", "bottom")  # no training picture shows the word here
TRAIN_PLACES = tuple(p for p in shapes.POSITIONS if p not in HELD_OUT_PLACES)
WORD_TEMPLATES = (
    "a {size} {word} {where_phrase}",
    "{where}: {word}, {size}",
    "a {word}, {where}",
    "there is a {size} {word} {where_phrase}",
    "{word} {where_phrase}",
    "a picture of a {size} {word} {where_phrase}",
    "{where}, {size} {word}",
)
STEPS = {"lora": 1200, "textual_inversion": 300}  # optimizer steps of each adapter (batch 16)
REGULAR_PER_PICTURE = 3  # the LoRA's regularisation pictures per picture of the word
LORA_LR = 3e-5  # the UNet LoRA's learning rate beside the word's 5e-3 (pivotal tuning; see measure)
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "new_word.json"


def word_caption(word: str, spec: shapes.ShapeSpec, rng: np.random.Generator) -> str:
    """A caption of a picture of the word's shape, the word standing for its colour and shape."""
    pick = lambda options: options[rng.integers(len(options))]
    return pick(WORD_TEMPLATES).format(word=word, size=pick(shapes.SIZE_WORDS[spec.size]),
                                       where=pick(shapes.WHERE_WORDS[spec.position]),
                                       where_phrase=pick(shapes.WHERE_PHRASES[spec.position]))


def write_example(stem: Path, picture, caption: str):
    """stem.png and its caption in stem.txt, each written whole (a temporary file, then renamed)."""
    atomic_save(stem.parent / f"{stem.name}.png", picture.save)
    atomic_write_text(stem.parent / f"{stem.name}.txt", caption + "\n")


def write_folder(folder, word: str, n: int = 40, seed: int = 0, regular: int = 0) -> list:
    """n pictures of the word's shape at the training places (each place and size in turn), each with its caption
    in a .txt of the same name, and `regular` pictures of the model's own training split with their plain captions
    (kohya's regularisation pictures: they keep the rest of the model as it was); returns the specs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = [shapes.ShapeSpec(SHAPE, COLOUR, TRAIN_PLACES[i % len(TRAIN_PLACES)],
                              shapes.SIZES[(i // len(TRAIN_PLACES)) % 2]) for i in range(n)]
    for i, spec in enumerate(specs):
        write_example(folder / f"{word.strip('<>')}_{i:03d}", shapes.render(spec, rng), word_caption(word, spec, rng))
    for i, spec in enumerate(shapes.random_specs(regular, rng, "train")):
        write_example(folder / f"regular_{i:03d}", shapes.render(spec, rng), shapes.caption(spec, rng))
    return specs


def word_prompts(word: str, n: int, seed: int = 1) -> list:
    """n (prompt, spec) pairs with the word at the held-out places, both sizes, wording drawn from seed."""
    rng = np.random.default_rng(seed)
    specs = [shapes.ShapeSpec(SHAPE, COLOUR, HELD_OUT_PLACES[i % len(HELD_OUT_PLACES)],
                              shapes.SIZES[(i // len(HELD_OUT_PLACES)) % 2]) for i in range(n)]
    return [(word_caption(word, spec, rng), spec) for spec in specs]


def word_adherence(pipe, word: str, n: int, seed: int = 1, guidance_scale: float = 5.0) -> dict:
    """The checker's verdict on pictures of n held-out prompts with the word (DPM++ 2M, 20 steps)."""
    pairs = word_prompts(word, n, seed)
    images = generate(pipe, [prompt for prompt, _ in pairs], seed, steps=20, guidance_scale=guidance_scale)
    return shapes.adherence(images, [spec for _, spec in pairs])


def measure(work, methods=("base", "lora", "textual_inversion"), pictures: int = 40, prompts: int = 60,
            without: int = 256, steps: dict | None = None, progress: bool = True) -> dict:
    """For each method: the bundled model as it is ("base"), or an adapter trained on a folder of pictures and read
    back from its file; each judged with the word (word_adherence) and without it (evaluate). Returns the results.
    steps: optimizer steps per method (default STEPS). The LoRA trains beside three regularisation pictures per
    picture of the word (REGULAR_PER_PICTURE), which keep its UNet LoRA from drawing the word's shape for every
    prompt; its learning rate (LORA_LR) is measured on this model: at 1e-3 the UNet LoRA drew the held-out places'
    shapes wrong (72% right), at 1e-4 it cost 2.0 points of the other prompts, at 3e-5 1.2 (README)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    steps = STEPS | (steps or {})
    results = {}
    for method in methods:
        entry = {}
        if method != "base":
            folder = work / f"data_{method}"
            regular = REGULAR_PER_PICTURE * pictures if method == "lora" else 0  # a new token changes no other prompt
            write_folder(folder, TOKEN, pictures, regular=regular)
            config = FinetuneConfig(method=method, steps=steps[method], token=TOKEN,
                                    lr=LORA_LR if method == "lora" else None)
            out = work / f"{method}.safetensors"
            log = finetune(load_pipeline("shapes", device="cpu", dtype=torch.float32), folder, config, out,
                           loss_curve=work / f"{method}_loss.png", progress=progress)
            entry = {"pictures": pictures, "regular_pictures": regular, "steps": config.steps, "batch": config.batch,
                     "lr": config.lr, "final_loss": log["final_loss"], "train_minutes": log["seconds"] / 60,
                     "cpu_minutes": log["cpu_seconds"] / 60, "threads": torch.get_num_threads()}
            entry |= {"token": TOKEN, "word_lr": config.word_lr, "rank": config.rank} if method == "lora" else {}
        pipe = load_pipeline("shapes", device="cpu", dtype=torch.float32)
        if method == "lora":
            pipe.load_lora(out)
            pipe.fuse_lora()
        elif method == "textual_inversion":
            pipe.load_textual_inversion(out)
        scores = word_adherence(pipe, TOKEN, prompts)
        entry |= {"word": scores["all"], "word_colour": scores["colour"], "word_shape": scores["shape"],
                  "word_position": scores["position"], "word_prompts": prompts,
                  "without_word": evaluate(pipe, without)[0]["all"], "without_prompts": without}
        if method == "lora":  # what the bundled word draws alone, the UNet's LoRA unloaded (the word stays)
            pipe.unload_lora()
            entry["word_without_unet_lora"] = word_adherence(pipe, TOKEN, prompts)["all"]
        results[method] = entry
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.course.new_word", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["base", "lora", "textual_inversion"],
                        choices=["base", "lora", "textual_inversion"], help="what to measure (default: all three)")
    parser.add_argument("--pictures", type=int, default=40)
    parser.add_argument("--lora-steps", type=int, default=STEPS["lora"], help="optimizer steps of the LoRA")
    parser.add_argument("--word-steps", type=int, default=STEPS["textual_inversion"],
                        help="optimizer steps of textual inversion")
    parser.add_argument("--prompts", type=int, default=60, help="held-out prompts with the word")
    parser.add_argument("--without", type=int, default=256, help="held-out prompts without it")
    parser.add_argument("--work", default="new_word_work", help="folder for the pictures, files and loss curves")
    parser.add_argument("--out", default=str(RESULTS), help="the results JSON (methods measured are updated in it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by "
                        "threads waiting on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = measure(args.work, args.methods, args.pictures, args.prompts, args.without,
                      {"lora": args.lora_steps, "textual_inversion": args.word_steps})
    for entry in results.values():
        entry |= {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    atomic_write_text(out, json.dumps(merged | results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
