"""Writing output files safely: checked before any work is done, written whole or not at all."""

import os
import tempfile
from pathlib import Path

from minidiff.errors import MinidiffError


def atomic_save(path, save):
    """Call save(tmp_path), then rename tmp_path to path: readers never see a partial file."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise MinidiffError(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise MinidiffError(f"cannot write {path}: {e.strerror}. Choose a writable location.") from None
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path):
    """Fail before any work is done when the output path cannot be written."""
    if path is None:
        return
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MinidiffError(f"cannot write {path}: {parent} is not a writable folder")
