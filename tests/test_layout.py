"""The layout is the architecture: the library apart from the course and the benchmarks, no import cycles (no
reference library imported: tests/test_package.py), every module readable in one sitting, and an installed wheel
that works offline."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minidiff"
LIBRARY_MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "course" not in p.relative_to(PACKAGE).parts)
ALL_MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement in the file, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from minidiff.course import shapes` imports the submodule minidiff.course.shapes
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
            found.append((node.module, node.lineno))
    return found


def internal_graph(modules) -> dict[str, set[str]]:
    """module -> the minidiff modules it imports (only names that are modules)."""
    names = {module_name(path) for path in ALL_MODULES}
    return {module_name(path): {name for name, _ in imports(path) if name in names and name != module_name(path)}
            for path in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_in_minidiff():
    """A package's __init__ importing its submodules is the package's own wiring, not a cycle."""
    graph = internal_graph(ALL_MODULES)
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}  # a submodule importing its parent package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_library_never_imports_the_course():
    offenders = [f"{module_name(p)} imports {name} (line {line})" for p in LIBRARY_MODULES
                 for name, line in imports(p) if name == "minidiff.course" or name.startswith("minidiff.course.")]
    assert not offenders, "the library must not depend on the course: " + "; ".join(offenders)


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_readable_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): two concepts?"


def test_pyproject_lists_every_package_and_ships_the_weights():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; minidiff supports 3.10)
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", pyproject, re.M | re.S).group(1)))
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert listed - {"minidiff.weights"} == packages
    assert re.search(r'^"minidiff.weights" = "weights"$', pyproject, re.M)


def test_the_manifest_and_the_bundled_model_are_found_through_one_place():
    from minidiff import hub

    assert hub.MANIFEST == hub.WEIGHTS / "manifest.json" and hub.KNOWN_MODELS
    assert (hub.bundled_path("shapes") / "model_index.json").is_file()
    stray = [f"{p.relative_to(ROOT)}:{i}" for p in ALL_MODULES if p.name != "hub.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if '/ "weights"' in line]
    assert not stray, f"only hub.py may know where weights/ is: {stray}"


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_generates_offline(tmp_path):
    """`pip install .` (not editable): the wheel carries the manifest and the shapes model, and generates from any
    folder with the network off."""
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("minidiff-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    code = ("import minidiff.cli, minidiff.hub, sys; print(minidiff.hub.WEIGHTS); "
            "sys.exit(minidiff.cli.main(['generate', 'a red circle', '--steps', '2', '--out', 'image.png']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == str(target / "minidiff" / "weights")
    assert (work / "image.png").stat().st_size > 0


def test_the_readme_layout_names_every_module():
    """The README's layout table is the tree: every module and package of minidiff/ is named there."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):readme.index("## Status")]
    named = set()
    for cell in re.findall(r"^\| (.*?) \|", section, re.M):
        folder = ""
        for name in re.findall(r"`([\w./]+)`", cell):
            folder = name.rsplit("/", 1)[0] + "/" if "/" in name else folder  # `minidiff/unet.py`, `vae.py`
            named.add(name if "/" in name else folder + name)
    top = {f"minidiff/{p.name}" for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    top |= {f"minidiff/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert not top - named, f"modules missing from the README's layout table: {sorted(top - named)}"



WRITES = {"write_text", "write_bytes", "save", "savefig", "save_file"}
# writes that no reader waits for: to a buffer in memory or a kernel file; atomic_save's own call of the writer on
# its temporary path; one milestone's, into its own tempfile.TemporaryDirectory
SAFE_TARGETS = ("buffer", "os.devnull", "/proc/self/")
SAFE_WRITES = {"minidiff/files.py": "tmp", "minidiff/course/milestones/networks.py": "Path(folder)"}


def write_target(node: ast.Call) -> ast.AST | None:
    """The path (or file object's source) a write call writes to, or None when the call is no file write."""
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    if name == "open":
        mode = node.args[1] if len(node.args) > 1 else None
        return node.args[0] if isinstance(mode, ast.Constant) and set("wax") & set(str(mode.value)) else None
    if name in ("write_text", "write_bytes"):
        return node.func.value
    if name == "save_file":  # safetensors: save_file(tensors, path)
        return node.args[1] if len(node.args) > 1 else None
    return node.args[0] if name in WRITES and node.args else None


def direct_writes(path: Path) -> list[str]:
    """'file:line: call' for each file write in `path` that is not to the temporary path atomic_save hands its
    writer (a parameter of a lambda or function passed to atomic_save), a buffer in memory or a kernel file: the
    writes that a reader could find half done."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    saved = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", "")) == "atomic_save"]
    passed = {ast.get_source_segment(source, arg) for call in saved for arg in call.args[1:]}
    writers = [node for node in ast.walk(tree) if isinstance(node, ast.Lambda) and any(
        node in call.args for call in saved) or isinstance(node, ast.FunctionDef) and node.name in passed]
    temporary = {id(call): {a.arg for a in writer.args.args} for writer in writers for call in ast.walk(writer)
                 if isinstance(call, ast.Call)}
    where = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(tree):
        target = write_target(node) if isinstance(node, ast.Call) else None
        if target is None:
            continue
        names = {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        text = ast.get_source_segment(source, target)
        if names & temporary.get(id(node), set()) or any(safe in text for safe in SAFE_TARGETS) or (
                SAFE_WRITES.get(where, "\0") in text):
            continue
        found.append(f"{where}:{node.lineno}: {ast.get_source_segment(source, node)[:80]}")
    return found


def test_every_file_the_code_writes_is_written_whole():
    """Outputs go to a temporary file that is then renamed (minidiff.files.atomic_save): an interrupted run leaves
    the old file or the new one, never half of one."""
    sources = ALL_MODULES + sorted((ROOT / "benchmarks").glob("*.py"))
    assert [line for path in sources for line in direct_writes(path)] == []


def test_the_write_finder_finds_direct_writes():
    sample = ROOT / "benchmarks" / "_sample_for_the_write_finder.py"
    try:
        sample.write_text("Path('out.json').write_text('{}')\npicture.save(PICTURE)\nsave_file(state, 'a.bin')\n"
                          "open(path, 'w').write('x')\n"
                          "atomic_save(path, lambda tmp: Path(tmp).write_text('{}'))\n"
                          "atomic_save(path, lambda tmp: Path(other).write_text('{}'))\n"
                          "def save(tmp):\n    open(tmp, 'w').write('x')\natomic_save(path, save)\n"
                          "picture.save(buffer, format='PNG')\n")
        assert [int(line.split(":")[1]) for line in direct_writes(sample)] == [1, 2, 3, 4, 6]
    finally:
        sample.unlink()
