"""Batched sampling: a KV cache, continuous batching and per-row adapters.

One :class:`Sampler` serves any number of requests, from any adapters of one base model,
from a single engine thread. Each :meth:`Sampler.step` first admits waiting requests —
their prompts prefilled together in one packed pass, like a training pass, each prompt
once however many samples it asks for — and then advances every running sequence by one
token in one decode pass (:mod:`treadle.engine.decode`). A sequence that finishes frees
its cache slot at once and the next step admits new work into it, so short and long
requests never wait for each other.

The rows of a decode pass belong to different adapters (or to none): the base matmuls
are shared and each adapter adds its delta to its own rows (:mod:`treadle.engine.lora`).
Logprobs are those of the model itself (temperature 1, no filtering, no penalties) —
the quantity the trainer's forward returns, so RL importance ratios start at 1.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from treadle.engine.attention import CachePrefill, KVCache, cache_decode, cached
from treadle.engine.datum import UserInputError
from treadle.engine.decode import DecodeStack
from treadle.engine.lora import UNEMBED_MODULE, Adapter, Span, routing
from treadle.engine.models import BaseModel

log = logging.getLogger(__name__)

# Rows of logits materialised at once for prompt logprobs: bounds the [rows, vocab]
# temporaries to 2**25 floats (128 MiB in fp32), as the trainer's head does.
_HEAD_CHUNK_ELEMENTS = 2**25
# Tinker's value for the (empty) top-k prompt logprobs of the first prompt token.
EMPTY_LOGPROB = -99999.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 (or 0) = off
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


@dataclass
class SampleRequest:
    prompt: np.ndarray  # int64 token ids, non-empty
    num_samples: int
    params: SamplingParams
    adapter: Adapter | None  # None = base model
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]  # log p(token) at temperature 1, unfiltered, unpenalised
    stop_reason: str  # "stop" (stop token or string) or "length" (max_tokens)


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: np.ndarray | None  # float32 [len(prompt)], NaN at position 0
    # (ids int32 [n, k], logprobs float32 [n, k]); row 0 empty: ids 0, logprobs -99999.0
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None


Done = Callable[[SampleResult | BaseException], None]


@dataclass(eq=False)
class _Request:
    """A request being served: its sequences, and the prompt logprobs once computed."""

    request: SampleRequest
    done: Done
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: np.ndarray | None = None
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None = None
    failed: bool = False

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
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.owner.params

    @property
    def retired(self) -> bool:
        return self.stop_reason is not None or self.owner.failed


class Sampler:
    """Continuous-batching sampler over one base model; driven by one thread."""

    def __init__(
        self,
        base: BaseModel,
        decode: Callable[[Sequence[int]], str],
        max_batch: int = 64,
        max_prefill_tokens: int = 8192,
    ) -> None:
        self.base = base
        self.decode = decode
        self.max_batch = max_batch
        # Bounds the activations of one prefill pass; a longer prompt still runs, alone.
        self.max_prefill_tokens = max_prefill_tokens
        self._head = base.layers[UNEMBED_MODULE]
        self._stack = DecodeStack(base)
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
        with torch.inference_mode():
            admitted = self._admit()
            if admitted:
                self._isolated(admitted, self._prefill)
            if self._running:
                self._isolated(list(_owners(self._running)), self._decode)
        if not self.has_work():
            self._cache = None  # idle: give the memory back

    # -- validation -------------------------------------------------------------------

    def _check(self, request: SampleRequest) -> None:
        prompt, params = request.prompt, request.params
        vocab = self.base.vocab_size
        if prompt.ndim != 1 or prompt.shape[0] == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise UserInputError("the prompt must be a non-empty list of token ids")
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise UserInputError(f"prompt token ids must lie in [0, {vocab}) for this model")
        if request.num_samples < 1:
            raise UserInputError(f"num_samples must be at least 1, got {request.num_samples}")
        if params.max_tokens < 0:
            raise UserInputError(f"max_tokens must be at least 0, got {params.max_tokens}")
        if prompt.shape[0] + params.max_tokens > self.base.max_context:
            raise UserInputError(
                f"the prompt ({prompt.shape[0]} tokens) plus max_tokens ({params.max_tokens})"
                f" exceeds the model's context of {self.base.max_context} tokens;"
                " shorten the prompt or lower max_tokens"
            )
        _check_params(params)
        if not 0 <= request.topk_prompt_logprobs <= vocab:
            raise UserInputError(f"topk_prompt_logprobs must lie in [0, {vocab}]")
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
            _Sequence(r, _generator(r.params.seed, i), length=n)
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

    # -- choosing tokens ----------------------------------------------------------------

    def _choose(self, logits: Tensor, sequences: list[_Sequence]) -> tuple[list[int], list[float]]:
        """The next token of each row, and its logprob under the model itself."""
        norm = torch.logsumexp(logits, -1)
        scores = _penalised(logits, sequences)
        chosen = torch.empty(len(sequences), dtype=torch.long, device=logits.device)
        greedy = [i for i, s in enumerate(sequences) if s.params.temperature == 0]
        drawn = [i for i, s in enumerate(sequences) if s.params.temperature != 0]
        if greedy:
            rows = _index(greedy, len(sequences), logits.device)
            chosen[rows] = scores[rows].argmax(-1)
        if drawn:
            rows = _index(drawn, len(sequences), logits.device)
            chosen[rows] = _draw(scores[rows], [sequences[i] for i in drawn])
        logprobs = logits.gather(-1, chosen[:, None])[:, 0] - norm
        return chosen.tolist(), logprobs.tolist()

    # -- bookkeeping --------------------------------------------------------------------

    def _advance(
        self, sequences: list[_Sequence], tokens: list[int], logprobs: list[float]
    ) -> None:
        """Append each sequence's new token, end the sequences that stop, and hand back
        the requests all of whose sequences have ended."""
        touched: dict[int, _Request] = {}
        for sequence, token, logprob in zip(sequences, tokens, logprobs, strict=True):
            owner = sequence.owner
            if owner.failed:
                continue
            touched[id(owner)] = owner
            try:
                self._append(sequence, token, logprob)
            except Exception as exc:
                log.exception("sampling request failed")
                self._fail(owner, exc)
        self._retire()
        for owner in touched.values():
            if not owner.failed and all(s.stop_reason for s in owner.sequences):
                _call(owner.done, _result(owner))

    def _append(self, sequence: _Sequence, token: int, logprob: float) -> None:
        params = sequence.params
        if params.max_tokens == 0:
            sequence.stop_reason = "length"
            return
        sequence.tokens.append(token)
        sequence.logprobs.append(logprob)
        if token in params.stop_token_ids or self._stop_string_ends(sequence):
            sequence.stop_reason = "stop"
        elif len(sequence.tokens) >= params.max_tokens:
            sequence.stop_reason = "length"

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
        request.failed = True
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


def _check_params(params: SamplingParams) -> None:
    checks = [
        (math.isfinite(params.temperature) and params.temperature >= 0, "temperature >= 0"),
        (params.top_k >= -1, "top_k >= 1, or -1 for no top-k"),
        (0 < params.top_p <= 1, "0 < top_p <= 1"),
        (0 <= params.min_p <= 1, "0 <= min_p <= 1"),
        (
            math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0,
            "repetition_penalty > 0",
        ),
        (math.isfinite(params.presence_penalty), "a finite presence_penalty"),
        (math.isfinite(params.frequency_penalty), "a finite frequency_penalty"),
    ]
    for ok, needed in checks:
        if not ok:
            raise UserInputError(f"invalid sampling parameters: {needed} is required")


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


def _index(rows: list[int], total: int, device: torch.device) -> slice | Tensor:
    return slice(None) if len(rows) == total else torch.tensor(rows, device=device)


def _penalised(logits: Tensor, sequences: list[_Sequence]) -> Tensor:
    """``logits`` with each row's repetition/presence/frequency penalties applied."""
    rows = [i for i, s in enumerate(sequences) if s.params.penalised]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        sequence, params, row = sequences[i], sequences[i].params, out[i]
        generated = torch.tensor(sequence.tokens, dtype=torch.long, device=logits.device)
        if params.repetition_penalty != 1.0:
            prompt = torch.from_numpy(sequence.owner.request.prompt).to(logits.device)
            seen = torch.unique(torch.cat([prompt, generated]))
            values = row[seen]
            penalty = params.repetition_penalty
            row[seen] = torch.where(values > 0, values / penalty, values * penalty)
        if generated.numel():
            ids, counts = torch.unique(generated, return_counts=True)
            row[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return out


def _draw(scores: Tensor, sequences: list[_Sequence]) -> Tensor:
    """Sample one token per row after temperature, top-k, top-p and min-p (vLLM's
    order), by inverting each row's CDF at one uniform draw from the row's own generator:
    one random number per token keeps a seeded sequence the same whatever it shares a
    batch with."""
    params = [s.params for s in sequences]
    device = scores.device
    if any(p.temperature != 1.0 for p in params):
        temperature = torch.tensor([p.temperature for p in params], device=device)
        scores = scores / temperature[:, None]
    elif any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        scores = scores.clone()  # the filters below write in place; the caller's stay
    _top_k(scores, [p.top_k for p in params])
    _top_p(scores, [p.top_p for p in params])
    _min_p(scores, [p.min_p for p in params])
    cdf = torch.softmax(scores, -1).cumsum_(-1)
    uniform = torch.cat([torch.rand(1, generator=s.generator) for s in sequences]).to(device)
    # right=True: the first token whose CDF exceeds the draw, never a zero-probability one.
    chosen = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    return chosen.clamp_(max=scores.shape[-1] - 1)


def _top_k(scores: Tensor, ks: list[int]) -> None:
    vocab = scores.shape[-1]
    rows = [i for i, k in enumerate(ks) if 0 < k < vocab]
    if not rows:
        return
    index = torch.tensor(rows, device=scores.device)
    part = scores[index]
    k = torch.tensor([ks[i] for i in rows], device=scores.device)
    top = torch.topk(part, int(k.max()), dim=-1).values
    # Ties with the k-th score are kept, as in HF and vLLM.
    threshold = top.gather(-1, (k - 1)[:, None])
    scores[index] = part.masked_fill(part < threshold, -math.inf)


def _top_p(scores: Tensor, ps: list[float]) -> None:
    rows = [i for i, p in enumerate(ps) if p < 1.0]
    if not rows:
        return
    index = torch.tensor(rows, device=scores.device)
    ordered, order = scores[index].sort(-1, descending=True)
    probs = torch.softmax(ordered, -1)
    before = probs.cumsum(-1) - probs
    # Keep the smallest prefix whose mass reaches p (always at least the top token).
    drop = before >= torch.tensor([ps[i] for i in rows], device=scores.device)[:, None]
    drop[:, 0] = False
    ordered.masked_fill_(drop, -math.inf)
    scores[index] = torch.empty_like(ordered).scatter_(-1, order, ordered)


def _min_p(scores: Tensor, ps: list[float]) -> None:
    rows = [i for i, p in enumerate(ps) if p > 0.0]
    if not rows:
        return
    index = torch.tensor(rows, device=scores.device)
    part = scores[index]
    # p < min_p · p_max  <=>  score < max score + log(min_p)
    floor = torch.tensor([math.log(ps[i]) for i in rows], device=scores.device)[:, None]
    scores[index] = part.masked_fill(part < part.max(-1, keepdim=True).values + floor, -math.inf)


def _generator(seed: int | None, index: int) -> torch.Generator:
    """Sample ``index`` of a request gets its own stream, derived from the request's seed
    (or a fresh random one), so samples differ and a seeded request is reproducible."""
    root = secrets.randbits(64) if seed is None else seed % 2**64
    state = np.random.SeedSequence([root, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _result(request: _Request) -> SampleResult:
    return SampleResult(
        sequences=[
            SampledSequence(s.tokens, s.logprobs, s.stop_reason or "length")
            for s in request.sequences
        ],
        prompt_logprobs=request.prompt_logprobs,
        topk_prompt_logprobs=request.topk_prompt_logprobs,
    )


def _call(done: Done, outcome: SampleResult | BaseException) -> None:
    # A failing callback is the caller's bug; it must not stop the other requests.
    try:
        done(outcome)
    except Exception:
        log.exception("sampling done-callback raised")
