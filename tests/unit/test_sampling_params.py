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
