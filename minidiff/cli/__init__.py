"""The `minidiff` command: generate images, list samplers and models, download weights.

    minidiff generate "a red circle" [--model shapes] [--sampler dpmpp_2m] [--steps 20] [--trace t.gif]
                      [--lora style.safetensors:0.8 ...] [--embedding my-word.safetensors:<my-word> ...]
    minidiff invert picture.png --prompt "a red circle" --out noise.safetensors   (then generate --noise)
    minidiff samplers | models | info MODEL | download NAME
    minidiff bench [--config sd15] [--size 256] | profile [--trace t.json] | export-onnx OUT_DIR [--model shapes]
    minidiff train lora FOLDER [--out lora.safetensors] | textual-inversion FOLDER --token "<my-word>" [--resume FILE]

Each file of minidiff/cli/ holds one group of subcommands and their checks (generate.py, invert.py, models.py,
speed.py, train.py; what they share is in options.py); build_parser asks each to add its own. Other packages add
commands through the "minidiff.commands" entry point (a function given the subparsers): minidiff.course adds
`minidiff milestones` and `minidiff sampler-table` that way, so the library never imports it.

A user mistake prints one line, `minidiff: error: ...`, and exits with status 2: no traceback.
Files are written to a temporary name and renamed, so nothing half-written is ever left behind.
"""

import argparse
import sys
from importlib.metadata import entry_points

from minidiff.cli import generate, invert, models, speed, train
from minidiff.errors import MinidiffError


class Parser(argparse.ArgumentParser):
    """argparse with minidiff's one-line error (argparse prints the usage, then the error)."""

    def error(self, message):
        print(f"minidiff: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    parser = Parser(prog="minidiff", description="Stable Diffusion from scratch, readable and fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, invert, models, speed, train):  # minidiff/cli/<command>.py each add their subcommands
        command.add_commands(sub)
    for plugin in entry_points(group="minidiff.commands"):  # the course's commands (milestones, sampler-table)
        plugin.load()(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except MinidiffError as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minidiff: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # what the memory estimate did not foresee
        print("minidiff: error: out of memory: use a smaller --size or --num-images, or --dtype float16",
              file=sys.stderr)
        return 2
    return status or 0  # a command may return its own exit status (milestones: 1 when one fails)


if __name__ == "__main__":
    sys.exit(main())
