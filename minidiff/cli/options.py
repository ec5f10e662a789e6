"""What several commands share: image sizes, output files and their formats, adapter flags."""

import math
import os
from pathlib import Path

from minidiff.checks import check_text, literal, shown
from minidiff.errors import InputError, OutputError
from minidiff.files import check_writable

IMAGE_FORMATS = {".png": "PNG", ".gif": "GIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}  # --out and --grid: the extension decides the format
ANIMATION_FORMATS = {".gif": "GIF", ".png": "PNG", ".webp": "WEBP"}  # --trace: GIF, animated PNG, animated WebP
MAX_SIDE = 16384  # px: far past what any SD model was trained for; the memory estimate decides below this


def parse_size(text: str, option: str = "--size"):
    """'512' -> (512, 512); '640x384' -> (height 384, width 640) as WIDTHxHEIGHT; multiples of 8, at least 8."""
    text = check_text(option, text)
    try:
        if "x" in text.lower():
            width, height = (int(v) for v in text.lower().split("x"))
        else:
            width = height = int(text)
    except ValueError:
        raise InputError(f"{option} must be N or WIDTHxHEIGHT, e.g. 512 or 640x384; got {literal(text)}") from None
    for side in (width, height):
        if side < 8 or side % 8 or side > MAX_SIDE:
            fix = min(max(8, 8 * round(side / 8)), MAX_SIDE)
            raise InputError(f"{option} {shown(text)}: each side must be a multiple of 8 px (the VAE downsamples by "
                             f"8) from 8 to {MAX_SIDE}; try {fix}")
    return height, width


def output_format(option: str, path, formats: dict) -> str:
    """The file format an output's extension asks for; unknown or missing extensions are refused up front."""
    check_text(option, str(path))
    if Path(path).is_dir():
        raise OutputError(f"{option} {shown(path)} is a folder: give a file name such as "
                          f"{shown(Path(path) / ('out' + next(iter(formats))))}")
    suffix = Path(path).suffix.lower()
    allowed = ", ".join(sorted(formats))
    if not suffix:
        raise OutputError(f"{option} {shown(path)} has no extension: name it e.g. {shown(path)}"
                          f"{next(iter(formats))} (allowed: {allowed})")
    if suffix not in formats:
        raise OutputError(f"{option} {shown(path)}: unknown extension {shown(suffix)}; use one of {allowed}")
    return formats[suffix]


def image_paths(out, count: int) -> list:
    """--out for `count` images: the path itself, or name_0.png, name_1.png, ... for several."""
    out = Path(out)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def check_outputs(outputs: dict, overwrite: bool) -> None:
    """{option: [paths]}: writable, not folders, not existing (unless overwrite), and no two the same file."""
    seen = {}
    for option, paths in outputs.items():
        for path in paths:
            check_writable(path, overwrite=overwrite)
            key = os.path.realpath(path)
            if key in seen:
                raise OutputError(f"{option} and {seen[key]} both write {shown(path)}: give them different names")
            seen[key] = option


def parse_adapter(flag: str, text: str, parse_tail):
    """'FILE' or 'FILE:TAIL' -> (FILE, parse_tail(TAIL) or None); a path that exists is taken whole."""
    path, tail = text, None
    if not Path(text).is_file() and ":" in text:
        path, _, tail = text.rpartition(":")
        tail = parse_tail(tail)
    if not Path(path).is_file():
        raise InputError(f"{flag} {text!r}: no such file {path}")
    return path, tail


def lora_scale(text: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        scale = float("nan")
    if not math.isfinite(scale):
        raise InputError(f"--lora: the scale after ':' must be a number, got {text!r} (e.g. style.safetensors:0.8)")
    return scale


def embedding_token(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise InputError(f"--embedding: the token after ':' must be a word without spaces around it, got {text!r} "
                            "(e.g. my-word.safetensors:<my-word>)")
    return text
