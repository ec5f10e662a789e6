"""Milestones: the course checklist, and checks that compare a student's own code with minidiff's.

    minidiff milestones --workbook DIR                          your workbook: ✓ passed, ✗ failed, ○ to do
    minidiff milestones --reference                             minidiff itself, the course checklist included
    minidiff milestones --ddim-step my_code.py:my_ddim_step     any function of yours against the reference
    minidiff milestones --list                                  every milestone and the signature it expects
    >>> from minidiff.course.milestones import check
    >>> check("ddim_step", my_ddim_step)                        the same from Python or a notebook

A module milestone calls the candidate (yours, or minidiff's own when none is given) on fixed inputs and
compares its output with the reference element by element: the first step and element that differ by more
than the tolerance are reported with both values. When they differ, the candidate is also compared with
known mistakes (a missing sqrt, sin and cos swapped, softmax over the wrong axis, ...), so that the message
can name the one it made. Each milestone's docstring gives the signature your function must have.

This file is the machinery (comparing, running, the command line; explain.py says where an unnamed mistake
differs); the milestones themselves are in checklist.py (the course checklist), formulas.py (schedule, DDIM,
attention, ResnetBlock), sampling.py, guidance.py, networks.py and networks_parts.py (UNet, VAE, tokenizer, text
encoder, loading), blocks.py, early_exit.py, lora.py (lesson 12) and exercises.py / exercises_late.py (the
lessons' number exercises), registered when the package is imported.

Notation (shared with schedule.py and samplers.py):
    alpha_bar_t, alpha_bar_prev -> alphas_cumprod at timestep t and at the timestep the step lands on
    eps                         -> eps_theta(x_t, t), the network's noise prediction
    tolerance                   -> |yours - reference| <= atol + rtol |reference|, in the dtype stated
"""

import importlib.util
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from minidiff.course.milestones.explain import relation, where_it_differs
from minidiff.errors import MinidiffError


class Mismatch(Exception):
    """The candidate's output is not the reference's: the message says where, by how much, and maybe why."""


class Skipped(Exception):
    """The milestone cannot run on this machine (the message says what it needs)."""


class ToDo(Exception):
    """The candidate is still a blank of the workbook: it raised NotImplementedError."""


@dataclass(frozen=True)
class Tolerance:
    """|yours - reference| <= atol + rtol |reference| elementwise; dtype names the precision it assumes."""

    atol: float
    rtol: float = 0.0
    dtype: str = "fp32"


@dataclass
class Result:
    """The outcome of one milestone: print it for ✓ / ✗ and the details."""

    name: str
    status: str  # "pass" | "fail" | "skip" | "todo"
    detail: str
    seconds: float = 0.0

    def __bool__(self) -> bool:  # `assert check(...)` fails on a failure or a blank, not on a skip
        return self.status not in ("fail", "todo")

    def __str__(self) -> str:
        return f"{MARKS[self.status]} {self.name}: " + ("skipped: " if self.status == "skip" else "") + self.detail

    __repr__ = __str__


MARKS = {"pass": "✓", "fail": "✗", "skip": "-", "todo": "○"}


@dataclass(frozen=True)
class Milestone:
    name: str
    title: str
    run: object  # run(candidate or None) -> detail; raises Mismatch or Skipped
    group: str  # "course" (the checklist) or "module"
    takes_candidate: bool
    lesson: int | None = None  # the lesson whose workbook file holds the function (None: minidiff itself only)
    function: str | None = None  # that function's name in the workbook (default: the milestone's name)

    @property
    def signature(self) -> str:
        return signature(self.run)


MILESTONES: dict[str, Milestone] = {}


def signature(run) -> str:
    """The first line of a milestone's docstring: the signature its candidate must have."""
    return (run.__doc__ or "").strip().splitlines()[0]


def milestone(title: str, group: str = "module", takes_candidate: bool = True, lesson: int | None = None,
              function: str | None = None):
    """Register a check as the milestone named after it (without its `check_` prefix); with a lesson, the
    workbook's lesson_NN.py holds its function (named `function`, default the milestone's name)."""

    def register(run):
        name = run.__name__.removeprefix("check_")
        MILESTONES[name] = Milestone(name, title, run, group, takes_candidate, lesson,
                                     (function or name) if lesson is not None else None)
        return run

    return register


# --- comparing and diagnosing ---------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:.6g}"


def compare(yours, reference: torch.Tensor, tol: Tolerance, where: str = "", mistakes=(), terms=None) -> float:
    """The largest |yours - reference|, or Mismatch naming the first element outside the tolerance.

    mistakes: (hint, make) pairs; make() computes what a known mistake gives on the same inputs. If yours
    matches one, its hint is added to the message. If none does, the message says where yours differs: terms()
    (see term_by_term), when given, names the term; else how yours relates to the reference (a sign, a constant
    factor or offset, one slice of the tensor).
    """
    prefix = f"{where}: " if where else ""
    yours = getattr(yours, "sample", yours)  # a diffusers-style output object
    if not torch.is_tensor(yours):
        try:
            yours = torch.as_tensor(yours)
        except (TypeError, ValueError, RuntimeError):
            raise Mismatch(f"{prefix}yours returned a {type(yours).__name__}, expected a tensor of shape "
                           f"{tuple(reference.shape)}") from None
    ours, theirs = reference.detach().double().cpu(), yours.detach().double().cpu()
    if theirs.shape != ours.shape:
        message = f"{prefix}yours has shape {tuple(theirs.shape)}, the reference {tuple(ours.shape)}"
        raise Mismatch(message + (diagnose(theirs, mistakes, tol) or where_it_differs(terms, lambda: "")))
    difference = (theirs - ours).abs()
    allowed = tol.atol + tol.rtol * ours.abs()
    bad = ~(difference <= allowed)  # NaN counts as bad
    if not bad.any():
        return float(difference.max()) if difference.numel() else 0.0
    index = tuple(int(i) for i in bad.nonzero()[0])
    largest = float(difference.nan_to_num(nan=math.inf, posinf=math.inf).max())
    message = (f"{where}, " if where else "") + (
        f"element {index}: yours {_number(theirs[index])}, reference {_number(ours[index])}, |diff| "
        f"{float(difference[index]):.1e} > tolerance {float(allowed[index]):.1e} ({tol.dtype}); "
        f"{int(bad.sum())} of {bad.numel()} elements differ, the largest by {largest:.1e}")
    raise Mismatch(message + (diagnose(theirs, mistakes, tol) or
                              where_it_differs(terms, lambda: relation(theirs, ours, bad, tol))))


def diagnose(yours: torch.Tensor, mistakes, tol: Tolerance) -> str:
    """The hint of the first known mistake whose output equals yours (within the tolerance), else ""."""
    for hint, make in mistakes:
        try:
            wrong = make()
            wrong = torch.as_tensor(getattr(wrong, "sample", wrong)).detach().double().cpu()
        except Exception:  # a mistake that cannot even run on these inputs is not the one made
            continue
        if wrong.shape == yours.shape and bool(((wrong - yours).abs() <= tol.atol + tol.rtol * wrong.abs()).all()):
            return f"\n  hint: {hint}"
    return ""


def call_candidate(candidate, signature: str, *args, **kwargs):
    """candidate(*args, **kwargs); an exception in it becomes a Mismatch that says where it was raised."""
    try:
        return candidate(*args, **kwargs)
    except NotImplementedError as error:  # a blank of the workbook (or a part of one) still to write
        raise ToDo(str(error) or f"{getattr(candidate, '__name__', 'your function')} is still to write") from None
    except Exception as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__)[1:] if "site-packages" not in f.filename]
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        raise Mismatch(f"your function raised {type(error).__name__}: {error}{where}; the milestone calls "
                       f"{signature}") from error


def fixed_randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded noise on every parameter (norms included), so that no layer is an identity by chance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


# --- running milestones ----------------------------------------------------------------------------------


def load_candidate(spec: str):
    """'path/to/file.py:function' -> that function (the file is run as a module, with its folder on sys.path)."""
    path_text, _, function_name = str(spec).rpartition(":")
    if not path_text or not function_name:
        raise MinidiffError(f"point at your code as FILE.py:FUNCTION, e.g. my_code.py:my_ddim_step; got {spec!r}")
    path = Path(path_text)
    if path.suffix == ".ipynb":
        raise MinidiffError(f"{path} is a notebook: export it with `jupyter nbconvert --to script {path}` and point at "
                            "the .py, or call minidiff.course.milestones.check(name, your_function) in the notebook")
    if not path.is_file():
        raise MinidiffError(f"cannot find {path}: give the path of a .py file, e.g. my_code.py:{function_name}")
    # a module name of its own per file (dataclasses and pickle look their module up in sys.modules)
    name = f"minidiff_candidate_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        line = next((f.lineno for f in reversed(traceback.extract_tb(error.__traceback__))
                     if Path(f.filename).resolve() == path.resolve()), None)
        raise MinidiffError(f"running {path} failed{f' at line {line}' if line else ''}: {type(error).__name__}: "
                            f"{error}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    candidate = getattr(module, function_name, None)
    if not callable(candidate):
        found = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
                       and getattr(value, "__module__", None) == module.__name__)
        raise MinidiffError(f"{path} has no function {function_name!r}; it defines: {', '.join(found) or 'none'}")
    return candidate


def milestone_named(name: str) -> Milestone:
    if name not in MILESTONES:
        raise MinidiffError(f"unknown milestone {name!r}; the milestones are: {', '.join(MILESTONES)}")
    return MILESTONES[name]


def check(name: str, candidate=None) -> Result:
    """Run milestone `name` on candidate (a function, or 'file.py:function'; None: minidiff's own) -> Result.

    print(result) shows ✓ or ✗ and, on a failure, the first step and element that differ and by how much.
    """
    chosen = milestone_named(name)
    if isinstance(candidate, (str, Path)):
        candidate = load_candidate(candidate)
    if candidate is not None and not chosen.takes_candidate:
        raise MinidiffError(f"milestone {name!r} checks minidiff itself and takes no function of yours")
    start = time.perf_counter()
    try:
        status, detail = "pass", chosen.run(candidate)
    except Skipped as reason:
        status, detail = "skip", str(reason)
    except ToDo as blank:
        status, detail = "todo", f"to do: {blank}"
    except Mismatch as failure:
        status, detail = "fail", str(failure)
        if "hint:" in detail and "reread" not in detail and chosen.lesson is not None:
            detail += f"; reread lesson {chosen.lesson:02d}"  # the named mistake, and where the lesson explains it
    except Exception as error:  # a bug in the reference itself: report it, and go on with the list
        frame = traceback.extract_tb(error.__traceback__)[-1]
        status, where = "fail", f"{Path(frame.filename).name}:{frame.lineno}"
        detail = f"error in the milestone: {type(error).__name__}: {error} (at {where})"
    return Result(name, status, detail, time.perf_counter() - start)


def run(names=None, candidates: dict | None = None, report=print) -> list:
    """Run the named milestones (default: all) in order, with candidates {name: function}; report each line."""
    candidates = candidates or {}
    results, group = [], None
    for name in names or list(MILESTONES):
        chosen = milestone_named(name)
        if report and chosen.group != group:
            group = chosen.group
            report("Course checklist" if group == "course" else "Modules")
        result = check(name, candidates.get(name))
        results.append(result)
        if report:
            report(_line(chosen, result))
    if report:
        report(_summary(results))
    return results


def _summary(results, prefix: str = "") -> str:
    counts = {status: sum(r.status == status for r in results) for status in MARKS}
    text = f"{prefix}{counts['pass']} passed, {counts['fail']} failed"
    text += f", {counts['todo']} to do" if counts["todo"] else ""
    text += f", {counts['skip']} skipped" if counts["skip"] or not counts["todo"] else ""
    return text + f" ({sum(r.seconds for r in results):.1f} s)"


def _line(chosen: Milestone, result: Result) -> str:
    detail = ("skipped: " if result.status == "skip" else "") + result.detail
    lines = "".join(f"\n      {line.rstrip()}" for line in detail.splitlines())
    return f"  {MARKS[result.status]} {chosen.name:<19} {chosen.title} ({result.seconds:.1f} s){lines}"


def in_lesson_order(names=None) -> list:
    """The workbook's milestones (those with a lesson), by lesson and then by their function's place in it."""
    from minidiff.course.workbook import function_order

    chosen = [MILESTONES[name] for name in (names or MILESTONES) if MILESTONES[name].lesson is not None]
    return [m.name for m in sorted(chosen, key=lambda m: (m.lesson, function_order(m.lesson, m.function)))]


def run_workbook(folder, names=None, report=print) -> list:
    """Check the functions of the workbook in `folder`: per milestone ✓ / ✗ / ○ (still blank), a line per lesson."""
    from minidiff.course.workbook import file_name, load

    modules = load(folder)
    results, lesson_results, lesson = [], [], None
    for name in in_lesson_order(names):
        chosen = MILESTONES[name]
        if chosen.lesson != lesson:
            if report and lesson_results:
                report(_summary(lesson_results, f"lesson {lesson:02d}: "))
            lesson, lesson_results = chosen.lesson, []
            if report:
                report(f"Lesson {lesson:02d} ({file_name(lesson)})")
        module, where = modules.get(chosen.lesson), f"{file_name(chosen.lesson)}"
        function = getattr(module, chosen.function, None) if module is not None else None
        if module is None:
            result = Result(name, "todo", f"to do: {where} is not in the workbook (minidiff course init writes it)")
        elif chosen.function in module.__blanks__:
            result = Result(name, "todo", f"to do: write {chosen.function} in {where}")
        elif not callable(function):
            result = Result(name, "fail", f"{where} has no function {chosen.function}; the milestone calls "
                                          f"{chosen.signature}")
        else:
            result = check(name, function)
        results.append(result)
        lesson_results.append(result)
        if report:
            report(_line(chosen, result))
    if report:
        if lesson_results:
            report(_summary(lesson_results, f"lesson {lesson:02d}: "))
        report(_summary(results, "workbook: "))
    return results


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="minidiff milestones",
        description="Checks your workbook (the current folder, its workbook/ folder, $MINIDIFF_WORKBOOK or "
                    "--workbook DIR; write one with `minidiff course init DIR`): ✓ passed, ✗ failed, ○ to do. "
                    "--reference checks minidiff itself, the course checklist included. Point one milestone at "
                    "any function with --NAME FILE.py:FUNCTION.")
    parser.add_argument("--workbook", metavar="DIR", help="the workbook folder to check")
    parser.add_argument("--reference", action="store_true", help="check minidiff itself (every milestone)")
    parser.add_argument("--list", action="store_true", help="list the milestones and the signature each expects")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these milestones")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out (e.g. compile)")
    parser.add_argument("--all", action="store_true", help="with --NAME options, run the other milestones too")
    for chosen in MILESTONES.values():
        if chosen.takes_candidate:
            parser.add_argument(f"--{chosen.name.replace('_', '-')}", dest=f"candidate_{chosen.name}",
                                metavar="FILE.py:FUNCTION", help=chosen.signature)
    return parser


def main(argv=None) -> int:
    """`minidiff milestones ...`: 0 when every milestone run passed (or was skipped), 1 otherwise."""
    from minidiff.course.workbook import find

    args = build_parser().parse_args(argv)
    if args.list:
        for chosen in MILESTONES.values():
            where = f"lesson_{chosen.lesson:02d}.py" if chosen.lesson is not None else "minidiff only"
            print(f"{chosen.name:<19} [{where}] {chosen.title}\n{'':19} {chosen.signature}")
        return 0
    candidates = {name: load_candidate(getattr(args, f"candidate_{name}")) for name, chosen in MILESTONES.items()
                  if chosen.takes_candidate and getattr(args, f"candidate_{name}")}
    for name in [*(args.only or []), *args.skip]:
        milestone_named(name)
    device = f"GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    if not candidates and not args.reference:
        folder = Path(args.workbook) if args.workbook else find()
        if folder is None:
            raise MinidiffError(f"no workbook in {Path.cwd()}: write one with `minidiff course init workbook` and "
                                "run `minidiff milestones --workbook workbook`, or check minidiff itself with "
                                "--reference")
        names = [name for name in (args.only or MILESTONES) if name not in args.skip]
        print(f"minidiff milestones: workbook {folder} on {device} (✓ passed, ✗ failed, ○ to do)", flush=True)
        results = run_workbook(folder, names, report=lambda line: print(line, flush=True))
        if not results:
            print("none of the milestones chosen has a workbook function; minidiff's own: --reference")
        return 1 if any(result.status in ("fail", "todo") for result in results) else 0
    names = args.only or (list(candidates) if candidates and not args.all else list(MILESTONES))
    names = [name for name in MILESTONES if name in names and name not in args.skip]  # the checklist's order
    print(f"minidiff milestones on {device} (✓ passed, ✗ failed, - skipped)", flush=True)
    results = run(names, candidates, report=lambda line: print(line, flush=True))
    return 1 if any(result.status in ("fail", "todo") for result in results) else 0
