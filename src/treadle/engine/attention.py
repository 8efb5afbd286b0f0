"""Causal attention over packed sequences (training and prefill passes).

A training pass packs many datums into one row of tokens, so the linear layers (almost
all of the FLOPs) run as a few large matmuls instead of many small or padded ones. Inside
attention each datum must only see itself: rather than a block-diagonal mask (which sends
SDPA down its slow math path on CPU), :func:`segment_attention` calls SDPA's causal kernel
once per segment. It is registered with transformers as an attention implementation, so
the stock Llama/Qwen modules run unchanged; what a pass holds comes from
:mod:`treadle.engine.pass_context`. A sampler's prefill pass is packed the same way and
also stores each segment's keys and values in the KV cache; decode passes attend through
:mod:`treadle.engine.kv_cache` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from treadle.engine.kv_cache import decode_attention, store_prompts
from treadle.engine.pass_context import CACHE_PASS, DECODE_PASS, SEGMENTS

SEGMENT_ATTENTION = "treadle_segments"


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
    decode_pass = DECODE_PASS.get()
    if decode_pass is not None:
        # Rows as a batch of one-token sequences: query [rows, heads, 1, dim], which is
        # decode_attention's layout in and out.
        return decode_attention(decode_pass, _layer(module), query, key, value, scaling), None
    cache_pass = CACHE_PASS.get()
    if cache_pass is not None:
        store_prompts(cache_pass, _layer(module), key, value)
        return _causal_segments(query, key, value, cache_pass.lengths, scaling), None
    lengths = SEGMENTS.get()
    if lengths is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return _causal_segments(query, key, value, lengths, scaling), None


def _layer(module: nn.Module) -> int:
    # Every HF attention module knows its depth; the cache is indexed by it.
    layer = module.layer_idx
    assert isinstance(layer, int)
    return layer


def _causal_segments(
    query: Tensor, key: Tensor, value: Tensor, lengths: Sequence[int], scaling: float | None
) -> Tensor:
    # query: [1, heads, tokens, dim]; key/value: [1, kv_heads, tokens, dim]; returns
    # [1, tokens, heads, dim]. split() rather than slicing: the backward of N slices makes
    # N zero-filled copies of the whole pass and adds them up (quadratic in the number of
    # datums; a pass of 64 short datums spent 8x longer in attention), while a split's
    # backward is one concatenation. enable_gqa: SDPA reads the shared key/value heads in
    # place instead of a repeat_interleave copy of them.
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa
        ).transpose(1, 2)
        for q, k, v in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
    ]
    return outputs[0].contiguous() if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _segment_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    # Packed and cached passes need no mask: their attention knows the boundaries.
    if any(pass_.get() is not None for pass_ in (SEGMENTS, CACHE_PASS, DECODE_PASS)):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, _segment_mask)
