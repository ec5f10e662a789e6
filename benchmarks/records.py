"""What the benchmark scripts share about their output files: each checked before any work, written atomically."""

import json
import sys

from minidiff.errors import MinidiffError
from minidiff.files import atomic_write_text, check_writable


def writable(script: str, *paths) -> bool:
    """Whether every output file can be written (None: not asked for); where one cannot, one line on stderr."""
    try:
        for path in paths:
            check_writable(path)
    except MinidiffError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return False
    return True


def save_json(path, record, indent: int = 1) -> None:
    """The record as JSON and a newline, through a temporary file renamed into place."""
    atomic_write_text(path, json.dumps(record, indent=indent) + "\n")
