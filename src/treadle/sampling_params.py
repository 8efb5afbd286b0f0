"""Sampling parameters and the one check of a sampling request.

The service runs :func:`check_sample` when ``asample`` arrives (so bad input is a 400
before anything is queued) and the engine's sampler runs the same function on what it is
handed; there is no other rule about what a sampling request may ask for.

Decisions: ``max_tokens`` is at least 1 (a prompt's logprobs alone are
``max_tokens=1`` and ignoring the token, as the SDK's ``compute_logprobs`` does);
``top_k`` 0 and -1 both mean "no top-k" (as in vLLM and transformers); top-k prompt
logprobs are capped by a setting (the answer holds ``prompt × k`` pairs) and by the
vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from treadle.errors import UserInputError

if TYPE_CHECKING:
    from treadle.settings import Settings


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 or 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # same seed + same request -> same tokens, whatever else is batched
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    # HF/vLLM semantics: divide positive logits / multiply negative ones of every token
    # seen in prompt + output.
    repetition_penalty: float = 1.0
    # OpenAI/vLLM semantics, over generated tokens: logit -= presence·[n>0] + frequency·n.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class SampleLimits:
    """Per-request caps, each a setting (``--max-num-samples`` and so on)."""

    max_num_samples: int = 128
    max_topk_prompt_logprobs: int = 64
    max_sample_tokens: int = 1 << 17
    max_stop_strings: int = 64
    max_stop_string_chars: int = 256

    @classmethod
    def of(cls, settings: Settings) -> SampleLimits:
        return cls(
            settings.max_num_samples,
            settings.max_topk_prompt_logprobs,
            settings.max_sample_tokens,
            settings.max_stop_strings,
            settings.max_stop_string_chars,
        )


def check_sample(
    prompt: np.ndarray,
    num_samples: int,
    params: SamplingParams,
    topk_prompt_logprobs: int,
    vocab_size: int,
    max_context: int,
    limits: SampleLimits,
) -> None:
    """Raise a :class:`UserInputError` saying what to change if the model cannot serve
    this request as asked."""
    if prompt.ndim != 1 or prompt.shape[0] == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise UserInputError("the prompt is empty; give it a non-empty list of token ids")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        bad = prompt[(prompt < 0) | (prompt >= vocab_size)][0]
        raise UserInputError(
            f"the prompt contains token id {int(bad)}, outside the vocabulary [0, {vocab_size});"
            " prompt token ids must come from this model's tokenizer"
        )
    n = int(prompt.shape[0])
    room = max_context - n
    if room <= 0:
        raise UserInputError(
            f"the prompt has {n} tokens; the model's context is {max_context},"
            " which leaves no room to sample; shorten the prompt"
        )
    if not 1 <= params.max_tokens <= room:
        raise UserInputError(
            f"max_tokens must be between 1 and {room} (context {max_context} minus"
            f" the prompt's {n} tokens), got {params.max_tokens}"
        )
    if not 1 <= num_samples <= limits.max_num_samples:
        raise UserInputError(
            f"num_samples must be between 1 and {limits.max_num_samples}, got {num_samples}"
        )
    total = num_samples * (n + params.max_tokens)
    if total > limits.max_sample_tokens:
        raise UserInputError(
            f"num_samples x (prompt + max_tokens) is {num_samples} x ({n} + {params.max_tokens})"
            f" = {total} tokens; the server's cap is {limits.max_sample_tokens}"
            " (--max-sample-tokens): ask for fewer samples or tokens per request"
        )
    if len(params.stop_strings) > limits.max_stop_strings:
        raise UserInputError(
            f"{len(params.stop_strings)} stop strings; at most {limits.max_stop_strings}"
            " (--max-stop-strings)"
        )
    if any(len(stop) > limits.max_stop_string_chars for stop in params.stop_strings):
        raise UserInputError(
            f"a stop string is longer than {limits.max_stop_string_chars} characters"
            " (--max-stop-string-chars)"
        )
    if len(params.stop_token_ids) > limits.max_stop_strings:
        raise UserInputError(
            f"{len(params.stop_token_ids)} stop token ids; at most {limits.max_stop_strings}"
            " (--max-stop-strings)"
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise UserInputError(f"temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise UserInputError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise UserInputError(f"top_k must be -1 or 0 (off) or positive, got {params.top_k}")
    if not 0 <= params.min_p <= 1:
        raise UserInputError(f"min_p must be in [0, 1], got {params.min_p}")
    if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
        raise UserInputError(
            f"repetition_penalty must be > 0 (1 = off), got {params.repetition_penalty}"
        )
    if not (math.isfinite(params.presence_penalty) and math.isfinite(params.frequency_penalty)):
        raise UserInputError("presence_penalty and frequency_penalty must be finite")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise UserInputError(f"stop token ids must be in [0, {vocab_size})")
    top = min(limits.max_topk_prompt_logprobs, vocab_size)
    if not 0 <= topk_prompt_logprobs <= top:
        raise UserInputError(
            f"topk_prompt_logprobs must be between 0 and {top}, got {topk_prompt_logprobs}"
        )
