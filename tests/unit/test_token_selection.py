"""Token selection as pure functions, against references written out independently
(sorting, numpy, the formulas of HF/vLLM/OpenAI), on random logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from treadle.engine import token_selection as ts
from treadle.sampling_params import SamplingParams

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(scores: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in scores]


def test_top_k_keeps_the_k_largest_and_ties():
    scores = _logits(3)
    scores[2, :4] = scores[2].max() + 1  # a four-way tie at the top
    ks = [5, -1, 2]
    filtered = scores.clone()
    ts.top_k(filtered, ks)
    kept = _kept(filtered)
    assert kept[0] == set(np.argsort(-scores[0].numpy())[:5].tolist())
    assert kept[1] == set(range(VOCAB))
    assert kept[2] == {0, 1, 2, 3}
    torch.testing.assert_close(filtered[0][list(kept[0])], scores[0][list(kept[0])])


def test_top_k_zero_means_off():
    scores = _logits(1)
    filtered = scores.clone()
    ts.top_k(filtered, [0])
    torch.testing.assert_close(filtered, scores)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_nucleus(p: float):
    scores = _logits(1, seed=3)
    filtered = scores.clone()
    ts.top_p(filtered, [p])
    probs = torch.softmax(scores[0].double(), -1).numpy()
    order = np.argsort(-probs)
    nucleus: set[int] = set()
    mass = 0.0
    for token in order:  # add tokens until their mass reaches p
        nucleus.add(int(token))
        mass += probs[token]
        if mass >= p:
            break
    assert _kept(filtered)[0] == nucleus


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    scores = _logits(2, seed=4)
    filtered = scores.clone()
    ts.min_p(filtered, [0.1, 0.0])
    probs = torch.softmax(scores.double(), -1).numpy()
    assert _kept(filtered)[0] == set(np.flatnonzero(probs[0] >= 0.1 * probs[0].max()).tolist())
    assert _kept(filtered)[1] == set(range(VOCAB))


def test_penalties_follow_their_formulas():
    scores = _logits(2, seed=5)
    prompt = np.array([1, 2, 3], np.int64)
    generated = [4, 4, 2, 7]
    params = [
        SamplingParams(8, repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2),
        SamplingParams(8),
    ]
    out = ts.penalise(scores, params, [prompt, prompt], [generated, generated])
    want = scores[0].clone().numpy()
    for token in {1, 2, 3, 4, 7}:
        want[token] = want[token] / 1.5 if want[token] > 0 else want[token] * 1.5
    for token, count in {4: 2, 2: 1, 7: 1}.items():
        want[token] -= 0.2 * count + 0.3
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-6)
    torch.testing.assert_close(out[1], scores[1])
    assert not torch.equal(out[0], scores[0])  # a copy: the caller's logits are kept


def test_draw_inverts_the_cdf_at_the_generators_uniform():
    scores = _logits(3, seed=6)
    params = [
        SamplingParams(8, temperature=0.7),
        SamplingParams(8, temperature=1.0, top_k=5),
        SamplingParams(8, temperature=1.3, top_p=0.8),
    ]
    generators = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    copies = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    chosen = ts.draw(scores, params, generators).tolist()
    for row, (p, g) in enumerate(zip(params, copies, strict=True)):
        u = float(torch.rand(1, generator=g))
        logits = scores[row].double().numpy() / p.temperature
        keep = np.ones(VOCAB, bool)
        if p.top_k > 0:
            keep &= logits >= np.sort(logits)[-p.top_k]
        probs = np.exp(logits - logits.max()) * keep
        probs /= probs.sum()
        if p.top_p < 1:
            order = np.argsort(-probs)
            before = np.cumsum(probs[order]) - probs[order]
            drop = order[before >= p.top_p]
            probs[drop] = 0
            probs /= probs.sum()
        want = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        assert chosen[row] == want


def test_choose_greedy_and_drawn_rows_with_the_models_own_logprobs():
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(8, temperature=0.0),
        SamplingParams(8, temperature=0.0, repetition_penalty=100.0),
        SamplingParams(8, temperature=1.0, seed=1),
    ]
    prompt = np.array([int(logits[1].argmax())], np.int64)
    generators = [ts.row_generator(1, i) for i in range(3)]
    tokens, logprobs = ts.choose(logits, params, [prompt] * 3, [[], [], []], generators)
    assert tokens[0] == int(logits[0].argmax())
    # The penalty pushes the prompt's own (top) token down: the runner-up wins.
    assert float(logits[1].topk(2).values[1]) > float(logits[1].max()) / 100
    assert tokens[1] == int(logits[1].topk(2).indices[1])
    reference = torch.log_softmax(logits.double(), -1)
    for row, token in enumerate(tokens):
        assert logprobs[row] == pytest.approx(float(reference[row, token]), abs=1e-5)


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    logits = _logits(4, seed=8)
    params = [SamplingParams(8, temperature=1.0, seed=42)] * 4
    alone = ts.choose(
        logits[2:3], params[:1], [np.zeros(1, np.int64)], [[]], [ts.row_generator(42, 0)]
    )
    batch = ts.choose(
        logits,
        params,
        [np.zeros(1, np.int64)] * 4,
        [[]] * 4,
        [
            ts.row_generator(7, 0),
            ts.row_generator(8, 0),
            ts.row_generator(42, 0),
            ts.row_generator(9, 0),
        ],
    )
    assert batch[0][2] == alone[0][0]
    assert math.isclose(batch[1][2], alone[1][0], abs_tol=1e-6)
