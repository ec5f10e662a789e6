"""What a notebook uses of the student's workbook: `use(N)` gives lesson N's functions, the student's where written,
the reference where still blank (said on the output), and `check(name)` runs a milestone on them.

    from minidiff.course.notebook import use
    mine = use(3)                # lesson 03: yours, or the reference standing in
    mine.ddim_step(...)
    mine.check("ddim_step")      # ✓ / ✗ / ○ to do
"""

import ast
import importlib

from minidiff.course.milestones import MILESTONES, Result, check
from minidiff.course.workbook import SOLUTIONS, _functions, file_name, find, load


class Lesson:
    """A lesson's functions for a notebook: the student's where written, the reference (the solution) where not."""

    def __init__(self, lesson: int, folder=None, report=print):
        solution = importlib.import_module(f"minidiff.course.solutions.lesson_{lesson:02d}")
        names = [node.name for node in _functions(ast.parse((SOLUTIONS / file_name(lesson)).read_text()))]
        self.lesson, folder = lesson, folder or find()
        module = load(folder).get(lesson) if folder else None
        self.yours, self.reference = [], []
        for name in names:
            if module is not None and hasattr(module, name) and name not in module.__blanks__:
                setattr(self, name, getattr(module, name))
                self.yours.append(name)
            else:
                setattr(self, name, getattr(solution, name))
                self.reference.append(name)
        if report:
            where = f"your workbook {folder}" if folder else "no workbook found"
            lines = [f"lesson {lesson:02d} ({where}):"]
            if self.yours:
                lines.append(f"  yours: {', '.join(self.yours)}")
            if self.reference:
                why = "still to do in your workbook" if module is not None else (
                    "run `minidiff course init workbook` beside the notebooks, or set $MINIDIFF_WORKBOOK")
                lines.append(f"  the reference runs for: {', '.join(self.reference)} ({why})")
            report("\n".join(lines))


    def check(self, name: str):
        """Milestone `name` on your function; ○ to do (without running) when the reference stands in for it."""
        function = MILESTONES[name].function
        if function in self.reference:
            return Result(name, "todo", f"to do: write {function} in {file_name(self.lesson)} of your workbook (the "
                                        "reference ran here)")
        return check(name, getattr(self, function))


def use(lesson: int, folder=None, report=print) -> Lesson:
    """Lesson `lesson`'s workbook functions as attributes (yours where written, else the reference, said on the
    output): `mine = use(3); mine.ddim_step(...)`."""
    return Lesson(lesson, folder, report)
