"""Writing outputs safely: a temporary file in the target folder, renamed into place when complete.

Nothing half-written is left behind on any exit: an exception, Ctrl-C or SIGTERM removes the temporary file.
The finished file gets the usual permissions (0666 less the umask), not mkstemp's private 0600. An existing file
is replaced only when the caller says so (the command's --overwrite).
"""

import os
import signal
import tempfile
import threading
from pathlib import Path

from minidiff.checks import shown
from minidiff.errors import OutputError

_PENDING = set()  # temporary files being written, removed by the SIGTERM handler


def _on_sigterm(signum, frame):
    for tmp in list(_PENDING):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # die of SIGTERM as if untouched, exit status 143


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path, overwrite: bool = True) -> None:
    """Fail before any work is done when `path` cannot be written (or exists and overwrite is False)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {shown(path)}: it is a folder; give a file name such as "
                          f"{shown(path / 'image.png')}")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {shown(path)}: the folder {shown(parent)} does not exist; "
                          f"create it first (mkdir -p {shown(parent)})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown(path)}: {shown(parent)} is not a writable folder")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise OutputError(f"cannot write {shown(path)}: something that is not a regular file is there; "
                              "choose another name")
        if not overwrite:
            raise OutputError(f"{shown(path)} already exists: pass --overwrite to replace it, or choose another name")
        if not os.access(path, os.W_OK):
            raise OutputError(f"{shown(path)} is read-only: it is not replaced; make it writable or choose another "
                              "name")


def atomic_save(path, save) -> None:
    """Call save(tmp_path), then rename tmp_path to path: readers never see a partial file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {shown(path)}: the folder {shown(path.parent)} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise OutputError(f"cannot write {shown(path)}: {e.strerror}. Choose a writable location.") from None
    os.close(fd)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread and previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    _PENDING.add(tmp)
    try:
        save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {shown(path)}: {error.strerror or error}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _PENDING.discard(tmp)
        if main_thread and previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def atomic_write_text(path, text: str) -> None:
    """atomic_save of a text file (UTF-8)."""
    atomic_save(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
