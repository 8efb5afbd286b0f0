"""Thin fp32 matmuls for decode passes: an AVX2 kernel (``thin_matmul.cpp``) built on
first use.

A decode pass multiplies every weight by a few columns (one per running sequence). MKL
handles that shape at ~85 GFLOP/s on the CPUs we measured, because it packs the weight
before using it once; the kernel streams the weight as it lies and reaches ~125-155
(see the .cpp for how). It is compiled with torch's extension builder the first time a
process needs it (~30 s, then cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); where that cannot work (no AVX2, no C++ compiler),
:func:`thin_matmul` returns None and callers use ``torch.mm``.
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
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("thin_matmul.cpp")
_COLUMNS = 8  # the kernel's column granularity: X is padded to a multiple of it
# Up to here the kernel beat MKL on every SmolLM2 shape (measured at 8, 16, 32 and 64).
MAX_COLUMNS = 64


@functools.cache
def kernel() -> ModuleType | None:
    """The compiled kernel, or None where it cannot run here (logged once, with why)."""
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


def _put_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH; the `ninja` package installs it next to this
    # interpreter, which is not on PATH when the venv is not activated.
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def thin_matmul(weight: Tensor, x_t: Tensor, transpose_out: bool = False) -> Tensor | None:
    """``weight @ x_t`` (``[out, in]`` by ``[in, columns]``), or its transpose when
    ``transpose_out``, through the kernel; None where the kernel does not apply: not fp32
    on CPU, a single column (MKL's matrix-vector product is as fast), more than
    ``MAX_COLUMNS``, or not built here."""
    columns = x_t.shape[1]
    if not 1 < columns <= MAX_COLUMNS or weight.stride(1) != 1:
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (weight, x_t)):
        return None
    module = kernel()
    if module is None:
        return None
    padded = -(-columns // _COLUMNS) * _COLUMNS
    if padded != columns:
        x_t = F.pad(x_t, (0, padded - columns))
    elif x_t.stride(1) != 1:
        x_t = x_t.contiguous()
    y: Tensor = module.thin_matmul(weight, x_t, transpose_out)
    return y[:columns] if transpose_out else y[:, :columns]
