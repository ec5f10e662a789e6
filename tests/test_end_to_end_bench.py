"""benchmarks/end_to_end.py: the warm image's breakdown (text encoder, UNet steps, decoder, the rest) adds up to the
image's time, and the timed parts are unwrapped afterwards. No timing assertions."""

import pytest

import benchmarks.end_to_end as end_to_end
from minidiff.pipeline import load_pipeline


def test_the_warm_breakdown_adds_up_and_leaves_the_pipeline_as_it_was():
    pipe = load_pipeline("shapes", device="cpu")
    row = end_to_end.warm_image(pipe, steps=3)
    assert row["UNet calls"] == 3  # one call per step on the guidance batch
    parts = ("text encoder", "UNet steps", "decoder", "rest")
    for clock in ("wall_s", "cpu_s"):
        assert all(row[f"{part} {clock}"] > 0 for part in parts[:3])
        assert sum(row[f"{part} {clock}"] for part in parts) == pytest.approx(row[f"image {clock}"])
    assert not {"forward", "decode"} & (vars(pipe.unet).keys() | vars(pipe.vae).keys() | vars(pipe.text_encoder).keys())


def test_a_json_path_in_a_missing_folder_is_one_line_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(end_to_end, "cold_generate", lambda *args: pytest.fail("measured despite a bad --json"))
    assert end_to_end.main(["--json", "no/such/folder/end_to_end.json"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("end_to_end: error: ") and "the folder no/such/folder does not exist" in error, error
    assert error.count("\n") == 1, error
    assert list(tmp_path.iterdir()) == []  # nothing written
