"""The milestones: checks that compare a student's code with the reference and name the mistake.

    minidiff milestones ...                       the command line (see core.main)
    >>> from minidiff.course.milestones import check
    >>> check("ddim_step", my_ddim_step)
"""

# the milestones register themselves on import, the checklist first (the order `minidiff milestones` prints)
from minidiff.course.milestones import checklist, formulas, sampling, guidance, networks  # noqa: E402, F401, I001
from minidiff.course.milestones import blocks, early_exit, networks_parts  # noqa: E402, F401, I001
from minidiff.course.milestones import inversion  # noqa: E402, F401, I001
from minidiff.course.milestones import exercises, exercises_late, lora  # noqa: E402, F401, I001
from minidiff.course.milestones import inpainting  # noqa: E402, F401, I001
from minidiff.course.milestones import steering  # noqa: E402, F401, I001
from minidiff.course.milestones import prompt_weights  # noqa: E402, F401, I001
from minidiff.course.milestones.core import (  # noqa: F401
    MILESTONES,
    Mismatch,
    Result,
    Skipped,
    ToDo,
    Tolerance,
    check,
    compare,
    load_candidate,
    main,
    run,
)

# checklist.py imports sampling.py's judge, which registers first: the checklist goes back to the top
for _name in [name for name, chosen in MILESTONES.items() if chosen.group != "course"]:
    MILESTONES[_name] = MILESTONES.pop(_name)
