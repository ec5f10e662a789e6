"""reuse_freed_memory: keep freed CPU memory in the process (glibc's allocator), for the next step's tensors."""

import ctypes
import platform

from minidiff.errors import MinidiffError

# glibc's mallopt parameters (malloc.h) and their default values
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_REUSING = {"on": False}  # whether reuse_freed_memory(True) is in effect in this process


def reuse_memory_available() -> bool:
    """reuse_freed_memory works here: Linux with glibc."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reuse_freed_memory(enable: bool = True) -> None:
    """Keep freed CPU memory in the process for the next tensors (True), or give it back to the kernel (False).

    glibc serves each large allocation (a feature map of a few MB) with fresh pages from the kernel and returns
    them when the tensor is freed, so every UNet step pays a page fault and the zeroing of every page again: a
    third of an eager fp32 step at 256 px on a 2-core CPU. With `enable`, large blocks come from the heap (no
    mmap) and the heap is never trimmed: the resident memory stays at its peak, and the next step reuses it (a
    UNet's steps, which free their tensors together, run in the same memory; a program that frees one large
    block at a time among live small ones can fragment the heap and grow it instead).
    Process-wide. False after True restores glibc's default thresholds (fixed ones: glibc's dynamic threshold
    stays off) and gives the kept memory back (malloc_trim); asking for the state in effect changes nothing.
    """
    if not reuse_memory_available():
        raise MinidiffError(f"reuse_memory tunes glibc's allocator (Linux), not the one of "
                            f"{platform.system()} {platform.libc_ver()[0]}: drop reuse_memory")
    if enable == _REUSING["on"]:
        return  # an untouched process keeps glibc's own (dynamic) thresholds
    libc = ctypes.CDLL(None)
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1} if enable else _GLIBC_DEFAULTS
    for parameter, value in settings.items():
        if libc.mallopt(parameter, value) != 1:
            raise MinidiffError(f"glibc refused mallopt({parameter}, {value}): drop reuse_memory")
    if not enable:
        libc.malloc_trim(0)  # give back what the heap kept so far
    _REUSING["on"] = enable
