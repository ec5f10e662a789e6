"""Build the course notebooks (notebooks/NN_name.ipynb) from their sources (notebooks/src/NN_name.py).

    python notebooks/build.py           write every notebook, without outputs
    python notebooks/build.py --check   exit 1 if a committed notebook differs from what its source builds

A source is a Python file in the "percent" format that jupytext, VS Code and Spyder read: `# %%` starts a code
cell and `# %% [markdown]` a Markdown cell, whose lines are comments (`# ` removed). Lines before the first
`# %%` are a header the notebook leaves out (a ruff directive, a note). Sources are plain Python, so ruff checks
them and diffs stay readable; the notebooks are committed without outputs (see course/README.md).
"""

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def parse_cells(text: str) -> list:
    """[(kind, source)] of a percent-format file, kind "code" or "markdown"; the header before `# %%` dropped."""
    cells, kind, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, lines))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        cells.append((kind, lines))
    out = []
    for kind, body in cells:
        if kind == "markdown":
            body = [line[2:] if line.startswith("# ") else line.removeprefix("#") for line in body]
        source = "\n".join(body).strip("\n")
        if source:
            out.append((kind, source))
    return out


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of one source file: its cells, no outputs, stable cell ids."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(parse_cells(source.read_text())):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(text, id=f"cell-{i:02d}"))
    nbformat.validate(notebook)
    return notebook


def target(source: Path) -> Path:
    return HERE / f"{source.stem}.ipynb"


def sources() -> list:
    return sorted(SOURCES.glob("[0-9][0-9]_*.py"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report notebooks that are not up to date")
    args = parser.parse_args(argv)
    stale = []
    for source in sources():
        text = nbformat.writes(build(source)) + "\n"
        path = target(source)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
