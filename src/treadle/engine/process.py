"""Process settings for ``treadle serve``: the allocator and the CPU threads.

Allocator: torch frees and re-allocates GB-sized activations every step. glibc serves
allocations that large with fresh mmaps and unmaps them on free, so every step faults in
zeroed pages again: 20-85 % of a CPU training step, measured with
benchmarks/train_throughput.py. Told to keep freed memory (no mmap for big blocks, no
trimming), the same step reuses warm pages.

Threads: one engine-loop thread per model does the compute and should have every core.
libgomp (torch's OpenMP) gives each thread that starts a parallel region a team of its
own, and once the process holds more OpenMP threads than cores it stops spinning at
barriers and sleeps instead, so each of the thousands of parallel regions of a decode
pass waits for a futex wake-up. Loading the model on a start-up thread was enough to
trigger it: a decode pass ran 1.6x slower in the server than in a script. So every
thread starts with one OpenMP thread (``OMP_NUM_THREADS=1``) and engine-loop threads claim
the cores with :func:`claim_compute_threads`. (Serving several models from one CPU brings
back several teams; one model per process is the fast setup there.)

glibc and libgomp read these settings only at process start, so ``treadle serve``
re-executes itself once with them set.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_MARKER = "TREADLE_PROCESS_TUNED"
# The cores engine-loop threads use: the user's OMP_NUM_THREADS if set, else every core this
# process may run on (libgomp's own default).
_COMPUTE_THREADS = "TREADLE_COMPUTE_THREADS"


def ensure_tuned_process(argv: list[str]) -> None:
    """Re-exec this process with the settings above unless they are already in force (or
    ``TREADLE_PROCESS_TUNED`` says to leave the process alone)."""
    if os.environ.get(_MARKER):
        return
    os.execve(sys.executable, [sys.executable, "-m", "treadle", *argv], tuned_environment())


def tuned_environment(threads: int | None = None) -> dict[str, str]:
    """This process's environment with the settings above, for a process to start with
    (benchmarks start their in-process baselines this way, as the server runs);
    ``threads``: the cores its engine thread claims (default: as this process's)."""
    env = dict(os.environ)
    env[_MARKER] = "1"
    if platform.libc_ver()[0] == "glibc":
        existing = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{existing}:{TUNABLES}" if existing else TUNABLES
    env[_COMPUTE_THREADS] = str(threads or compute_threads())
    env["OMP_NUM_THREADS"] = "1"
    return env


def compute_threads() -> int:
    """The cores this process's engine threads use: what it was started with, else the
    user's OMP_NUM_THREADS, else every core it may run on."""
    claimed = os.environ.get(_COMPUTE_THREADS) if os.environ.get(_MARKER) else None
    return int(claimed or os.environ.get("OMP_NUM_THREADS") or _usable_cores())


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def return_freed_memory() -> None:
    """Hand memory freed by unloaded adapters back to the OS. The allocator settings above
    keep freed memory for the next step's activations; after models are unloaded that
    would hold their memory forever, so glibc is asked once to trim."""
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def claim_compute_threads() -> None:
    """Give the calling (engine) thread the cores, when the process was started by
    :func:`ensure_tuned_process`; otherwise torch's defaults stand."""
    threads = os.environ.get(_COMPUTE_THREADS)
    if threads:
        # Imported here: the rest of this module is torch-free, for `treadle worker`.
        import torch

        torch.set_num_threads(int(threads))
