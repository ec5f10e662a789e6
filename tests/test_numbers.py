"""Numbers quoted in the README and the lessons equal the files their measurements wrote (benchmarks/quoted.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("quoted_tool", ROOT / "benchmarks" / "quoted.py")
numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(numbers)


def test_every_marked_number_equals_its_measurement():
    assert numbers.check() == []


def test_the_documents_quote_the_bundled_models_measurements():
    quoted = {key for path in numbers.DOCUMENTS for key, _ in numbers.marked(path.read_text())}
    assert {"shapes.train_min", "shapes.held_out", "shapes.vae_recon"} <= quoted


def test_a_stale_or_unknown_number_is_reported(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("held out: <!--n:shapes.held_out-->96.0%<!--/n-->, <!--n:shapes.nothing-->1<!--/n-->")
    problems = numbers.check([doc])
    held_out = numbers.percent(numbers.train_log()["held_out_adherence"]["all"])  # 96.9% for the shipped model
    assert held_out != "96.0%"
    assert problems == [f"{doc}: shapes.held_out reads '96.0%', its measurement says '{held_out}'",
                        f"{doc}: 'shapes.nothing' names no measurement (see benchmarks/quoted.py)"]
    assert numbers.write([doc]) == 1 and f"<!--n:shapes.held_out-->{held_out}<!--/n-->" in doc.read_text()
