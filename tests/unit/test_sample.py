"""The sampler against plain transformers (``generate``, full forwards, log-softmax) on the
same tiny real-architecture models, adapters applied through forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig

from tests.fixtures.tiny_models import ARCHS, IM_END, make_byte_tokenizer, make_tiny_model
from treadle.engine import sample, thin_matmul
from treadle.engine.kv_cache import KVCache, cache_decode, decode_attention
from treadle.engine.lora import Adapter, new_adapter
from treadle.engine.losses import LOSSES
from treadle.engine.models import BaseLM, load_base_model
from treadle.engine.sample import EMPTY_LOGPROB, Sampler, SampleRequest
from treadle.engine.train import ForwardBackwardWork, LoraModel, forward_backward
from treadle.errors import UserInputError
from treadle.sampling_params import SamplingParams
from treadle.types import Datum, LoraSpec, SampledSequence, SampleResult

TOKENIZER = make_byte_tokenizer()
EOS = TOKENIZER.convert_tokens_to_ids(IM_END)


def _decode(tokens: Sequence[int]) -> str:
    return TOKENIZER.decode(list(tokens))


@pytest.fixture(scope="module", params=ARCHS)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BaseLM:
    folder = make_tiny_model(
        tmp_path_factory.mktemp(request.param) / "m", request.param, tie_word_embeddings=False
    )
    # A random tiny head gives near-flat next-token distributions (logit std ~0.16), where
    # greedy margins are ~1e-3 and sampling tests say little; a sharper head gives
    # distributions like a real model's (top token ~5 %).
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # Fresh biases (Qwen2's q/k/v) are zero and norm gains one, which would hide a decode
    # pass that drops or misplaces them.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        net.lm_head.weight.mul_(8.0)
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif name.endswith("norm.weight"):
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    net.save_pretrained(folder)
    return load_base_model("tiny", str(folder), folder.parent)


def _adapter(base: BaseLM, seed: int) -> Adapter:
    adapter = new_adapter(LoraSpec(4), base.layers, seed)
    # A fresh B is zero; make it non-zero so the adapter changes what is sampled.
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.b.copy_(torch.randn(pair.b.shape, generator=gen) * 0.1)
    return adapter


class _Reference:
    """Plain transformers; the adapter (if any) applied through forward hooks."""

    def __init__(self, folder: Path, adapter: Adapter | None) -> None:
        self.net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if adapter is None:
            return
        scale = adapter.spec.scale
        for name, module in self.net.named_modules():
            pair = adapter.pairs.get(name)
            if pair is not None:
                a, b = pair.a.detach().clone(), pair.b.detach().clone()
                module.register_forward_hook(
                    lambda mod, inp, out, a=a, b=b: out + (inp[0] @ a.t()) @ b.t() * scale
                )

    @torch.no_grad()
    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """``[n, vocab]`` next-token logits at every position."""
        return self.net(torch.tensor([list(tokens)])).logits[0].float()

    def logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.log_softmax(self.logits(tokens), -1)

    @torch.no_grad()
    def greedy(self, prompt: np.ndarray, max_tokens: int) -> list[int]:
        out = self.net.generate(
            torch.from_numpy(prompt)[None],
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
        return out[0, prompt.shape[0] :].tolist()


def _prompt(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int64)


def _run(sampler: Sampler, requests: Sequence[SampleRequest]) -> list[SampleResult]:
    """Add all requests, step until done; results in request order."""
    outcomes: list[SampleResult | BaseException | None] = [None] * len(requests)
    for i, request in enumerate(requests):
        sampler.add(request, _store(outcomes, i))
    while sampler.has_work():
        sampler.step()
    results = []
    for outcome in outcomes:
        assert isinstance(outcome, SampleResult), outcome
        results.append(outcome)
    return results


def _store(
    outcomes: list[SampleResult | BaseException | None], i: int
) -> Callable[[SampleResult | BaseException], None]:
    def done(outcome: SampleResult | BaseException) -> None:
        assert outcomes[i] is None, "done called twice"
        outcomes[i] = outcome

    return done


def _one(
    sampler: Sampler, prompt: np.ndarray, params: SamplingParams, adapter: Adapter | None = None
) -> SampledSequence:
    [result] = _run(sampler, [SampleRequest(prompt, 1, params, adapter)])
    [sequence] = result.sequences
    return sequence


def _trainer_logprobs(base: BaseLM, adapter: Adapter | None, tokens: list[int]) -> np.ndarray:
    """Logprobs of ``tokens[1:]`` from treadle's training forward (forward_only)."""
    if adapter is None:
        adapter = new_adapter(LoraSpec(4), base.layers, seed=0)  # B = 0: the base model
    full = np.array(tokens, np.int64)
    datum = Datum(full[:-1], {"target_tokens": full[1:], "weights": np.ones(len(full) - 1)})
    work = ForwardBackwardWork(
        LoraModel.create(adapter), [datum], LOSSES["cross_entropy"], {}, True
    )
    [out] = forward_backward(base, [work], 4096)
    return out.logprobs[0]


@pytest.fixture(params=["kernel", "torch.mm"])
def matmuls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Decode matmuls through the AVX2 kernel (where built), and through torch.mm."""
    if request.param == "torch.mm":
        monkeypatch.setenv("TREADLE_THIN_MATMUL", "0")
    thin_matmul.kernel.cache_clear()
    yield request.param
    monkeypatch.undo()
    thin_matmul.kernel.cache_clear()


@pytest.mark.parametrize("adapted", [False, True], ids=["base", "adapter"])
@pytest.mark.usefixtures("matmuls")
def test_greedy_matches_generate_and_logprobs_match_both_forwards(base: BaseLM, adapted: bool):
    adapter = _adapter(base, seed=1) if adapted else None
    ref = _Reference(base.folder, adapter)
    prompt = _prompt(0, 9)
    sequence = _one(
        Sampler(base, _decode),
        prompt,
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(EOS,)),
        adapter,
    )
    expected = ref.greedy(prompt, 24)
    assert sequence.tokens == expected
    assert len(set(expected)) > 5  # a degenerate model would make this test say little
    assert sequence.stop_reason == ("stop" if expected[-1] == EOS else "length")
    full = [*prompt.tolist(), *sequence.tokens]
    n = prompt.shape[0]
    want = ref.logprobs(full)[n - 1 : -1].gather(-1, torch.tensor(sequence.tokens)[:, None])[:, 0]
    np.testing.assert_allclose(sequence.logprobs, want.numpy(), atol=1e-4, rtol=0)
    trainer = _trainer_logprobs(base, adapter, full)[n - 1 :]
    np.testing.assert_allclose(sequence.logprobs, trainer, atol=1e-4, rtol=0)


def test_sampled_logprobs_are_the_models_unfiltered_logprobs(base: BaseLM):
    """Temperature, top-k and top-p shape the choice, never the reported logprob."""
    adapter = _adapter(base, seed=2)
    ref = _Reference(base.folder, adapter)
    prompt = _prompt(1, 6)
    params = SamplingParams(max_tokens=30, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    sequence = _one(Sampler(base, _decode), prompt, params, adapter)
    assert len(sequence.tokens) == 30 and sequence.stop_reason == "length"
    full = [*prompt.tolist(), *sequence.tokens]
    logprobs = ref.logprobs(full)[prompt.shape[0] - 1 : -1]
    want = logprobs.gather(-1, torch.tensor(sequence.tokens)[:, None])[:, 0]
    np.testing.assert_allclose(sequence.logprobs, want.numpy(), atol=1e-4, rtol=0)
    trainer = _trainer_logprobs(base, adapter, full)[prompt.shape[0] - 1 :]
    np.testing.assert_allclose(sequence.logprobs, trainer, atol=1e-4, rtol=0)
    # Every sampled token lies in the top 20 of its step's distribution.
    ranks = (logprobs > want[:, None]).sum(-1)
    assert int(ranks.max()) < 20


def _mixed_requests(base: BaseLM) -> list[SampleRequest]:
    a1, a2 = _adapter(base, seed=4), _adapter(base, seed=5)
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    return [
        SampleRequest(_prompt(10, 5), 1, greedy, a1),
        SampleRequest(_prompt(11, 31), 2, SamplingParams(max_tokens=50, seed=7), None),
        SampleRequest(_prompt(12, 12), 1, SamplingParams(max_tokens=9, seed=8, top_k=50), a2),
        SampleRequest(_prompt(13, 3), 1, greedy, None),
        SampleRequest(_prompt(14, 20), 3, SamplingParams(max_tokens=25, seed=9, min_p=0.05), a1),
        SampleRequest(_prompt(15, 8), 1, SamplingParams(max_tokens=33, seed=10), a2),
    ]


@pytest.mark.usefixtures("matmuls")
def test_continuous_batching_gives_each_request_what_it_gets_alone(base: BaseLM):
    """Requests of different adapters and lengths, joining at different steps while others
    run (and waiting for slots: max_batch 4), get exactly the tokens they get alone."""
    requests = _mixed_requests(base)
    alone = [_run(Sampler(base, _decode), [r])[0] for r in requests]
    sampler = Sampler(base, _decode, max_batch=4)
    outcomes: list[SampleResult | BaseException | None] = [None] * len(requests)
    joins = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}  # step -> requests added before it
    step, widest = 0, 0
    while step <= max(joins) or sampler.has_work():
        for i in joins.get(step, []):
            sampler.add(requests[i], _store(outcomes, i))
        sampler.step()
        widest = max(widest, sampler.running)
        step += 1
    assert widest == 4  # several requests (and adapters) shared each decode pass
    for got, want in zip(outcomes, alone, strict=True):
        assert isinstance(got, SampleResult)
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
        for s, t in zip(got.sequences, want.sequences, strict=True):
            # Batch size picks the matmul kernel, so float32 rounding differs slightly.
            np.testing.assert_allclose(s.logprobs, t.logprobs, atol=1e-4)
            assert s.stop_reason == t.stop_reason == "length"


def test_progress_reports_each_steps_tokens_as_the_result_holds_them(base: BaseLM):
    """Two streaming requests decoding together (one joins a step later), next to one that
    does not stream: each progress call carries one step's new token of each of its
    request's sequences, and the calls add up, in order, to the result's tokens and
    logprobs, all before ``done``."""
    requests = [
        SampleRequest(_prompt(40, 9), 2, SamplingParams(max_tokens=12, seed=3), None),
        SampleRequest(_prompt(41, 4), 1, SamplingParams(max_tokens=7, temperature=0.0), None),
        SampleRequest(_prompt(42, 6), 1, SamplingParams(max_tokens=5, seed=4), None),
    ]
    events: list[list[tuple[str, object]]] = [[], [], []]

    def progress(i: int) -> sample.Progress:
        return lambda tokens: events[i].append(("progress", tokens))

    def done(i: int) -> sample.Done:
        return lambda outcome: events[i].append(("done", outcome))

    sampler = Sampler(base, _decode)
    sampler.add(replace(requests[0], progress=progress(0)), done(0))
    sampler.add(requests[2], done(2))
    sampler.step()
    sampler.add(replace(requests[1], progress=progress(1)), done(1))
    while sampler.has_work():
        sampler.step()

    alone = [_run(Sampler(base, _decode), [r])[0] for r in requests]
    for i in (0, 1):
        *steps, (last, result) = events[i]
        assert last == "done" and isinstance(result, SampleResult)
        assert [s.tokens for s in result.sequences] == [s.tokens for s in alone[i].sequences]
        width = len(result.sequences)
        streamed: list[list[tuple[int, float]]] = [[] for _ in range(width)]
        for kind, tokens in steps:
            assert kind == "progress"
            assert isinstance(tokens, list)
            assert sorted(index for index, _, _ in tokens) == list(range(width))
            for index, token, logprob in tokens:
                streamed[index].append((token, logprob))
        assert len(steps) == requests[i].params.max_tokens
        for got, sequence in zip(streamed, result.sequences, strict=True):
            assert [t for t, _ in got] == sequence.tokens
            assert [lp for _, lp in got] == sequence.logprobs
    assert [kind for kind, _ in events[2]] == ["done"]  # no progress asked, none given


def test_seeds(base: BaseLM):
    prompt = _prompt(20, 7)
    sampler = Sampler(base, _decode)

    def tokens(seed: int | None, n: int = 1) -> list[list[int]]:
        params = SamplingParams(max_tokens=16, seed=seed)
        [result] = _run(sampler, [SampleRequest(prompt, n, params, None)])
        return [s.tokens for s in result.sequences]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)
    assert tokens(None) != tokens(None)
    three = tokens(3, n=3)
    assert len(three) == 3 and len({tuple(t) for t in three}) == 3
    assert three == tokens(3, n=3)


def test_stop_token(base: BaseLM):
    prompt = _prompt(30, 6)
    sampler = Sampler(base, _decode)
    greedy = _one(sampler, prompt, SamplingParams(max_tokens=20, temperature=0.0)).tokens
    stop = greedy[5]
    cut = greedy.index(stop)
    # Stop ids must lie in the vocabulary (check_sample); one never sampled changes nothing.
    unused = next(t for t in range(base.vocab_size) if t not in greedy)
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(unused, stop))
    sequence = _one(sampler, prompt, params)
    assert sequence.tokens == greedy[: cut + 1]
    assert sequence.stop_reason == "stop"
    # A stop token that is never sampled: the sequence runs to max_tokens.
    sequence = _one(sampler, prompt, SamplingParams(max_tokens=7, temperature=0.0))
    assert sequence.tokens == greedy[:7] and sequence.stop_reason == "length"
    # A stop token sampled as the last allowed token still counts as a stop.
    params = SamplingParams(max_tokens=cut + 1, temperature=0.0, stop_token_ids=(stop,))
    assert _one(sampler, prompt, params).stop_reason == "stop"


def _numbers(tokens: Sequence[int]) -> str:
    # Text in which every token is visible, so a stop string can straddle tokens anywhere.
    return "".join(f"{t}," for t in tokens)


def test_stop_string(base: BaseLM):
    prompt = _prompt(31, 6)
    sampler = Sampler(base, _numbers)
    greedy = _one(sampler, prompt, SamplingParams(max_tokens=24, temperature=0.0)).tokens
    # The end of token 5's text, the comma, and the start of token 6's.
    middle = _numbers(greedy[:6])
    stop = _numbers(greedy)[len(middle) - 2 : len(middle) + 1]
    expected = next(i for i in range(1, len(greedy) + 1) if stop in _numbers(greedy[:i]))
    assert expected > 3
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_strings=("never-seen", stop))
    sequence = _one(sampler, prompt, params)
    assert sequence.tokens == greedy[:expected]
    assert sequence.stop_reason == "stop"


def test_prompt_logprobs(base: BaseLM, monkeypatch: pytest.MonkeyPatch):
    # Five rows of logits at a time, so the 17-token prompt crosses chunk boundaries.
    monkeypatch.setattr(sample, "_HEAD_CHUNK_ELEMENTS", 5 * base.vocab_size)
    adapter = _adapter(base, seed=6)
    prompt = _prompt(40, 17)
    request = SampleRequest(
        prompt,
        1,
        SamplingParams(max_tokens=1),
        adapter,
        prompt_logprobs=True,
        topk_prompt_logprobs=5,
    )
    [result] = _run(Sampler(base, _decode), [request])
    reference = _Reference(base.folder, adapter).logprobs(prompt.tolist())[:-1]
    logprobs = result.prompt_logprobs
    assert logprobs is not None and logprobs.dtype == np.float32 and logprobs.shape == (17,)
    assert np.isnan(logprobs[0])
    want = reference.gather(-1, torch.from_numpy(prompt[1:])[:, None])[:, 0]
    np.testing.assert_allclose(logprobs[1:], want.numpy(), atol=1e-4, rtol=0)
    assert result.topk_prompt_logprobs is not None
    ids, values = result.topk_prompt_logprobs
    assert ids.dtype == np.int32 and values.dtype == np.float32 and ids.shape == (17, 5)
    assert (ids[0] == 0).all() and (values[0] == EMPTY_LOGPROB).all()
    top = torch.topk(reference, 5, dim=-1)
    np.testing.assert_array_equal(ids[1:], top.indices.numpy())
    np.testing.assert_allclose(values[1:], top.values.numpy(), atol=1e-4, rtol=0)
    # Only what was asked for. A prefill-only request is max_tokens=1, as the SDK's
    # compute_logprobs sends it (check_sample refuses max_tokens=0 everywhere).
    request = SampleRequest(prompt, 2, SamplingParams(max_tokens=1), None, prompt_logprobs=True)
    [result] = _run(Sampler(base, _decode), [request])
    assert result.topk_prompt_logprobs is None and result.prompt_logprobs is not None
    assert [(len(s.tokens), s.stop_reason) for s in result.sequences] == [(1, "length")] * 2


def test_filters_and_temperatures_that_leave_one_token_are_greedy(base: BaseLM):
    prompt = _prompt(50, 8)
    sampler = Sampler(base, _decode)
    greedy = _one(sampler, prompt, SamplingParams(max_tokens=16, temperature=0.0)).tokens
    for params in (
        SamplingParams(max_tokens=16, top_k=1, seed=1),
        SamplingParams(max_tokens=16, top_p=1e-6, seed=2),
        SamplingParams(max_tokens=16, min_p=1.0, seed=3),
        SamplingParams(max_tokens=16, temperature=1e-4, seed=4),
    ):
        assert _one(sampler, prompt, params).tokens == greedy, params


def test_top_p_keeps_the_nucleus(base: BaseLM):
    prompt = _prompt(51, 8)
    params = SamplingParams(max_tokens=40, top_p=0.3, seed=4)
    sequence = _one(Sampler(base, _decode), prompt, params)
    logprobs = _Reference(base.folder, None).logprobs([*prompt.tolist(), *sequence.tokens])
    probs = logprobs[prompt.shape[0] - 1 : -1].exp()
    chosen = probs.gather(-1, torch.tensor(sequence.tokens)[:, None])
    # Mass of the strictly more likely tokens stays below p for every chosen token.
    assert float((probs * (probs > chosen)).sum(-1).max()) < 0.3


def _penalised_reference(
    logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams
) -> torch.Tensor:
    """The penalties written out token by token (HF repetition, OpenAI presence/frequency)."""
    out = logits.clone()
    for token in set(prompt) | set(output):
        value = float(out[token])
        r = params.repetition_penalty
        out[token] = value / r if value > 0 else value * r
    for token in set(output):
        count = output.count(token)
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.8},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.7},
        {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4},
    ],
)
def test_penalties_match_reference(base: BaseLM, penalties: dict[str, float]):
    """Greedy under penalties picks, at every step, the argmax of the reference-penalised
    logits — and differs from plain greedy, so the penalties did something."""
    prompt = np.array([65, 66, 67, 65, 66, 67, 65, 66], np.int64)
    sampler = Sampler(base, _decode)
    params = SamplingParams(max_tokens=20, temperature=0.0, **penalties)
    sequence = _one(sampler, prompt, params)
    plain = _one(sampler, prompt, SamplingParams(max_tokens=20, temperature=0.0)).tokens
    assert sequence.tokens != plain
    logits = _Reference(base.folder, None).logits([*prompt.tolist(), *sequence.tokens])
    logprobs = torch.log_softmax(logits, -1)
    n = prompt.shape[0]
    for t, token in enumerate(sequence.tokens):
        scores = _penalised_reference(
            logits[n - 1 + t], prompt.tolist(), sequence.tokens[:t], params
        )
        assert int(scores.argmax()) == token, t
        # The reported logprob stays the model's own.
        assert sequence.logprobs[t] == pytest.approx(float(logprobs[n - 1 + t, token]), abs=1e-4)


def test_a_failing_request_does_not_disturb_the_others(base: BaseLM):
    good = SampleRequest(_prompt(60, 9), 2, SamplingParams(max_tokens=12, seed=1), None)
    [alone] = _run(Sampler(base, _decode), [good])

    def decode(tokens: Sequence[int]) -> str:
        raise RuntimeError("detokenizer broke")

    sampler = Sampler(base, decode)
    outcomes: list[SampleResult | BaseException | None] = [None] * 5
    sampler.add(good, _store(outcomes, 0))
    sampler.step()
    # Fails in its first step, while checking its stop strings.
    sampler.add(
        SampleRequest(_prompt(61, 4), 1, SamplingParams(8, stop_strings=("x",)), None),
        _store(outcomes, 1),
    )
    # Rejected before it runs: a mis-shaped adapter.
    broken = _adapter(base, seed=7)
    path = next(iter(broken.pairs))
    broken.pairs[path].b = torch.zeros(3, 3)
    sampler.add(SampleRequest(_prompt(62, 4), 1, SamplingParams(8), broken), _store(outcomes, 2))
    # Breaks after it was accepted: fails the batched pass, then fails alone.
    late = _adapter(base, seed=8)
    sampler.add(SampleRequest(_prompt(63, 5), 1, SamplingParams(8), late), _store(outcomes, 3))
    sampler.step()
    late.pairs[path].a = torch.zeros(2, 3)
    sampler.add(SampleRequest(_prompt(64, 4), 1, SamplingParams(1), None), _store(outcomes, 4))
    while sampler.has_work():
        sampler.step()
    assert isinstance(outcomes[0], SampleResult)
    assert [s.tokens for s in outcomes[0].sequences] == [s.tokens for s in alone.sequences]
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[2], UserInputError) and path in str(outcomes[2])
    assert isinstance(outcomes[3], RuntimeError)
    assert isinstance(outcomes[4], SampleResult)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": np.array([], np.int64)}, "non-empty"),
        ({"prompt": np.array([1, 100000], np.int64)}, "token ids"),
        ({"num_samples": 0}, "num_samples"),
        ({"params": SamplingParams(max_tokens=600)}, "context"),
        ({"params": SamplingParams(max_tokens=0)}, "max_tokens must be between 1 and"),
        ({"params": SamplingParams(max_tokens=4, temperature=-1.0)}, "temperature"),
        ({"params": SamplingParams(max_tokens=4, top_p=0.0)}, "top_p"),
        ({"params": SamplingParams(max_tokens=4, repetition_penalty=0.0)}, "repetition"),
    ],
)
def test_invalid_requests_fail_with_a_message(base: BaseLM, change: dict, message: str):
    fields = {
        "prompt": _prompt(70, 4),
        "num_samples": 1,
        "params": SamplingParams(max_tokens=4),
        "adapter": None,
    }
    outcomes: list[SampleResult | BaseException | None] = [None]
    sampler = Sampler(base, _decode)
    sampler.add(SampleRequest(**{**fields, **change}), _store(outcomes, 0))
    assert isinstance(outcomes[0], UserInputError) and message in str(outcomes[0])
    assert not sampler.has_work()


def test_decode_attention_reads_each_slots_own_past():
    """Rows in scattered slots (the isolation fallback's gather path) and at different
    lengths: each row writes its new key/value at its position and attends, through its
    grouped query heads, to exactly its slot's past — as plain per-head SDPA says."""
    config = PretrainedConfig(
        num_hidden_layers=1, num_key_value_heads=2, num_attention_heads=6, head_dim=8
    )
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(config, torch.device("cpu"), torch.float32)
    cache.reserve(4, 20)
    lengths = [5, 11, 3, 8]  # positions already stored per slot
    for slot, n in enumerate(lengths):
        cache.keys[0][slot, :, :n] = torch.randn(2, n, 8, generator=gen)
        cache.values[0][slot, :, :n] = torch.randn(2, n, 8, generator=gen)
    for slots in ([0, 1, 2, 3], [3, 1]):
        positions = [lengths[s] for s in slots]
        query = torch.randn(len(slots), 6, 1, 8, generator=gen)
        key = torch.randn(len(slots), 2, 1, 8, generator=gen)
        value = torch.randn(len(slots), 2, 1, 8, generator=gen)
        out = decode_attention(cache_decode(cache, slots, positions), 0, query, key, value, 0.3)
        assert out.shape == (len(slots), 1, 6, 8)
        for row, (slot, n) in enumerate(zip(slots, positions, strict=True)):
            past_k = torch.cat([cache.keys[0][slot, :, :n], key[row]], dim=1)
            past_v = torch.cat([cache.values[0][slot, :, :n], value[row]], dim=1)
            torch.testing.assert_close(cache.keys[0][slot, :, : n + 1], past_k)
            torch.testing.assert_close(cache.values[0][slot, :, : n + 1], past_v)
            want = F.scaled_dot_product_attention(
                query[row][:, None],  # [heads, 1, 1, dim]
                past_k.repeat_interleave(3, dim=0)[:, None],
                past_v.repeat_interleave(3, dim=0)[:, None],
                scale=0.3,
            )
            torch.testing.assert_close(out[row, 0], want[:, 0, 0])
