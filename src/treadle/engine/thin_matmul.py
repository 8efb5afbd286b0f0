"""Thin fp32 matmuls for decode passes: an AVX2 kernel (``thin_matmul.cpp``) built on
first use.

A decode pass multiplies every weight by a few columns (one per running sequence). MKL
handles that shape at ~80 GFLOP/s on the CPUs we measured, because it packs the weight
before using it once; the kernel streams the weight as it lies and reaches ~150-165
(see the .cpp for how). At one column it streams the weights ~1.6x faster than MKL's
matrix-vector product. It is compiled with torch's extension builder the first time a
process needs it (~30 s, then cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); where that cannot work (no AVX2, no C++ compiler),
:func:`thin_matmul` declines and callers use ``torch.mm``. ``TREADLE_THIN_MATMUL=0``
(or ``treadle serve --no-thin-matmul``, through :func:`set_thin_matmul`) turns the kernel
off.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("thin_matmul.cpp")
# Up to here the kernel beat MKL on every SmolLM2 shape (measured at 1, 8, 16, 32 and 64).
MAX_COLUMNS = 64
_SWITCH = "TREADLE_THIN_MATMUL"


@functools.cache
def kernel() -> ModuleType | None:
    """The compiled kernel, or None where it cannot run here (logged once, with why)."""
    if os.environ.get(_SWITCH) == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    _put_ninja_on_path()
    from torch.utils.cpp_extension import load

    try:
        module: ModuleType = load(
            name="treadle_thin_matmul",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no headers: slower, still correct
        log.warning("thin-matmul kernel unavailable (%s); decode uses torch.mm", exc)
        return None
    return module


def set_thin_matmul(enabled: bool) -> None:
    """Turn the kernel on or off for this process (the environment variable is the one
    switch :func:`kernel` reads, so child processes inherit it)."""
    if enabled:
        os.environ.pop(_SWITCH, None)
    else:
        os.environ[_SWITCH] = "0"
    kernel.cache_clear()


def _put_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH; the `ninja` package installs it next to this
    # interpreter, which is not on PATH when the venv is not activated.
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def thin_matmul(
    out: Tensor, weight: Tensor, x_t: Tensor, lora: tuple[Tensor, Tensor] | None = None
) -> bool:
    """Write ``weight @ x_t`` (``[out, in]`` by ``[in, columns]``), plus ``b @ low`` for
    ``lora = (b, low)`` (``[out, r]`` by ``[r, columns]``), into ``out`` (any strides).
    False, with ``out`` untouched, where the kernel does not apply: a weight that is not
    fp32 on CPU, more than ``MAX_COLUMNS`` columns, or no kernel here. The other operands
    must then be fp32 with contiguous rows (the kernel checks; decode runs this a few
    hundred times a step, so the checks here are only the ones that choose)."""
    module = kernel()
    if module is None or x_t.shape[1] > MAX_COLUMNS:
        return False
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    b, low = lora if lora is not None else (None, None)
    module.thin_matmul(out, weight, x_t, b, low)
    return True
