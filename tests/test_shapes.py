"""The shapes dataset: determinism, the held-out split, captions, and the checker's accuracy."""

import itertools

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from minidiff.course import shapes
from minidiff.course.shapes import ShapeSpec
from minidiff.errors import MinidiffError


def test_same_seed_same_examples_other_seed_other_examples():
    a, b, c = (list(shapes.examples(20, seed=s)) for s in (7, 7, 8))
    assert [e.caption for e in a] == [e.caption for e in b]
    assert all(torch.equal(x.image, y.image) for x, y in zip(a, b))
    assert [e.caption for e in a] != [e.caption for e in c]
    images, captions, specs = shapes.batch(20, seed=7)
    assert images.shape == (20, 3, 64, 64) and images.dtype == torch.float32
    assert torch.equal(images[3], a[3].image) and captions == [e.caption for e in a]
    assert images.min() >= -1 and images.max() <= 1


def test_dataset_yields_image_caption_pairs():
    pairs = list(shapes.dataset(5, seed=1))
    assert len(pairs) == 5
    image, text = pairs[0]
    assert image.shape == (3, 64, 64) and isinstance(text, str) and text


def test_held_out_split_is_disjoint_and_covers_every_attribute():
    train, held_out = set(shapes.TRAIN), set(shapes.HELD_OUT)
    assert not train & held_out
    assert train | held_out == set(shapes.ALL_COMBINATIONS)
    assert len(shapes.ALL_COMBINATIONS) == len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.POSITIONS)
    assert 0.10 <= len(held_out) / len(shapes.ALL_COMBINATIONS) <= 0.20
    for index, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS)):
        assert {combo[index] for combo in train} == set(values)  # every attribute is trained on...
        assert {combo[index] for combo in held_out} == set(values)  # ...and asked for in a new combination
    for i, j in itertools.combinations(range(3), 2):  # every PAIR of attributes is also seen in training
        assert {(c[i], c[j]) for c in train} == {(c[i], c[j]) for c in shapes.ALL_COMBINATIONS}
    drawn = shapes.random_specs(500, np.random.default_rng(0), "train")
    assert all(spec.combination() in train for spec in drawn)
    drawn = shapes.random_specs(200, np.random.default_rng(0), "held_out")
    assert {spec.combination() for spec in drawn} == held_out


def test_captions_vary_and_name_the_attributes():
    spec = ShapeSpec("triangle", "red", "top left", "small")
    rng = np.random.default_rng(0)
    texts = {shapes.caption(spec, rng) for _ in range(200)}
    assert len(texts) >= 20
    assert all("red" in t and "triangle" in t for t in texts)
    assert shapes.caption(spec) == "a small red triangle in the top left"


def test_canonical_render_is_deterministic_and_checks_back():
    for combo in shapes.ALL_COMBINATIONS:
        colour, shape, position = combo
        for size in shapes.SIZES:
            spec = ShapeSpec(shape, colour, position, size)
            image = shapes.render(spec)
            assert image.size == (64, 64)
            assert shapes.check(image) == spec


def test_checker_is_99_percent_right_on_1000_dataset_images():
    examples = list(shapes.examples(1000, seed=123, split="all"))
    scores = shapes.adherence([e.image for e in examples], [e.spec for e in examples])
    assert scores["n"] == 1000
    assert scores["all"] >= 0.99, scores
    assert scores["size"] >= 0.99, scores


def test_checker_survives_blur_noise_and_colour_shifts():
    """Generated pictures are a little blurry with noisy colours: the checker must still read them."""
    rng = np.random.default_rng(0)
    specs = shapes.random_specs(200, rng, "all")
    images = []
    for spec in specs:
        image = np.asarray(shapes.render(spec, rng).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        image = image + rng.normal(0, 12, image.shape) + rng.normal(0, 15, (1, 1, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    scores = shapes.adherence(images, specs)
    assert scores["all"] >= 0.95, scores


def test_checker_accepts_pil_uint8_and_tensor_and_other_sizes():
    spec = ShapeSpec("circle", "blue", "bottom right", "large")
    image = shapes.render(spec, np.random.default_rng(1))
    assert shapes.check(np.asarray(image)) == spec
    assert shapes.check(shapes.to_tensor(image)) == spec
    assert shapes.check(image.resize((128, 128))) == spec


def test_blank_picture_reads_as_nothing():
    blank = np.full((64, 64, 3), shapes.BACKGROUND, dtype=np.uint8)
    assert shapes.check(blank) == ShapeSpec(None, None, None, None)
    assert shapes.adherence([blank], [ShapeSpec("circle", "red", "top", "small")])["all"] == 0.0


def test_bad_input_is_named():
    with pytest.raises(MinidiffError, match="unknown colour 'pink'"):
        shapes.render(ShapeSpec("circle", "pink", "top"))
    with pytest.raises(MinidiffError, match="unknown split"):
        list(shapes.dataset(2, split="test"))
    with pytest.raises(MinidiffError, match="one spec per image"):
        shapes.adherence([np.zeros((64, 64, 3))], [])
    with pytest.raises(MinidiffError, match=r"\(3, H, W\)"):
        shapes.check(torch.zeros(1, 3, 64, 64))
