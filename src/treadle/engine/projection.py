"""Decode-sized products: ``W·xᵀ`` for a few rows, with each row's LoRA delta.

A decode pass multiplies every weight by a few columns (one per running sequence). These
run as ``W·xᵀ`` (MKL is ~1.5x faster at ``[out, in] x [in, few]`` than at
``[few, in] x [in, out]`` on CPU) through the thin-matmul kernel where it is built
(:mod:`treadle.engine.thin_matmul`), which also adds a sole adapter's delta in the same
pass over the weight; otherwise through ``torch.mm``. Which adapters apply comes from the
routing in force (:func:`treadle.engine.pass_context.routing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from treadle.engine.pass_context import ROUTING
from treadle.engine.thin_matmul import MAX_COLUMNS, thin_matmul

if TYPE_CHECKING:
    from treadle.engine.lora import Adapter, LoraLinear


def thin(x: Tensor) -> bool:
    """Whether a no-grad pass over ``x`` is a decode-sized product (up to ``MAX_COLUMNS``
    rows on CPU), computed as W·xᵀ: MKL is ~1.5x faster at [out, in] x [in, few] than at
    [few, in] x [in, out] (measured at 16 rows for every SmolLM2 shape), and the
    thin-matmul kernel faster still where it is built."""
    rows = x.numel() // x.shape[-1]
    return rows <= MAX_COLUMNS and x.device.type == "cpu" and not torch.is_grad_enabled()


def project_t(
    x_t: Tensor, projections: Sequence[LoraLinear], weight: Tensor, out_t: Tensor
) -> None:
    """Write the projections of ``x_t`` ``[in, rows]`` and their routed adapter deltas
    into ``out_t`` ``[out, rows]`` (any strides: a transposed view of a ``[rows, out]``
    buffer gets rows). ``weight`` is their weights stacked (or the one weight); biases are
    the caller's. Where one adapter covers every row, the kernel adds each delta in the
    same pass over the weight; otherwise each span's delta is added after."""
    x_t = x_t if x_t.stride(1) == 1 else x_t.contiguous()
    sole, adapter = _sole_adapter(x_t.shape[1])
    paired = [p.path for p in projections if adapter is not None and p.path in adapter.pairs]
    if not sole or not paired:
        _product(out_t, weight, x_t)
        if not sole:
            start = 0
            for projection in projections:
                stop = start + projection.base.out_features
                projection.add_deltas(x_t, out_t[start:stop])
                start = stop
        return
    assert adapter is not None
    scaled_a = adapter.scaled_a(tuple(paired), x_t.dtype)
    low = x_t.new_empty(scaled_a.shape[0], x_t.shape[1])
    _product(low, scaled_a, x_t)
    start, first = 0, 0
    for projection in projections:
        stop = start + projection.base.out_features
        pair = adapter.pairs.get(projection.path)
        if pair is None:
            lora = None
        else:
            rank = pair.a.shape[0]
            lora = (cast(pair.b, x_t.dtype), low[first : first + rank])
            first += rank
        _product(out_t[start:stop], weight[start:stop], x_t, lora)
        start = stop


def _product(
    out: Tensor, weight: Tensor, x_t: Tensor, lora: tuple[Tensor, Tensor] | None = None
) -> None:
    """``out = weight @ x_t (+ b @ low)``: the kernel where it applies, else torch.mm."""
    if thin_matmul(out, weight, x_t, lora):
        return
    torch.mm(weight, x_t, out=out)
    if lora is not None:
        out.addmm_(*lora)


def _sole_adapter(rows: int) -> tuple[bool, Adapter | None]:
    """``(True, adapter)`` when one adapter (or None: the base model) covers all ``rows``
    of the current inference pass, ``(False, None)`` when they are split."""
    spans = ROUTING.get()
    if not spans:
        return True, None
    where = spans[0].rows
    if len(spans) == 1 and isinstance(where, slice) and where == slice(0, rows):
        return True, spans[0].adapter
    return False, None


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # fp32 master weights under a bf16 base on GPUs; on CPU (all fp32) this skips a call.
    return t if t.dtype == dtype else t.to(dtype)
