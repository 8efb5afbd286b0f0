"""What kind of pass is running: the three context variables that switch the engine's
modules, in one place.

The stock transformers modules (decoder layers, attention) run every pass, and they take
no arguments for what treadle needs to tell them: which adapter each row uses, where one
packed sequence ends and the next begins, and whether keys and values go to a KV cache.
So a pass sets that here, for the duration of a ``with`` block, and the modules below
read it:

- :func:`routing` — read by :class:`~treadle.engine.lora.LoraLinear` and
  :mod:`~treadle.engine.projection`: each span of rows adds its own adapter's delta.
  Training passes give row ranges (``start``/``stop``); inference passes give ``rows``
  and get their deltas added in place.
- :func:`packed` — read by :func:`~treadle.engine.attention.segment_attention`: the one
  row of the pass holds sequences of these lengths back to back (training).
- :func:`cached` — read by the same attention: a prefill pass whose keys and values are
  stored in the sampler's KV cache (:mod:`~treadle.engine.kv_cache`).
- :func:`decoding` — read by the same attention: a decode pass run through the stock
  modules (sharded models, :mod:`~treadle.engine.sharded`), one row per sequence.

No context set means a plain pass of the base model. They are context variables, not
globals, so each engine-loop thread sets its own; backward passes run inside the same
blocks, so recomputed (checkpointed) layers see what the forward saw.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from torch import Tensor

if TYPE_CHECKING:
    from treadle.engine.kv_cache import CacheDecode, CachePrefill
    from treadle.engine.lora import Adapter


@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of a pass (flattened over batch and time) and their adapter
    (None: the base model alone).

    Inference passes name their rows in ``rows`` instead (in every span of the pass): a
    slice, or int64 indices of scattered rows (a decode batch mixes adapters in whatever
    order its sequences sit in the KV cache). Their deltas are added in place, which
    autograd would not allow."""

    adapter: Adapter | None
    start: int = 0
    stop: int = 0
    rows: slice | Tensor | None = None


ROUTING: contextvars.ContextVar[Sequence[Span] | None] = contextvars.ContextVar(
    "treadle_routing", default=None
)
SEGMENTS: contextvars.ContextVar[Sequence[int] | None] = contextvars.ContextVar(
    "treadle_segments", default=None
)
CACHE_PASS: contextvars.ContextVar[CachePrefill | None] = contextvars.ContextVar(
    "treadle_cache_pass", default=None
)
DECODE_PASS: contextvars.ContextVar[CacheDecode | None] = contextvars.ContextVar(
    "treadle_decode_pass", default=None
)

T = TypeVar("T")


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar[T | None], value: T) -> Iterator[None]:
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def routing(spans: Sequence[Span]) -> contextlib.AbstractContextManager[None]:
    """Route the rows of every pass inside this block to their adapters."""
    return _setting(ROUTING, spans)


def packed(lengths: Sequence[int]) -> contextlib.AbstractContextManager[None]:
    """Within this block, a pass of one row holds sequences of these lengths, back to back."""
    return _setting(SEGMENTS, lengths)


def cached(cache_pass: CachePrefill) -> contextlib.AbstractContextManager[None]:
    """Within this block, passes write the KV cache as ``cache_pass`` says."""
    return _setting(CACHE_PASS, cache_pass)


def decoding(decode_pass: CacheDecode) -> contextlib.AbstractContextManager[None]:
    """Within this block, passes are decode steps of a batch of one-token sequences that
    read and extend the KV cache as ``decode_pass`` says."""
    return _setting(DECODE_PASS, decode_pass)
