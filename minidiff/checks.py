"""Checks at the edge: every argument of the command and of the public Python API goes through one of these
before any work is done, and a bad one raises an InputError whose one line names the value, what is allowed
and the fix. Text that comes from a file (tensor names, config strings) is escaped with `shown` before it
is printed, so a crafted checkpoint cannot send terminal escape sequences.
"""

import math
import os
import stat
from pathlib import Path

from minidiff.errors import InputError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def shown(value, limit: int = 120) -> str:
    """repr-like text safe for a terminal: control characters, escapes and lone surrogates written as \\x..."""
    text = value if isinstance(value, str) else str(value)
    out = []
    for char in text[:limit]:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif code < 32 or code == 127 or 0x80 <= code < 0xA0 or 0xD800 <= code < 0xE000:
            out.append(f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out) + ("..." if len(text) > limit else "")


def literal(value) -> str:
    """A value as it would be typed: a string in quotes, escaped by `shown`; anything else by its repr."""
    return f"'{shown(value)}'" if isinstance(value, str) else shown(repr(value))


def _is_int(value) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value, low=None, high=None, fix: str = "", optional: bool = False):
    """An integer in [low, high] (either bound may be None), returned as int."""
    if value is None and optional:
        return None
    allowed = (f"an integer from {low} to {high}" if low is not None and high is not None else
               f"an integer of at least {low}" if low is not None else "an integer")
    if not _is_int(value):
        raise InputError(f"{name} must be {allowed}, got {literal(value)} ({type(value).__name__})"
                         + (f": {fix}" if fix else ""))
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be {allowed}, got {value}" + (f": {fix}" if fix else ""))
    return int(value)


def check_float(name: str, value, low=None, high=None, fix: str = "", optional: bool = False):
    """A finite real number in [low, high], returned as float (ints are fine, bools, NaN and inf are not)."""
    if value is None and optional:
        return None
    allowed = (f"a number from {low} to {high}" if low is not None and high is not None else
               f"a number of at least {low}" if low is not None else "a finite number")
    if isinstance(value, bool) or not (_is_int(value) or isinstance(value, float) or _is_numpy_float(value)):
        raise InputError(f"{name} must be {allowed}, got {literal(value)} ({type(value).__name__})"
                         + (f": {fix}" if fix else ""))
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be {allowed}, got {value}" + (f": {fix}" if fix else ""))
    return value


def _is_numpy_float(value) -> bool:
    import numpy as np

    return isinstance(value, np.floating)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {literal(value)} ({type(value).__name__})")
    return value


def check_choice(name: str, value, choices, optional: bool = False):
    """One of `choices` (strings)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"unknown {name} {literal(value)}: use one of {', '.join(map(str, choices))}")
    return value


def check_text(name: str, value, optional: bool = False) -> str:
    """A string that can be encoded (no lone surrogates, e.g. from a command line that is not valid UTF-8)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {literal(value)} ({type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} {literal(value)} is not valid UTF-8 text: retype it, or save it as UTF-8"
                         ) from None
    return value


def check_seed(value, name: str = "seed"):
    return check_int(name, value, 0, MAX_SEED, "use a seed from 0 to 2**63 - 1", optional=True)


def check_path_like(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise InputError(f"{name} must be a path (str or pathlib.Path), got {literal(value)}")
    check_text(name, str(value))
    return Path(value)


def check_input_file(path, what: str = "file", max_bytes: int | None = None, folder_ok: bool = False) -> Path:
    """An existing regular file (or folder if folder_ok), readable, not a symlink loop, a FIFO or a device."""
    path = check_path_like(what, path)
    try:
        info = path.stat()  # follows symlinks; a loop raises ELOOP
    except FileNotFoundError:
        raise InputError(f"{what} {shown(path)} does not exist" + (
            " (a symlink to a missing file)" if path.is_symlink() else "") + ": check the path") from None
    except OSError as error:
        raise InputError(f"cannot open {what} {shown(path)}: {error.strerror} (a symlink loop?): "
                         "point it at the real file") from None
    if stat.S_ISDIR(info.st_mode):
        if folder_ok:
            return path
        raise InputError(f"{what} {shown(path)} is a folder: give the file inside it")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise InputError(f"{what} {shown(path)} is {kind}, not a regular file: save it to a file first")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {what} {shown(path)}: permission denied. Fix its permissions (chmod +r)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise InputError(f"{what} {shown(path)} is {info.st_size / 2**20:.0f} MiB, more than the "
                         f"{max_bytes / 2**20:.0f} MiB allowed: give a smaller file")
    return path


def available_memory(device) -> int | None:
    """Bytes free for new tensors on `device` (None if unknown)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # no driver: the device check reports it
            return None
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str, fix: str, device="cpu") -> None:
    """InputError when `need` bytes (an estimate) exceed the memory free on `device`."""
    free = available_memory(device)
    if free is not None and need > free:
        raise InputError(f"{what} needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free "
                         f"on {device}: {fix}")


def check_device(device):
    """A torch device that exists here: 'cpu', 'cuda', 'cuda:1', 'mps', ... or a torch.device."""
    import torch

    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a string such as 'cpu' or 'cuda', got {literal(device)}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {literal(device)}: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {literal(str(device))}: no CUDA GPU is available here; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {literal(str(device))}: there are only {torch.cuda.device_count()} "
                             f"CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {literal(str(device))}: MPS is not available here; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {literal(str(device))} is not supported: use cpu, cuda, cuda:N or mps")
    return device
