"""The student's workbook: one Python file per lesson with the functions that lesson asks you to write.

    minidiff course init DIR               the blank workbook: every body raises NotImplementedError("lesson NN: ...")
    minidiff course init DIR --solutions   the filled one
    minidiff milestones --workbook DIR     checks it (the current folder by default)
    >>> mine = use(3)                      in a notebook: lesson 03's functions, yours where written

The filled workbook is real Python source, minidiff/course/solutions/lesson_NN.py; the blank one is derived
from it here (each top-level function keeps its signature and docstring, its body becomes the raise), so the
two cannot drift apart. A workbook file imports an earlier lesson's functions as `from lesson_NN import ...`.
"""

import ast
import importlib.util
import os
import sys
from pathlib import Path

from minidiff.errors import MinidiffError
from minidiff.files import atomic_write_text

SOLUTIONS = Path(__file__).resolve().parent / "solutions"
PACKAGE_IMPORT = "from minidiff.course.solutions."  # -> "from " in the workbook: the student's own earlier lesson
ENVIRONMENT_VARIABLE = "MINIDIFF_WORKBOOK"


def lessons() -> list:
    """The lesson numbers that have a workbook file: [1, 2, ...]."""
    return sorted(int(path.stem.removeprefix("lesson_")) for path in SOLUTIONS.glob("lesson_[0-9][0-9].py"))


def file_name(lesson: int) -> str:
    return f"lesson_{lesson:02d}.py"


def _functions(tree: ast.Module) -> list:
    """The public top-level functions of a module: the blanks (names starting with _ are helpers, kept filled)."""
    return [node for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]


def function_order(lesson: int, name: str) -> int:
    """The place of function `name` in lesson `lesson`'s file (the order the milestones are checked in)."""
    names = [node.name for node in _functions(ast.parse((SOLUTIONS / file_name(lesson)).read_text()))]
    return names.index(name) if name in names else len(names)


def blank_source(lesson: int) -> str:
    """The workbook file of `lesson` with every public function's body replaced by a NotImplementedError."""
    text = (SOLUTIONS / file_name(lesson)).read_text()
    lines = text.splitlines(keepends=True)
    # from the last function up, so that the line numbers of the earlier ones stay valid
    for node in reversed(_functions(ast.parse(text))):
        docstring = node.body[0]
        if not (isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)):
            raise MinidiffError(f"{file_name(lesson)}: {node.name} has no docstring (each workbook function needs one)")
        indent = " " * node.body[0].col_offset
        stub = f'{indent}raise NotImplementedError("lesson {lesson:02d}: write {node.name} in {file_name(lesson)}")\n'
        lines[docstring.end_lineno:node.end_lineno] = [stub]
    return "".join(lines)


def workbook_source(lesson: int, solutions: bool) -> str:
    text = (SOLUTIONS / file_name(lesson)).read_text() if solutions else blank_source(lesson)
    return text.replace(PACKAGE_IMPORT, "from ")


def init(folder, solutions: bool = False) -> list:
    """Write the workbook (blank, or filled with `solutions`) into folder; refuses to overwrite a lesson file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MinidiffError(f"{folder} is a file: give a folder for the workbook, e.g. `minidiff course init workbook`")
    existing = [file_name(n) for n in lessons() if (folder / file_name(n)).exists()]
    if existing:
        raise MinidiffError(f"{folder} already holds {', '.join(existing)}: your answers would be overwritten; "
                            "give another folder (or move those files away)")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for lesson in lessons():
        path = folder / file_name(lesson)
        atomic_write_text(path, workbook_source(lesson, solutions))
        written.append(path)
    return written


def is_workbook(folder) -> bool:
    return Path(folder).is_dir() and any((Path(folder) / file_name(n)).is_file() for n in lessons())


def blank_functions(path) -> set:
    """The names of the functions in a workbook file whose body is still only `raise NotImplementedError(...)`."""
    blanks = set()
    for node in _functions(ast.parse(Path(path).read_text())):
        body = [statement for statement in node.body
                if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))]
        if len(body) == 1 and isinstance(body[0], ast.Raise) and body[0].exc is not None:
            exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                blanks.add(node.name)
    return blanks


def load(folder) -> dict:
    """{lesson: module} of a workbook folder, imported in lesson order under the names lesson_NN (so that
    `from lesson_03 import timesteps` in lesson 04 finds this workbook's lesson 03, not another one's)."""
    folder = Path(folder).resolve()
    if not is_workbook(folder):
        raise MinidiffError(f"{folder} holds no workbook (lesson_01.py, ...): write one with `minidiff course init "
                            f"{folder}`")
    for lesson in lessons():  # a workbook loaded before in this process must not answer for this one
        sys.modules.pop(file_name(lesson)[:-3], None)
    modules = {}
    sys.path.insert(0, str(folder))
    try:
        for lesson in lessons():
            path = folder / file_name(lesson)
            if not path.is_file():
                continue
            name = path.stem
            spec = importlib.util.spec_from_file_location(name, path)
            module = sys.modules[name] = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as error:
                raise MinidiffError(f"running {path} failed: {type(error).__name__}: {error}") from None
            module.__blanks__ = blank_functions(path)
            modules[lesson] = module
    finally:
        sys.path.remove(str(folder))
    return modules


def find(near=None):
    """The workbook folder: $MINIDIFF_WORKBOOK, else a workbook/ folder in (or one above) `near` (default: the
    current folder), else the current folder if it is one; None when there is none."""
    if os.environ.get(ENVIRONMENT_VARIABLE):
        folder = Path(os.environ[ENVIRONMENT_VARIABLE]).expanduser()
        if not is_workbook(folder):
            raise MinidiffError(f"${ENVIRONMENT_VARIABLE} is {folder}, which holds no workbook: write one with "
                                f"`minidiff course init {folder}` or unset the variable")
        return folder
    here = Path(near or Path.cwd()).resolve()
    for folder in (here / "workbook", here.parent / "workbook", here):
        if is_workbook(folder):
            return folder
    return None
