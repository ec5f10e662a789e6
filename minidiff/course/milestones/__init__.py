"""The milestones: checks that compare a student's code with the reference and name the mistake.

    minidiff milestones ...                       the command line (see core.main)
    >>> from minidiff.course.milestones import check
    >>> check("ddim_step", my_ddim_step)
"""

# the milestones register themselves on import, the checklist first (the order `minidiff milestones` prints)
from minidiff.course.milestones import checklist, formulas, networks  # noqa: E402, F401, I001
from minidiff.course.milestones.core import (  # noqa: F401
    MILESTONES,
    Mismatch,
    Result,
    Skipped,
    Tolerance,
    check,
    compare,
    load_candidate,
    main,
    run,
)
