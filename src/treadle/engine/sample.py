"""Batched sampling: a KV cache, continuous batching and per-row adapters.

One :class:`Sampler` serves any number of requests, from any adapters of one base model,
from one thread (the model's engine loop). Each :meth:`Sampler.step` first admits waiting
requests — their prompts prefilled together in one packed pass, like a training pass,
each prompt once however many samples it asks for — and then advances every running
sequence by one token in one decode pass (:mod:`treadle.engine.decode`). A sequence that
finishes frees its cache slot at once and the next step admits new work into it, so short
and long requests never wait for each other. A request's life is an explicit
:class:`RequestStatus`, each sample's a :class:`SequenceStatus`.

The rows of a decode pass belong to different adapters (or to none): the base matmuls
are shared and each adapter adds its delta to its own rows (:mod:`treadle.engine.lora`).
Logprobs are those of the model itself (temperature 1, no filtering, no penalties) —
the quantity the trainer's forward returns, so RL importance ratios start at 1.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from treadle.engine.decode import DecodeStack
from treadle.engine.kv_cache import CacheDecode, CachePrefill, KVCache, cache_decode
from treadle.engine.lora import Adapter
from treadle.engine.models import BaseLM
from treadle.engine.pass_context import Span, cached, routing
from treadle.engine.token_selection import choose, row_generator
from treadle.errors import UserInputError
from treadle.sampling_params import SampleLimits, SamplingParams, check_sample
from treadle.types import SampledSequence, SampleResult

log = logging.getLogger(__name__)

# Rows of logits materialised at once for prompt logprobs: bounds the [rows, vocab]
# temporaries to 2**25 floats (128 MiB in fp32), as the trainer's head does.
_HEAD_CHUNK_ELEMENTS = 2**25
# Tinker's value for the (empty) top-k prompt logprobs of the first prompt token.
EMPTY_LOGPROB = -99999.0


@dataclass
class SampleRequest:
    prompt: np.ndarray  # int64 token ids, non-empty
    num_samples: int
    params: SamplingParams
    adapter: Adapter | None  # None = base model
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    # Streaming: told each step's new tokens of this request's sequences (see Progress).
    progress: Progress | None = None


Done = Callable[[SampleResult | BaseException], None]
# Called on the engine thread after each step that advanced a streaming request, once
# for all of its sequences that took a token: ``(sequence index, token, logprob)`` each,
# in the order the final result holds them (a stop token included), and before ``done``.
Progress = Callable[[list[tuple[int, int, float]]], None]


class RequestStatus(enum.Enum):
    """A request's life: waiting for admission, running (its sequences decode), then
    handed back once, finished or failed."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class SequenceStatus(enum.Enum):
    """One sample's life: running, then stopped (a stop token or string) or at its
    length (``max_tokens``). A failed request's sequences stop with it."""

    RUNNING = "running"
    STOPPED = "stop"
    LENGTH = "length"


@dataclass(eq=False)
class _Request:
    """A request being served: its sequences, and the prompt logprobs once computed."""

    request: SampleRequest
    done: Done
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: np.ndarray | None = None
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None = None
    status: RequestStatus = RequestStatus.WAITING

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass(eq=False)
class _Sequence:
    """One sample being generated. While running it sits in the cache slot equal to its
    index in ``Sampler._running``; the cache holds its first ``length`` tokens (the prompt
    and all sampled tokens but the last, which the next decode pass feeds)."""

    owner: _Request
    generator: torch.Generator
    length: int
    index: int  # among its request's sequences (the result's order)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.RUNNING

    @property
    def params(self) -> SamplingParams:
        return self.owner.params

    @property
    def retired(self) -> bool:
        """Its cache slot can be freed: it ended, or its request failed."""
        return (
            self.status is not SequenceStatus.RUNNING or self.owner.status is RequestStatus.FAILED
        )


class Sampler:
    """Continuous-batching sampler over one base model; driven by one thread."""

    def __init__(
        self,
        base: BaseLM,
        decode: Callable[[Sequence[int]], str],
        max_batch: int = 64,
        max_prefill_tokens: int = 8192,
        limits: SampleLimits | None = None,
    ) -> None:
        self.base = base
        self.decode = decode
        self.max_batch = max_batch
        # Bounds the activations of one prefill pass; a longer prompt still runs, alone.
        self.max_prefill_tokens = max_prefill_tokens
        self.limits = limits or SampleLimits()
        self._head = base.head
        # Re-points base's q/k/v and gate/up weights at views of fused buffers (same
        # values; training reads them too): see decode.DecodeStack. Sharded weights are
        # whole only inside their layer's forward, so those decode through the modules.
        self._stack: Callable[[Tensor, CacheDecode], Tensor] = (
            DecodeStack(base) if base.sharding is None else base.sharding.decode
        )
        self._waiting: deque[_Request] = deque()
        self._running: list[_Sequence] = []
        self._cache: KVCache | None = None

    def add(self, request: SampleRequest, done: Done) -> None:
        """Queue ``request``; ``done`` gets its result, or the exception that failed it
        (invalid requests fail here, before they touch the model)."""
        try:
            self._check(request)
        except UserInputError as exc:
            _call(done, exc)
            return
        self._waiting.append(_Request(request, done))

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def running(self) -> int:
        """Sequences decoded together by the next step."""
        return len(self._running)

    def step(self) -> None:
        """Admit waiting requests (one prefill pass), then one decode pass for every
        running sequence; calls ``done`` for each request that finished."""
        with torch.inference_mode(), self.base.gathered():
            admitted = self._admit()
            if admitted:
                self._isolated(admitted, self._prefill)
            if self._running:
                self._isolated(list(_owners(self._running)), self._decode)
        if not self.has_work():
            self._cache = None  # idle: give the memory back

    # -- validation -------------------------------------------------------------------

    def _check(self, request: SampleRequest) -> None:
        check_sample(
            request.prompt,
            request.num_samples,
            request.params,
            request.topk_prompt_logprobs,
            self.base.vocab_size,
            self.base.max_context,
            self.limits,
        )
        if request.adapter is not None:
            self._check_adapter(request.adapter)

    def _check_adapter(self, adapter: Adapter) -> None:
        # A mis-shaped adapter would fail the whole batched pass it joins: reject it alone.
        for path, pair in adapter.pairs.items():
            layer = self.base.layers.get(path)
            if layer is None:
                raise UserInputError(f"the adapter has weights for {path!r}, not in the model")
            rank = pair.a.shape[0]
            want_a = (rank, layer.base.in_features)
            want_b = (layer.base.out_features, rank)
            if tuple(pair.a.shape) != want_a or tuple(pair.b.shape) != want_b:
                raise UserInputError(
                    f"the adapter's {path} has shapes {tuple(pair.a.shape)}, {tuple(pair.b.shape)};"
                    f" the model needs {want_a}, {want_b}"
                )

    # -- scheduling -------------------------------------------------------------------

    def _admit(self) -> list[_Request]:
        """Waiting requests, in order, while their samples fit ``max_batch`` and their
        prompts the prefill budget; an oversized one is admitted when it would be alone."""
        admitted: list[_Request] = []
        slots, tokens = len(self._running), 0
        while self._waiting:
            request = self._waiting[0].request
            samples, prompt = request.num_samples, request.prompt.shape[0]
            alone = not admitted and not self._running
            fits = slots + samples <= self.max_batch and tokens + prompt <= self.max_prefill_tokens
            if not (fits or alone):
                break
            admitted.append(self._waiting.popleft())
            admitted[-1].status = RequestStatus.RUNNING
            slots += samples
            tokens += prompt
        return admitted

    def _isolated(self, requests: list[_Request], run: Callable[[list[_Request]], None]) -> None:
        """``run`` the requests together; if that raises, run each alone, so an error fails
        only the request that causes it. ``run`` changes no state before it can fail."""
        try:
            run(requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("sampling request failed")
                self._fail(requests[0], exc)
                self._retire()
                return
            for request in requests:
                self._isolated([request], run)

    # -- passes -----------------------------------------------------------------------

    def _prefill(self, requests: list[_Request]) -> None:
        """One packed pass over the prompts; each prompt's keys and values go to the
        cache slots of all its samples, and its last position gives their first tokens."""
        cache = self._cache_for()
        lengths = [r.request.prompt.shape[0] for r in requests]
        copies = [r.request.num_samples for r in requests]
        first_slots = (len(self._running) + np.cumsum([0, *copies[:-1]])).tolist()
        cache.reserve(len(self._running) + sum(copies), max(lengths))
        device = self.base.device
        tokens = torch.from_numpy(np.concatenate([r.request.prompt for r in requests]))
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
        adapters = [r.request.adapter for r in requests]
        with (
            routing(_spans(adapters, lengths, device)),
            cached(CachePrefill(cache, lengths, first_slots, copies)),
        ):
            hidden = self.base.backbone(
                input_ids=tokens.to(device)[None],
                position_ids=positions.to(device)[None],
                use_cache=False,
            ).last_hidden_state[0]
        ends = torch.tensor(np.cumsum(lengths) - 1, device=device)
        logits = self._logits(hidden[ends], _spans(adapters, [1] * len(requests), device))
        starts = np.cumsum([0, *lengths[:-1]])
        for request, start, n in zip(requests, starts, lengths, strict=True):
            if request.request.prompt_logprobs or request.request.topk_prompt_logprobs:
                self._prompt_logprobs(request, hidden[start : start + n])
        sequences = [
            _Sequence(r, row_generator(r.params.seed, i), length=n, index=i)
            for r, n in zip(requests, lengths, strict=True)
            for i in range(r.request.num_samples)
        ]
        rows = torch.tensor(np.repeat(np.arange(len(requests)), copies), device=device)
        chosen, logprobs = self._choose(logits[rows], sequences)
        for request in requests:
            request.sequences = [s for s in sequences if s.owner is request]
        self._running.extend(sequences)
        self._advance(sequences, chosen, logprobs)

    def _decode(self, requests: list[_Request]) -> None:
        """Feed each running sequence of ``requests`` its last token; sample the next."""
        owners = set(requests)
        slots = [i for i, s in enumerate(self._running) if s.owner in owners]
        sequences = [self._running[i] for i in slots]
        positions = [s.length for s in sequences]
        cache = self._cache_for()
        cache.reserve(len(self._running), max(positions) + 1)
        device = self.base.device
        tokens = torch.tensor([s.tokens[-1] for s in sequences], device=device)
        spans = _spans([s.owner.request.adapter for s in sequences], [1] * len(slots), device)
        with routing(spans):
            hidden = self._stack(tokens, cache_decode(cache, slots, positions))
        chosen, logprobs = self._choose(self._logits(hidden, spans), sequences)
        for sequence in sequences:
            sequence.length += 1
        self._advance(sequences, chosen, logprobs)

    def _cache_for(self) -> KVCache:
        if self._cache is None:
            model = self.base.model
            self._cache = KVCache(model.config, self.base.device, model.dtype)
        return self._cache

    def _logits(self, hidden: Tensor, spans: list[Span]) -> Tensor:
        """Float32 logits of ``hidden``: the unembedding plus each row's lm_head LoRA."""
        with routing(spans):
            logits: Tensor = self._head(hidden)
        return logits.float()

    def _prompt_logprobs(self, request: _Request, hidden: Tensor) -> None:
        """Logprob of each prompt token given the ones before it, and the top-k of each
        position's distribution, in chunks of rows (the logits are ``[n, vocab]``)."""
        prompt = request.request.prompt
        n, k = prompt.shape[0], request.request.topk_prompt_logprobs
        targets = torch.from_numpy(prompt[1:]).to(hidden.device)[:, None]
        logprobs = np.full(n, np.nan, np.float32)
        top_ids = np.zeros((n, k), np.int32)
        top_logprobs = np.full((n, k), EMPTY_LOGPROB, np.float32)
        adapter = request.request.adapter
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // self.base.vocab_size)
        # Row t of the logits predicts prompt token t + 1.
        for start in range(0, n - 1, chunk):
            stop = min(start + chunk, n - 1)
            spans = _spans([adapter], [stop - start], hidden.device)
            logits = self._logits(hidden[start:stop], spans)
            norm = torch.logsumexp(logits, -1, keepdim=True)
            part = logits.gather(-1, targets[start:stop]) - norm
            logprobs[start + 1 : stop + 1] = part[:, 0].cpu().numpy()
            if k:
                values, ids = torch.topk(logits, k, dim=-1)
                top_ids[start + 1 : stop + 1] = ids.cpu().numpy()
                top_logprobs[start + 1 : stop + 1] = (values - norm).cpu().numpy()
        if request.request.prompt_logprobs:
            request.prompt_logprobs = logprobs
        if k:
            request.topk_prompt_logprobs = (top_ids, top_logprobs)

    @staticmethod
    def _choose(logits: Tensor, sequences: list[_Sequence]) -> tuple[list[int], list[float]]:
        """The next token of each row, and its logprob under the model itself."""
        return choose(
            logits,
            [s.params for s in sequences],
            [s.owner.request.prompt for s in sequences],
            [s.tokens for s in sequences],
            [s.generator for s in sequences],
        )

    # -- bookkeeping --------------------------------------------------------------------

    def _advance(
        self, sequences: list[_Sequence], tokens: list[int], logprobs: list[float]
    ) -> None:
        """Append each sequence's new token, end the sequences that stop, and hand back
        the requests all of whose sequences have ended."""
        touched: dict[int, _Request] = {}
        # Streaming requests' new tokens; empty (and never filled) when none streams.
        streamed: dict[int, list[tuple[int, int, float]]] = {}
        for sequence, token, logprob in zip(sequences, tokens, logprobs, strict=True):
            owner = sequence.owner
            if owner.status is not RequestStatus.RUNNING:
                continue
            touched[id(owner)] = owner
            try:
                self._append(sequence, token, logprob)
            except Exception as exc:
                log.exception("sampling request failed")
                self._fail(owner, exc)
                continue
            if owner.request.progress is not None:
                streamed.setdefault(id(owner), []).append((sequence.index, token, logprob))
        self._retire()
        for key, new in streamed.items():
            owner = touched[key]
            if owner.status is RequestStatus.RUNNING and owner.request.progress is not None:
                _report(owner.request.progress, new)
        for owner in touched.values():
            ended = all(s.status is not SequenceStatus.RUNNING for s in owner.sequences)
            if owner.status is RequestStatus.RUNNING and ended:
                owner.status = RequestStatus.FINISHED
                _call(owner.done, _result(owner))

    def _append(self, sequence: _Sequence, token: int, logprob: float) -> None:
        params = sequence.params
        sequence.tokens.append(token)
        sequence.logprobs.append(logprob)
        if token in params.stop_token_ids or self._stop_string_ends(sequence):
            sequence.status = SequenceStatus.STOPPED
        elif len(sequence.tokens) >= params.max_tokens:
            sequence.status = SequenceStatus.LENGTH

    def _stop_string_ends(self, sequence: _Sequence) -> bool:
        """Whether the last token completes one of the stop strings. Only a tail is
        decoded: wide enough for the longest stop string even at one byte per token; a
        string completed earlier would have stopped the sequence earlier."""
        stops = sequence.params.stop_strings
        if not stops:
            return False
        window = 4 * max(len(s) for s in stops) + 1
        text = self.decode(sequence.tokens[-window:])
        return any(stop in text for stop in stops)

    def _fail(self, request: _Request, exc: BaseException) -> None:
        request.status = RequestStatus.FAILED
        _call(request.done, exc)

    def _retire(self) -> None:
        """Free the slots of ended sequences; the last running sequence moves into each
        freed slot, so the running slots stay ``0..n-1`` and decode reads a plain view."""
        freed = [i for i, s in enumerate(self._running) if s.retired]
        for slot in reversed(freed):
            last = len(self._running) - 1
            if slot != last:
                moved = self._running[last]
                assert self._cache is not None
                self._cache.move(last, slot, moved.length)
                self._running[slot] = moved
            self._running.pop()


def _owners(sequences: list[_Sequence]) -> dict[_Request, None]:
    """The distinct requests of ``sequences``, in order (a dict as an ordered set)."""
    return dict.fromkeys(s.owner for s in sequences)


def _spans(adapters: list[Adapter | None], sizes: list[int], device: torch.device) -> list[Span]:
    """Routing for consecutive groups of ``sizes[i]`` rows using ``adapters[i]``: one slice
    if a single adapter covers every row, otherwise the rows of each adapter by index."""
    distinct = {id(a): a for a in adapters if a is not None}
    if not distinct:
        return []
    total = sum(sizes)
    if len(distinct) == 1 and all(a is not None for a in adapters):
        return [Span(adapters[0], rows=slice(0, total))]
    group = np.repeat(np.arange(len(adapters)), sizes)
    spans = []
    for key, adapter in distinct.items():
        mine = np.flatnonzero([id(a) == key for a in adapters])
        rows = np.flatnonzero(np.isin(group, mine))
        spans.append(Span(adapter, rows=torch.from_numpy(rows).to(device)))
    return spans


def _result(request: _Request) -> SampleResult:
    return SampleResult(
        sequences=[
            SampledSequence(s.tokens, s.logprobs, s.status.value) for s in request.sequences
        ],
        prompt_logprobs=request.prompt_logprobs,
        topk_prompt_logprobs=request.topk_prompt_logprobs,
    )


def _report(progress: Progress, tokens: list[tuple[int, int, float]]) -> None:
    # Like a failing done-callback, a failing progress callback fails nobody else.
    try:
        progress(tokens)
    except Exception:
        log.exception("sampling progress-callback raised")


def _call(done: Done, outcome: SampleResult | BaseException) -> None:
    # A failing callback is the caller's bug; it must not stop the other requests.
    try:
        done(outcome)
    except Exception:
        log.exception("sampling done-callback raised")
