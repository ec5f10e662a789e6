"""Pictures in and out: tensors <-> PIL images, an input image read safely, the trace drawn as a grid or frames, and
attention maps drawn as heat maps over the image."""

import warnings

import numpy as np
import torch
from PIL import Image

from minidiff.checks import check_input_file, shown
from minidiff.errors import InputError, MinidiffError

MAX_IMAGE_PIXELS = 64 * 2**20  # an input image larger than this (8192 x 8192) is refused before it is decoded


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def open_picture(path, what: str = "the input image") -> Image.Image:
    """A picture file read whole, refused in one line when it is missing, unreadable or too large."""
    path = check_input_file(path, what, max_bytes=256 * 2**20)
    try:
        image = Image.open(path)
        if image.width * image.height > MAX_IMAGE_PIXELS:  # read from the header: nothing decoded yet
            raise InputError(f"{what} {shown(path)} is {image.width}x{image.height} px, more than "
                             f"{MAX_IMAGE_PIXELS // 2**20} megapixels: resize it first")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own, larger limit
        raise InputError(f"{what} {shown(path)} claims more than {MAX_IMAGE_PIXELS // 2**20} megapixels "
                         "in its header: resize it first") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read {what} {shown(path)}: {shown(e)}. Give a complete PNG or JPEG "
                         "file") from None
    return image


def from_pil(image, height=None, width=None) -> torch.Tensor:
    """A PIL image (or path) -> (1, 3, H, W) in [-1, 1], resized to (height, width) if given."""
    if not isinstance(image, Image.Image):
        image = open_picture(image)
    image = image.convert("RGB")
    if height and width and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def trace_grid(trace: list, steps_to_show=None, index: int = 0) -> Image.Image:
    """The signature picture: x_inter (top row) against pred_x0 (bottom row) at chosen steps."""
    chosen = [s for s in trace if steps_to_show is None or s.step in steps_to_show]
    if not chosen:
        raise MinidiffError("no trace steps to show: generate with trace=True and pick steps that were run")
    w, h = chosen[0].x_inter[index].size
    grid = Image.new("RGB", (w * len(chosen), 2 * h), "white")
    for col, s in enumerate(chosen):
        grid.paste(s.x_inter[index], (col * w, 0))
        grid.paste(s.pred_x0[index], (col * w, h))
    return grid


def trace_frames(trace: list, index: int = 0) -> list:
    """One frame per step, x_inter above pred_x0, for an animated GIF."""
    frames = []
    for s in trace:
        w, h = s.x_inter[index].size
        frame = Image.new("RGB", (w, 2 * h))
        frame.paste(s.x_inter[index], (0, 0))
        frame.paste(s.pred_x0[index], (0, h))
        frames.append(frame)
    return frames


def evenly_spaced_steps(total: int, count: int = 8) -> list:
    """`count` step indices spread over 0..total-1, always including the last."""
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}) if total else []


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio of two pictures as 8-bit RGB, in dB: 10 log10(255^2 / mean squared difference)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    b = np.asarray(reference.convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"psnr compares pictures of one size, got {a.shape[1]}x{a.shape[0]} and "
                         f"{b.shape[1]}x{b.shape[0]} px")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


# a heat-map palette: dark blue (0) through purple, red, orange to pale yellow (1)
HEAT_STOPS = np.array([[12, 10, 60], [110, 30, 140], [215, 50, 70], [250, 150, 30], [255, 245, 170]], np.float32)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) RGB floats along HEAT_STOPS."""
    position = np.clip(values, 0, 1) * (len(HEAT_STOPS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_STOPS) - 2)
    fraction = (position - low)[..., None]
    return HEAT_STOPS[low] * (1 - fraction) + HEAT_STOPS[low + 1] * fraction


def attention_grid(images: list, token_maps: list, tile: int = 128, opacity: float = 0.6) -> Image.Image:
    """One row per image: the image, then one heat map per prompt token laid over it, the token written below;
    each map is stretched to its own minimum .. maximum (the pale end of the palette is where the token acted most).

    token_maps: a minidiff.attention_maps.TokenMaps per image (maps in [0, 1] at the latent size).
    """
    from PIL import ImageDraw

    if not images or len(images) != len(token_maps):
        raise MinidiffError(f"attention_grid needs one TokenMaps per image, got {len(images)} images and "
                            f"{len(token_maps)} maps: generate with attention_maps=True")
    label = 14  # pixels of text under each tile
    columns = 1 + max(len(maps.tokens) for maps in token_maps)
    grid = Image.new("RGB", (columns * tile, len(images) * (tile + label)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (image, maps) in enumerate(zip(images, token_maps)):
        top = row * (tile + label)
        base = image.convert("RGB").resize((tile, tile), Image.BICUBIC)
        grid.paste(base, (0, top))
        draw.text((2, top + tile + 1), "image", fill="black")
        pixels = np.asarray(base, np.float32)
        for column, (token, token_map) in enumerate(zip(maps.tokens, maps.maps), start=1):
            upsampled = torch.nn.functional.interpolate(token_map[None, None].float(), size=(tile, tile),
                                                        mode="bilinear", align_corners=False)[0, 0].numpy()
            spread = upsampled.max() - upsampled.min()
            stretched = (upsampled - upsampled.min()) / spread if spread > 0 else upsampled  # its own 0 .. 1
            blended = (1 - opacity) * pixels + opacity * heat_colours(stretched)
            grid.paste(Image.fromarray(blended.round().astype(np.uint8)), (column * tile, top))
            draw.text((column * tile + 2, top + tile + 1), token[:18], fill="black")
    return grid
