"""Causal attention over packed sequences.

A training pass packs many datums into one row of tokens, so the linear layers (almost
all of the FLOPs) run as a few large matmuls instead of many small or padded ones. Inside
attention each datum must only see itself: rather than a block-diagonal mask (which sends
SDPA down its slow math path on CPU), :func:`segment_attention` calls SDPA's causal kernel
once per segment. It is registered with transformers as an attention implementation, so
the stock Llama/Qwen modules run unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_ATTENTION = "treadle_segments"

_SEGMENTS: contextvars.ContextVar[Sequence[int] | None] = contextvars.ContextVar(
    "treadle_segments", default=None
)


@contextlib.contextmanager
def packed(lengths: Sequence[int]) -> Iterator[None]:
    """Within this block, a pass of one row holds sequences of these lengths, back to back."""
    token = _SEGMENTS.set(lengths)
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def segment_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    lengths = _SEGMENTS.get()
    if lengths is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # query: [1, heads, tokens, dim]; key/value: [1, kv_heads, tokens, dim].
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outputs = []
    start = 0
    for length in lengths:
        stop = start + length
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop],
                key[:, :, start:stop],
                value[:, :, start:stop],
                is_causal=True,
                scale=scaling,
            )
        )
        start = stop
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _segment_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    # Packed passes need no mask: segment_attention knows the boundaries.
    if _SEGMENTS.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, _segment_mask)
