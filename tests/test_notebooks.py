"""The course: every lesson has its notebook, every notebook is built from its source and committed without
outputs, and every notebook runs top to bottom on a CPU within the course's time budget."""

import importlib.util
import re
import time
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from minidiff.course import workbook
from minidiff.course.viz import DatasetEpsModel, StepRecorder, image_grid, show_trace, tiny_pipeline
from minidiff.errors import MinidiffError
from minidiff.samplers import sample
from minidiff.schedule import NoiseSchedule

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


# --- the course's helpers (minidiff/viz.py) ---------------------------------------------------------------------


def test_dataset_model_is_the_exact_posterior_mean():
    """One picture: E[x0 | x_t] is that picture at every t. Two: Bayes' weights, checked against the formula."""
    schedule = NoiseSchedule.sd()
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (999, 500, 10):
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(t))
        eps = DatasetEpsModel(images[:1], schedule)(x_t, t)
        torch.testing.assert_close((x_t - sigma * eps) / alpha, images[:1].expand(3, -1, -1, -1), rtol=0, atol=1e-9)
        log_likelihood = -((x_t[:, None] - alpha * images[None]) ** 2).sum(dim=(2, 3, 4)) / (2 * sigma**2)
        expected_x0 = torch.einsum("bn,nchw->bchw", log_likelihood.softmax(dim=1), images)
        pred_x0 = (x_t - sigma * DatasetEpsModel(images, schedule)(x_t, t)) / alpha
        torch.testing.assert_close(pred_x0, expected_x0, rtol=0, atol=1e-9)


def test_sampling_the_dataset_model_returns_a_training_picture():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = sample(DatasetEpsModel(images), noise, sampler="dpmpp_2m", steps=20)
    assert torch.cdist(out.flatten(1), images.flatten(1)).min(dim=1).values.max() < 1e-3


def test_recorder_trace_and_grid():
    recorder = StepRecorder()
    sample(DatasetEpsModel(torch.zeros(1, 3, 8, 8)), torch.randn(1, 3, 8, 8), sampler="ddim", steps=5,
           callback=recorder)
    trace = recorder.trace()
    assert [s.step for s in trace] == list(range(5)) and trace[0].x_inter[0].size == (8, 8)
    assert show_trace(trace, steps=[0, 4]).axes[0].get_title().startswith("step 0")
    assert image_grid(trace[0].x_inter * 3, columns=2).size == (18, 18)
    with pytest.raises(MinidiffError, match="none of the steps"):
        show_trace(trace, steps=[7])
    with pytest.raises(MinidiffError, match="empty"):
        show_trace([])


def test_tiny_pipeline_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    first, second = tiny_pipeline(seed=1), tiny_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()))
    assert first.default_size() == 64


# --- running them ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["solutions", "blank"])
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kind, tmp_path, monkeypatch):
    """Each cell without an error, the whole notebook within NOTEBOOK_BUDGET_S; files it writes go to tmp_path.

    Run against the filled workbook (the student's functions at work) and the blank one (each still to do: the
    reference stands in, said on the output, and the milestones show ○)."""
    # the lessons' models are tiny: one thread runs them faster than two fighting over small kernels
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    workbook.init(tmp_path / "workbook", solutions=kind == "solutions")
    monkeypatch.setenv(workbook.ENVIRONMENT_VARIABLE, str(tmp_path / "workbook"))
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
    if "use(" in "".join(c.source for c in notebook.cells if c.cell_type == "code"):
        expected = "yours: " if kind == "solutions" else "the reference runs for: "
        assert expected in text, f"{path.name} does not say whose functions ran ({kind} workbook)"
        assert (re.search(r"^\s*○", text, flags=re.MULTILINE) is not None) == (kind == "blank"), path.name
