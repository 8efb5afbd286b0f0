"""The one check of a sampling request, and the decisions it makes where the service
and the engine used to disagree."""

from __future__ import annotations

import numpy as np
import pytest

from treadle.errors import UserInputError
from treadle.sampling_params import SampleLimits, SamplingParams, check_sample

VOCAB, CONTEXT = 100, 32
PROMPT = np.array([1, 2, 3], np.int64)


def _check(params: SamplingParams, prompt=PROMPT, num_samples=1, topk=0, limits=None):
    check_sample(prompt, num_samples, params, topk, VOCAB, CONTEXT, limits or SampleLimits())


def test_top_k_zero_and_minus_one_both_mean_off():
    _check(SamplingParams(4, top_k=0))
    _check(SamplingParams(4, top_k=-1))
    with pytest.raises(UserInputError, match="top_k must be -1 or 0"):
        _check(SamplingParams(4, top_k=-2))


def test_max_tokens_is_at_least_one_and_fits_the_context():
    _check(SamplingParams(1))
    _check(SamplingParams(CONTEXT - len(PROMPT)))
    for bad in (0, -1, CONTEXT - len(PROMPT) + 1):
        with pytest.raises(UserInputError, match=f"between 1 and {CONTEXT - len(PROMPT)}"):
            _check(SamplingParams(bad))


def test_topk_prompt_logprobs_is_capped_by_the_setting_and_the_vocabulary():
    _check(SamplingParams(4), topk=64)
    with pytest.raises(UserInputError, match="between 0 and 64"):
        _check(SamplingParams(4), topk=65)
    with pytest.raises(UserInputError, match="between 0 and 8"):
        _check(SamplingParams(4), topk=9, limits=SampleLimits(max_topk_prompt_logprobs=8))
    wide = SampleLimits(max_topk_prompt_logprobs=10_000)
    with pytest.raises(UserInputError, match=f"between 0 and {VOCAB}"):
        _check(SamplingParams(4), topk=VOCAB + 1, limits=wide)


def test_num_samples_cap_is_a_setting():
    _check(SamplingParams(4), num_samples=3, limits=SampleLimits(max_num_samples=3))
    with pytest.raises(UserInputError, match="num_samples must be between 1 and 3, got 4"):
        _check(SamplingParams(4), num_samples=4, limits=SampleLimits(max_num_samples=3))


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        (np.array([], np.int64), SamplingParams(4), "empty"),
        (np.array([1, 100], np.int64), SamplingParams(4), "token id 100, outside the vocabulary"),
        (np.arange(CONTEXT), SamplingParams(4), f"context is {CONTEXT}"),
        (PROMPT, SamplingParams(4, temperature=float("nan")), "temperature must be >= 0"),
        (PROMPT, SamplingParams(4, top_p=0.0), "top_p must be in (0, 1]"),
        (PROMPT, SamplingParams(4, min_p=1.5), "min_p must be in [0, 1]"),
        (PROMPT, SamplingParams(4, repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (PROMPT, SamplingParams(4, presence_penalty=float("inf")), "must be finite"),
        (PROMPT, SamplingParams(4, stop_token_ids=(VOCAB,)), "stop token ids"),
    ],
)
def test_each_bad_field_is_named(prompt, params, message):
    with pytest.raises(UserInputError) as info:
        _check(params, prompt=prompt)
    assert message in str(info.value)


def test_samples_times_tokens_and_stops_are_capped_by_settings():
    limits = SampleLimits(max_sample_tokens=70, max_stop_strings=2, max_stop_string_chars=5)
    _check(SamplingParams(7), num_samples=7, limits=limits)  # 7 x (3 + 7) = 70
    with pytest.raises(UserInputError, match=r"7 x \(3 \+ 8\) = 77 tokens.*--max-sample-tokens"):
        _check(SamplingParams(8), num_samples=7, limits=limits)
    _check(SamplingParams(4, stop_strings=("ab", "abcde")), limits=limits)
    with pytest.raises(UserInputError, match="3 stop strings; at most 2"):
        _check(SamplingParams(4, stop_strings=("a", "b", "c")), limits=limits)
    with pytest.raises(UserInputError, match="longer than 5 characters"):
        _check(SamplingParams(4, stop_strings=("abcdef",)), limits=limits)
    with pytest.raises(UserInputError, match="3 stop token ids; at most 2"):
        _check(SamplingParams(4, stop_token_ids=(1, 2, 3)), limits=limits)
