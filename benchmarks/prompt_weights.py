"""Prompt weights on the bundled shapes model: does up-weighting the colour word win against a negative prompt?

    python -m benchmarks.prompt_weights [--prompts 64] [--weights 1.3 1.6]
        [--json benchmarks/prompt_weights.json] [--grid course/images/prompt_weights.png]

Held-out prompts (minidiff.course.evaluate.held_out_prompts) are generated with the colour word of the prompt also
as the negative prompt ("a large red circle ..." against "red"), the colour word at weight 1 and at each of
--weights, written "(red:1.6)"; and once without a negative prompt, for reference. Every setting draws from the same
noise (one seed per batch). The shapes checker (minidiff.course.shapes) reads the colour back from the pixels.
The JSON holds the adherence of every setting; benchmarks/quoted.py quotes it in the README and lesson 14. The
picture shows the prompts whose colour the negative prompt took at weight 1 (then others), in every setting.
"""

import argparse
import re
import sys
import time
from pathlib import Path

from benchmarks.records import save_json, writable
from minidiff.course import evaluate, shapes
from minidiff.files import atomic_save
from minidiff.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def colour_word(prompt: str, spec) -> str:
    """The word of the prompt that names the spec's colour ("magenta" for purple, ...)."""
    for word in shapes.COLOUR_WORDS[spec.colour]:
        if re.search(rf"\b{word}\b", prompt):
            return word
    raise ValueError(f"no colour word of {spec.colour} in {prompt!r}")


def weighted(prompt: str, word: str, weight: float) -> str:
    """The prompt with its colour word written (word:weight); weight 1: the prompt unchanged."""
    return prompt if weight == 1 else re.sub(rf"\b{word}\b", f"({word}:{weight:g})", prompt, count=1)


def measure(pipe, n: int, weights, seed: int = 0, steps: int = 20, guidance_scale: float = 5.0, batch: int = 64):
    """{label: adherence dict} and {label: images} for: no negative, then the colour as negative at each weight."""
    pairs = evaluate.held_out_prompts(n, seed)
    prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
    words = [colour_word(p, s) for p, s in pairs]
    settings = {"no negative prompt": (prompts, None)}
    for weight in (1.0, *weights):
        settings[f"colour word at {weight:g}, negative = colour"] = (
            [weighted(p, w, weight) for p, w in zip(prompts, words)], words)
    results, images = {}, {}
    for label, (texts, negatives) in settings.items():
        start = time.perf_counter()
        images[label] = evaluate.generate(pipe, texts, seed, batch, steps=steps, guidance_scale=guidance_scale,
                                          negative_prompt=negatives)
        results[label] = shapes.adherence(images[label], specs) | {"seconds": time.perf_counter() - start,
                                                                   "example": texts[0]}
        print(f"{label:40s} colour {100 * results[label]['colour']:.1f}%  all {100 * results[label]['all']:.1f}%")
    return results, images, pairs


def picked(images: dict, pairs: list, label: str, columns: int = 8) -> tuple:
    """(images, pairs) reordered for the picture: first the prompts whose colour `label`'s row got wrong."""
    wrong = [i for i, (image, (_, spec)) in enumerate(zip(images[label], pairs)) if shapes.check(image).colour
             != spec.colour]
    order = (wrong + [i for i in range(len(pairs)) if i not in wrong])[:columns]
    return {name: [row[i] for i in order] for name, row in images.items()}, [pairs[i] for i in order]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.3, 1.6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "prompt_weights.json"))
    parser.add_argument("--grid", default=str(ROOT / "course" / "images" / "prompt_weights.png"))
    args = parser.parse_args(argv)
    if not writable("prompt_weights", args.json, args.grid or None):  # before the pictures: the record and grid
        return 2
    pipe = load_pipeline("shapes", device="cpu")
    results, images, pairs = measure(pipe, args.prompts, args.weights, args.seed)
    record = {"command": "python -m benchmarks.prompt_weights " + " ".join(argv if argv is not None else sys.argv[1:]),
              "n": args.prompts, "steps": 20, "guidance_scale": 5.0, "sampler": "dpmpp_2m", "seed": args.seed,
              "weights": [1.0, *args.weights], "results": results}
    save_json(args.json, record)
    if args.grid:
        grid = picked(images, pairs, "colour word at 1, negative = colour")
        atomic_save(args.grid, lambda temporary: evaluate.save_grid(*grid, temporary, columns=8))
    print(f"wrote {args.json}" + (f", {args.grid}" if args.grid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
