"""Allocator settings for the engine process.

torch frees and re-allocates GB-sized activations every step. glibc serves allocations
that large with fresh mmaps and unmaps them on free, so every step faults in zeroed pages
again: measured here as 20-85 % of a CPU training step (reference/perf-notes.md). Told to
keep freed memory (no mmap for big blocks, no trimming), the same step reuses warm pages.
glibc reads these tunables only at process start, so ``treadle serve`` re-executes itself
once with them set.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_MARKER = "TREADLE_MALLOC_TUNED"


def ensure_tuned_allocator(argv: list[str]) -> None:
    """Re-exec this process with the glibc tunables unless they are already in force (or
    this is not glibc, or ``TREADLE_MALLOC_TUNED`` says to leave the allocator alone)."""
    if os.environ.get(_MARKER) or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ)
    env[_MARKER] = "1"
    existing = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{existing}:{TUNABLES}" if existing else TUNABLES
    os.execve(sys.executable, [sys.executable, "-m", "treadle", *argv], env)
