"""The sampler table and the held-out evaluation, on a miniature random pipeline (mechanics, not quality)."""

import pytest
from PIL import Image

from minidiff.cli import main
from minidiff.course import shapes
from minidiff.course.evaluate import Row, format_table, held_out_prompts, pixel_difference, sampler_table, save_grid
from minidiff.course.viz import tiny_pipeline

ROWS = (Row("DDIM 50", "ddim", 50), Row("DDIM 4", "ddim", 4), Row("DDIM 50, exit at 70% (pred_x0)", "ddim", 50,
                                                                   {"early_exit": 0.7}))


@pytest.fixture(scope="module")
def table():
    return sampler_table(tiny_pipeline(), n=3, batch=2, rows=ROWS, progress=False)


def test_every_row_is_measured_on_the_same_prompts(table):
    results, images = table
    assert [r["label"] for r in results] == [row.label for row in ROWS]
    assert all(len(images[row.label]) == 3 for row in ROWS)
    assert [r["unet_steps"] for r in results] == [50, 4, 35]
    for r in results:
        assert 0.0 <= r["adherence"] <= 1.0 and r["ms_per_image"] > 0


def test_difference_to_ddim50_is_zero_for_itself_and_not_for_the_others(table):
    results, _ = table
    diffs = {r["label"]: r["diff_to_ddim50"] for r in results}
    assert diffs["DDIM 50"] == 0.0
    assert diffs["DDIM 4"] > 0.0 and diffs["DDIM 50, exit at 70% (pred_x0)"] > 0.0


def test_pixel_difference_is_in_8_bit_units():
    black, grey = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (10, 20, 30))
    assert pixel_difference([black, grey], [black, black]) == pytest.approx(10.0)


def test_format_table_and_grid(table, tmp_path):
    results, images = table
    text = format_table(results, 3)
    assert text.count("\n") == len(ROWS) + 1 and "| DDIM 4 | 4 |" in text
    save_grid(images, held_out_prompts(3), tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 100


def test_held_out_prompts_name_what_they_ask_for():
    for prompt, spec in held_out_prompts(40, seed=3):
        assert spec.combination() in shapes.HELD_OUT
        assert any(word in prompt for word in shapes.SHAPE_WORDS[spec.shape])


def test_sampler_table_command_rejects_bad_counts(capsys):
    assert main(["sampler-table", "--prompts", "0"]) == 2
    assert "--prompts must be an integer from 1 to 100000, got 0" in capsys.readouterr().err
