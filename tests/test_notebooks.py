"""The course: every lesson has its notebook, every notebook is built from its source and committed without
outputs, and every notebook runs top to bottom on a CPU within the course's time budget."""

import importlib.util
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
COURSE = ROOT / "course"
CELL_TIMEOUT_S = 180  # one cell
NOTEBOOK_BUDGET_S = 180  # a whole notebook on a 2-core CPU (the course promises it; most take under a minute)


def build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook_paths() -> list:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_every_notebook_is_built_from_its_source_and_has_no_outputs():
    build = build_module()
    sources = build.sources()
    assert sources, "no notebook sources in notebooks/src"
    assert sorted(p.stem for p in notebook_paths()) == sorted(s.stem for s in sources), \
        "notebooks/ and notebooks/src/ hold different lessons: run python notebooks/build.py"
    for source in sources:
        committed = nbformat.read(build.target(source), as_version=4)
        assert committed == build.build(source), f"{source.stem}.ipynb is stale: run python notebooks/build.py"
        for cell in committed.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{source.stem} has outputs"


def test_every_lesson_has_a_notebook_and_a_line_in_the_index():
    lessons = sorted(p.stem for p in COURSE.glob("[0-9][0-9]_*.md"))
    notebooks = sorted(p.stem for p in notebook_paths())
    assert lessons == notebooks
    assert [int(name[:2]) for name in lessons] == list(range(len(lessons))), "lessons are numbered 00, 01, ..."
    index = (COURSE / "README.md").read_text()
    for name in lessons:
        assert f"({name}.md)" in index and f"(../notebooks/{name}.ipynb)" in index, f"{name} is not in the index"
        text = (COURSE / f"{name}.md").read_text()
        assert f"../notebooks/{name}.ipynb" in text, f"{name}.md does not link its notebook"


def test_the_parser_splits_markdown_and_code_cells_and_drops_the_header():
    cells = build_module().parse_cells("# header\n# %% [markdown]\n# # Title\n# text\n\n# %%\nx = 1\n\n\n# %%\n\n")
    assert cells == [("markdown", "# Title\ntext"), ("code", "x = 1")]


@pytest.mark.slow
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    """Each cell without an error, the whole notebook within NOTEBOOK_BUDGET_S; files it writes go to tmp_path."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    seconds = time.perf_counter() - start
    assert seconds < NOTEBOOK_BUDGET_S, f"{path.name} took {seconds:.0f} s, over the {NOTEBOOK_BUDGET_S} s budget"
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert not re.search(r"^\s*✗", text, flags=re.MULTILINE), f"a milestone check failed in {path.name}"
