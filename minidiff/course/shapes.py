"""The shapes dataset: 64x64 pictures of one coloured shape, with captions, and a checker without a network.

Each picture shows one circle, square or triangle in one of eight colours, small or large, at one
of nine places on a 3x3 grid, on a plain dark background. Everything is drawn from a seed: nothing
is downloaded. A fixed set of colour x shape x position COMBINATIONS is held out of training (each
colour, shape and position is still seen in other combinations), so that a model trained on the
rest can be asked for pictures it has never seen: compositional generalisation.

`check(image)` reads colour, shape, position and size back from the pixels with plain geometry
(segment against the background, nearest palette colour, best-fitting ideal outline, centre on the
grid), so that generated pictures can be scored without a classifier: `adherence(images, specs)`.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from minidiff.errors import MinidiffError

IMAGE_SIZE = 64
BACKGROUND = (24, 24, 28)
PALETTE = {  # well separated in RGB: the nearest palette entry is never ambiguous
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 190, 60),
    "cyan": (40, 215, 225),
    "blue": (50, 80, 235),
    "purple": (190, 60, 215),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = (  # row-major on the 3x3 grid
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
SIZES = ("small", "large")

GRID_CENTRES = (12, 32, 52)  # pixel centre of each grid row / column in the 64x64 picture
HALF_EXTENT = {"small": (4, 6), "large": (8, 10)}  # half the side of the bounding box, in pixels
JITTER = 2  # the centre moves by up to this many pixels either way
SUPERSAMPLE = 4  # drawn at 4x and averaged down: antialiased edges


@dataclass(frozen=True)
class ShapeSpec:
    shape: str | None  # circle | square | triangle
    colour: str | None  # a key of PALETTE
    position: str | None  # one of POSITIONS
    size: str | None = "large"  # small | large

    def combination(self) -> tuple:
        """(colour, shape, position): the unit the held-out split is made of."""
        return (self.colour, self.shape, self.position)


def check_spec(spec: ShapeSpec) -> None:
    for value, valid, name in (
        (spec.shape, SHAPES, "shape"),
        (spec.colour, COLOURS, "colour"),
        (spec.position, POSITIONS, "position"),
        (spec.size, SIZES, "size"),
    ):
        if value not in valid:
            raise MinidiffError(f"unknown {name} {value!r} in {spec}: use one of {', '.join(valid)}")


# --- the held-out split ---------------------------------------------------------------------------


def is_held_out(colour: str, shape: str, position: str) -> bool:
    """A fixed, spread-out 31 of the 216 combinations (14%): each colour, shape and position keeps most of its."""
    return (COLOURS.index(colour) + 3 * SHAPES.index(shape) + POSITIONS.index(position)) % 7 == 0


ALL_COMBINATIONS = tuple((c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS)
HELD_OUT = tuple(combo for combo in ALL_COMBINATIONS if is_held_out(*combo))
TRAIN = tuple(combo for combo in ALL_COMBINATIONS if not is_held_out(*combo))
SPLITS = {"train": TRAIN, "held_out": HELD_OUT, "all": ALL_COMBINATIONS}


def random_specs(n: int, rng: np.random.Generator, split: str = "train") -> list[ShapeSpec]:
    """n specs drawn uniformly from the combinations of a split, each small or large."""
    if split not in SPLITS:
        raise MinidiffError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    combos = SPLITS[split]
    picks = rng.integers(len(combos), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    return [ShapeSpec(combos[i][1], combos[i][0], combos[i][2], SIZES[j]) for i, j in zip(picks, sizes)]


# --- drawing ----------------------------------------------------------------------------------------


def render(spec: ShapeSpec, rng: np.random.Generator | None = None) -> Image.Image:
    """The 64x64 RGB picture of a spec; rng jitters the centre and the size (None: the canonical picture)."""
    check_spec(spec)
    row, col = divmod(POSITIONS.index(spec.position), 3)
    low, high = HALF_EXTENT[spec.size]
    if rng is None:
        cx, cy, half = GRID_CENTRES[col], GRID_CENTRES[row], (low + high) / 2
    else:
        cx = GRID_CENTRES[col] + rng.uniform(-JITTER, JITTER)
        cy = GRID_CENTRES[row] + rng.uniform(-JITTER, JITTER)
        half = rng.uniform(low, high)
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = ((cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s)
    fill = PALETTE[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:  # pointing up, base as wide as it is tall: fills half of its bounding box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --- captions ---------------------------------------------------------------------------------------

COLOUR_WORDS = {c: [c] for c in COLOURS} | {"purple": ["purple", "magenta", "violet"]}
SHAPE_WORDS = {"circle": ["circle", "disc", "round dot"], "square": ["square", "box"], "triangle": ["triangle"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
# bare names ("top left") and phrases that follow a noun ("in the top left corner")
WHERE_WORDS = {
    "top left": ["top left", "top-left", "upper left"],
    "top": ["top", "top centre", "top middle"],
    "top right": ["top right", "top-right", "upper right"],
    "left": ["left", "middle left", "left side"],
    "centre": ["centre", "center", "middle"],
    "right": ["right", "middle right", "right side"],
    "bottom left": ["bottom left", "bottom-left", "lower left"],
    "bottom": ["bottom", "bottom centre", "bottom middle"],
    "bottom right": ["bottom right", "bottom-right", "lower right"],
}
WHERE_PHRASES = {
    "top left": ["in the top left", "in the top left corner", "at the upper left"],
    "top": ["at the top", "at the top centre", "along the top edge"],
    "top right": ["in the top right", "in the top right corner", "at the upper right"],
    "left": ["on the left", "at the middle left", "on the left side"],
    "centre": ["in the centre", "in the center", "in the middle"],
    "right": ["on the right", "at the middle right", "on the right side"],
    "bottom left": ["in the bottom left", "in the bottom left corner", "at the lower left"],
    "bottom": ["at the bottom", "at the bottom centre", "along the bottom edge"],
    "bottom right": ["in the bottom right", "in the bottom right corner", "at the lower right"],
}
TEMPLATES = (
    "a {size} {colour} {shape} {where_phrase}",
    "{where}: {colour} {shape}, {size}",
    "a {colour} {shape}, {where}",
    "{size} {shape}, {colour}, {where}",
    "there is a {size} {colour} {shape} {where_phrase}",
    "{colour} {shape} {where_phrase}",
    "a picture of a {size} {colour} {shape} {where_phrase}",
    "{where}, {size} {colour} {shape}",
)


def caption(spec: ShapeSpec, rng: np.random.Generator | None = None) -> str:
    """One caption for a spec, its template and wording drawn from rng (None: the first of each)."""
    check_spec(spec)
    pick = (lambda options: options[0]) if rng is None else (lambda options: options[rng.integers(len(options))])
    return pick(TEMPLATES).format(
        size=pick(SIZE_WORDS[spec.size]),
        colour=pick(COLOUR_WORDS[spec.colour]),
        shape=pick(SHAPE_WORDS[spec.shape]),
        where=pick(WHERE_WORDS[spec.position]),
        where_phrase=pick(WHERE_PHRASES[spec.position]),
    )


class Example(NamedTuple):
    image: torch.Tensor  # (3, 64, 64) in [-1, 1]
    caption: str
    spec: ShapeSpec


def examples(n: int, seed: int = 0, split: str = "train") -> Iterator[Example]:
    """n (image, caption, spec) examples, the same for the same seed."""
    rng = np.random.default_rng(seed)
    for spec in random_specs(n, rng, split):
        yield Example(to_tensor(render(spec, rng)), caption(spec, rng), spec)


def dataset(n: int, seed: int = 0, split: str = "train") -> Iterator[tuple[torch.Tensor, str]]:
    """n (image in [-1, 1], caption) pairs from the combinations of split: train | held_out | all."""
    for image, text, _ in examples(n, seed, split):
        yield image, text


def batch(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, list[str], list[ShapeSpec]]:
    """n examples stacked: images (n, 3, 64, 64) in [-1, 1], captions, specs."""
    images, captions, specs = zip(*examples(n, seed, split))
    return torch.stack(images), list(captions), list(specs)


# --- the checker ------------------------------------------------------------------------------------
#
# Notation: w is the coverage of each pixel by the shape, 0 (background) to 1 (the palette colour);
# it is blur-invariant in total (area = sum w) and in its centroid, so each shape hypothesis fixes its
# own size and place from them. The hypothesis whose ideal picture, blurred by the best of a few
# amounts, is nearest to w (least squares) is the shape read.

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel may be the shape's
PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float32)
AREA_PER_HALF_EXTENT2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area / half_extent^2
BLURS = (0.0, 0.8, 1.6)  # Gaussian sigmas, in pixels, tried for each hypothesis


def to_pixels(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) tensor in [-1, 1] -> (64, 64, 3) float32 in [0, 255]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise MinidiffError(f"expected one (3, H, W) image tensor in [-1, 1], got shape {tuple(image.shape)}")
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    if not isinstance(image, Image.Image):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise MinidiffError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        if image.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
            return image.astype(np.float32)
        image = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def grow(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Dilate a boolean mask by `steps` pixels (4-neighbourhood)."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (specks and stray blobs dropped)."""
    best, unassigned = np.zeros_like(mask), mask.copy()
    while unassigned.sum() > best.sum():  # a region bigger than the best so far may remain
        region = np.zeros_like(mask)
        region.flat[np.flatnonzero(unassigned)[0]] = True
        while True:  # flood fill: grow inside the mask until nothing changes
            grown = grow(region) & mask
            if np.array_equal(grown, region):
                break
            region = grown
        unassigned &= ~region
        if region.sum() > best.sum():
            best = region
    return best


def ideal_coverage(shape: str, centre_x: float, centre_y: float, half: float, supersample: int = 4) -> np.ndarray:
    """(64, 64) fraction of each pixel covered by the shape with this bounding-box centre and half extent."""
    coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    # only the window of pixels the shape can touch is sampled
    top, left = (max(int(c - half) - 1, 0) for c in (centre_y, centre_x))
    bottom, right = (min(int(c + half) + 2, IMAGE_SIZE) for c in (centre_y, centre_x))
    if bottom <= top or right <= left:
        return coverage
    y = top + (np.arange((bottom - top) * supersample) + 0.5)[:, None] / supersample - centre_y
    x = left + (np.arange((right - left) * supersample) + 0.5)[None, :] / supersample - centre_x
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    else:  # apex at the top centre, base along the bottom, as wide as it is tall
        inside = (np.abs(y) <= half) & (np.abs(x) <= (y + half) / 2)
    window = inside.reshape(bottom - top, supersample, right - left, supersample).mean(axis=(1, 3))
    coverage[top:bottom, left:right] = window
    return coverage


def gaussian_matrix(sigma: float) -> np.ndarray:
    """G with G @ a @ G.T = a blurred by a Gaussian of this sigma (pixels), mass kept at the borders."""
    if sigma == 0:
        return np.eye(IMAGE_SIZE)
    offsets = np.arange(IMAGE_SIZE)[:, None] - np.arange(IMAGE_SIZE)[None, :]
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    return g / g.sum(axis=0, keepdims=True)


BLUR_MATRICES = [gaussian_matrix(sigma) for sigma in BLURS]


def nearest_colour(mean_pixel: np.ndarray, background: np.ndarray) -> str:
    """The palette colour whose mix with the background (50 to 110% of the way) passes nearest the pixel."""
    directions = PALETTE_ARRAY - background
    t = ((mean_pixel - background) @ directions.T) / (directions**2).sum(axis=1)
    t = np.clip(t, 0.5, 1.1)
    nearest = background + t[:, None] * directions
    return COLOURS[int(np.linalg.norm(nearest - mean_pixel, axis=1).argmin())]


def check(image) -> ShapeSpec:
    """Read (shape, colour, position, size) from the pixels; fields are None when no shape is found."""
    pixels = to_pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    if mask.sum() < 4:
        return ShapeSpec(None, None, None, None)
    mask = largest_component(mask)

    # colour: from the shape's solid interior (its edges are mixed with the background)
    solid = mask & (distance >= np.quantile(distance[mask], 0.5))
    colour = nearest_colour(pixels[solid].mean(axis=0), background)

    # coverage w of each pixel near the shape, projecting its colour on the background -> palette line
    direction = PALETTE[colour] - background
    coverage = np.clip((pixels - background) @ direction / (direction @ direction), 0, 1)
    coverage = np.where(grow(mask, 2), coverage, 0)
    area = coverage.sum()
    rows, cols = np.indices(coverage.shape) + 0.5
    mean_x, mean_y = (coverage * cols).sum() / area, (coverage * rows).sum() / area

    # shape: each hypothesis takes its half extent from the area and its box centre from the centroid
    best = None
    for shape, area_factor in AREA_PER_HALF_EXTENT2.items():
        half = float(np.sqrt(area / area_factor))
        centre_y = mean_y - half / 3 if shape == "triangle" else mean_y  # a triangle's centroid sits low
        ideal = ideal_coverage(shape, mean_x, centre_y, half)
        error = min(((g @ ideal @ g.T - coverage) ** 2).sum() for g in BLUR_MATRICES)
        if best is None or error < best[0]:
            best = (error, shape, centre_y, half)
    _, shape, centre_y, half = best

    col = min(max(int(mean_x / IMAGE_SIZE * 3), 0), 2)
    row = min(max(int(centre_y / IMAGE_SIZE * 3), 0), 2)
    size = "large" if half > (HALF_EXTENT["small"][1] + HALF_EXTENT["large"][0]) / 2 else "small"
    return ShapeSpec(shape, colour, POSITIONS[3 * row + col], size)


def adherence(images, specs) -> dict:
    """Fraction of images whose checked colour, shape and position all match the spec, and per attribute."""
    images, specs = list(images), list(specs)
    if len(images) != len(specs):
        raise MinidiffError(f"adherence needs one spec per image: got {len(images)} images and {len(specs)} specs")
    if not images:
        raise MinidiffError("adherence needs at least one image")
    predictions = [check(image) for image in images]
    right = {
        name: np.array([getattr(p, name) == getattr(s, name) for p, s in zip(predictions, specs)])
        for name in ("colour", "shape", "position", "size")
    }
    return {
        "all": float((right["colour"] & right["shape"] & right["position"]).mean()),
        **{name: float(r.mean()) for name, r in right.items()},
        "n": len(images),
    }
