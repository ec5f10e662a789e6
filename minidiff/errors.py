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
