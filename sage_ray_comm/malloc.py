"""glibc's malloc, tuned for processes that move large messages.

>>> from sage_ray_comm.malloc import tune_malloc
>>> tune_malloc() in (True, False)
True
"""

from __future__ import annotations

import os

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "tune_malloc"]

_TUNED = False


# glibc's mallopt parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD = -1


M_MMAP_THRESHOLD = -3


MMAP_THRESHOLD_BYTES = 32 << 20


TRIM_THRESHOLD_BYTES = 128 << 20


def tune_malloc() -> bool:
    """Keeps glibc from returning freed memory to the OS after every large message.

    By default glibc serves allocations over 128 KiB with fresh mmaps and trims
    the heap when its top is free, so each 1 MiB message pays for 256 page
    faults (measured: 1.1 ms against 0.09 ms for a 1 MiB ring round trip).
    Raising both thresholds keeps up to 128 MiB of freed memory for reuse.
    Applied once per process that makes or serves calls; set
    ``SAGE_COMM_TUNE_MALLOC=0`` to leave malloc alone.
    """
    global _TUNED
    if _TUNED or os.environ.get("SAGE_COMM_TUNE_MALLOC", "1") == "0":
        return _TUNED
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):  # not glibc: nothing to tune
        ok = False
    _TUNED = ok  # a failed mallopt is tried again next time, never reported as done
    return ok
