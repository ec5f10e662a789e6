"""minidiff's own exception types: every user mistake is reported with one of these.

A message names the problem and the fix, e.g.
    MinidiffError: unknown sampler 'dpm'. Valid names: ddim, ddpm, ... (see `minidiff samplers`).
"""


class MinidiffError(ValueError):
    """Base class: a user-facing problem with a message that says what to do."""


class SamplerError(MinidiffError):
    """Bad sampler options, or the model produced NaN/inf while sampling."""


class CheckpointError(MinidiffError):
    """A checkpoint is missing, truncated, unsafe, or does not fit the architecture."""


class InputError(MinidiffError):
    """A bad argument or input file: wrong type, out of range, inconsistent, unreadable, or too large."""


class OutputError(MinidiffError):
    """An output cannot be written: bad folder or extension, two outputs at one path, or a file in the way."""
