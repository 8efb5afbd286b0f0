"""Allocator settings for the engine process.

torch frees and re-allocates GB-sized activations every step. glibc serves allocations
that large with fresh mmaps and returns them on free, so every step re-faults zeroed
pages: measured here as 20-85 % of a CPU training step (reference/perf-notes.md).
Keeping freed memory in the heap instead makes the pages warm for the next step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Stop glibc from unmapping freed memory; a no-op (False) off glibc."""
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("glibc malloc tuned: %s", ok)
    return ok
