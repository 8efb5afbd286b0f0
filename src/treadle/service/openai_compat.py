"""OpenAI-compatible inference, as Tinker's beta offers it (``/oai/api/v1``): what a
``model`` names, prompts from text or chat messages, and samples taken the SDK's way.

``model`` is a served base model, a checkpoint path (``tinker://…/sampler_weights/…``,
sampled on the base model it was trained on) or ``BASE;PATH`` (the path's base model
named explicitly; it must be the one the checkpoint was trained on). Checkpoints are
read under the SDK's rules: the caller's own or a published one; anything else is "not
found". Samples go through :meth:`Sampling.queue`, the one way the SDK's ``asample``
takes too: the same sampler batches, limits and usage counts. Only text is added here:
the model's own tokenizer and chat template (through the :class:`Worker`), stop strings
cut from the text as OpenAI does, and top logprobs of sampled tokens. A streamed request
gets its text as the sampler decodes it (:meth:`OpenAICompat.stream`), held back only
where it could still begin a stop string or ends in part of a character.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from treadle.errors import Failure, NotFound, UserInputError
from treadle.sampling_params import SamplingParams
from treadle.service.futures import FutureStore
from treadle.service.sampling import SampleCall, Sampling
from treadle.service.served import Adapter, SampleProgress, Worker
from treadle.types import ModelInfo, SampledSequence, SampleResult

log = logging.getLogger(__name__)

# The sampling "session" these requests are queued and traced under: they have no
# client session of their own.
TRACK = "openai"
# A detokenized prefix that ends in this is an incomplete character: hold it back.
_INCOMPLETE = "\ufffd"


class SamplerFault(RuntimeError):
    """The sampler failed a request through no fault of the request (a server error)."""


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` names: a base model, and an adapter or none."""

    base_model: str
    adapter: Adapter | None


@dataclass(frozen=True)
class Options:
    """The sampling parameters of an OpenAI request, OpenAI's defaults applied (except
    ``max_tokens``: None means what the context leaves)."""

    max_tokens: int | None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # don't stop at the model's end of sequence (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False  # the sampled tokens' logprobs
    top_logprobs: int = 0  # and the k most likely tokens at each position


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens there, most likely first


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens)
    logprobs: list[TokenLogprob] | None
    # Text pieces that join to the end of ``text`` streaming has still to send: one per
    # shown token (all of it) in an answer sent at the end, the rest after the deltas.
    pieces: list[str] | None


@dataclass(frozen=True)
class Delta:
    """Text of choice ``index`` decoded while it samples (streaming)."""

    index: int
    text: str


@dataclass(frozen=True)
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Request:
    """A checked request: its target, its prompts' calls, and how to answer."""

    target: Target
    calls: list[SampleCall]
    options: Options
    stream: bool


class OpenAICompat:
    def __init__(
        self,
        sampling: Sampling,
        futures: FutureStore,
        max_sequences: int,
        cached_checkpoints: int,
    ) -> None:
        self._sampling = sampling
        self._futures = futures
        self._max_sequences = max_sequences
        # Strong references to recently used checkpoint adapters: the sampling service
        # keeps them only while something refers to them (and shares them meanwhile).
        self._recent: collections.OrderedDict[str, Adapter] = collections.OrderedDict()
        self._cached = cached_checkpoints

    # -- model ------------------------------------------------------------------------

    def target(self, user: str, model: str) -> Target:
        """The base model and adapter ``model`` names, if ``user`` may sample it."""
        base, sep, path = model.partition(";")
        if sep:
            if not path.startswith("tinker://"):
                raise UserInputError(
                    f"model {model!r}: BASE;PATH needs a checkpoint path (tinker://…) after the ';'"
                )
            self._worker(base)
            return self._checkpoint(user, base, path)
        if model.startswith("tinker://"):
            return self._checkpoint(user, None, model)
        self._worker(model)
        return Target(model, None)

    def info(self, target: Target) -> ModelInfo:
        return self._worker(target.base_model).info

    def _worker(self, base_model: str) -> Worker:
        try:
            return self._sampling.model(base_model).worker
        except UserInputError as exc:  # OpenAI's answer to an unknown model is a 404
            raise NotFound(str(exc)) from None

    def _checkpoint(self, user: str, base_model: str | None, path: str) -> Target:
        trained_on, adapter = self._sampling.checkpoint_adapter(user, base_model, path)
        self._recent[path] = adapter
        self._recent.move_to_end(path)
        while len(self._recent) > self._cached:
            self._recent.popitem(last=False)
        return Target(trained_on, adapter)

    # -- prompts ----------------------------------------------------------------------

    async def chat_prompt(self, target: Target, messages: list[dict[str, str]]) -> np.ndarray:
        """The prompt tokens of ``messages`` in the model's chat template (off the event
        loop: a long conversation takes a while to tokenize)."""
        worker = self._worker(target.base_model)
        tokens = await asyncio.to_thread(worker.chat_prompt, messages)
        return np.asarray(tokens, dtype=np.int64)

    async def text_prompts(
        self, target: Target, prompts: Sequence[str | Sequence[int]]
    ) -> list[np.ndarray]:
        """Each prompt's tokens: text is tokenized, token ids are taken as they are."""
        worker = self._worker(target.base_model)

        def tokenize() -> list[np.ndarray]:
            return [np.asarray(worker.tokenize(p), np.int64) for p in prompts if isinstance(p, str)]

        texts = iter(await asyncio.to_thread(tokenize))
        try:
            return [next(texts) if isinstance(p, str) else np.asarray(p, np.int64) for p in prompts]
        except OverflowError:  # (sampling's check refuses every id outside the vocabulary)
            raise UserInputError("prompt token ids must be below 2**63") from None

    # -- checking ---------------------------------------------------------------------

    def check_count(self, prompts: int, n: int) -> None:
        """Completions a request asks for: ``n`` per prompt."""
        if not prompts:
            raise UserInputError("prompt is empty; give a string, or a list of them")
        if prompts * n > self._max_sequences:
            raise UserInputError(
                f"{prompts} prompt(s) x n={n} is {prompts * n} completions; at most"
                f" {self._max_sequences} per request (--max-num-samples)"
            )

    def check(
        self, target: Target, prompts: list[np.ndarray], options: Options, stream: bool
    ) -> Request:
        """The request in the sampler's terms, checked by the SDK's own sampling check
        (a user error saying what to change if anything is off)."""
        self.check_count(len(prompts), options.n)
        info = self.info(target)
        top_k = options.top_logprobs if options.logprobs else 0
        calls = []
        for prompt in prompts:
            # Top logprobs are read from one more position than the last sampled token.
            room = info.max_context - int(prompt.shape[0]) - (1 if top_k else 0)
            max_tokens = room if options.max_tokens is None else options.max_tokens
            if top_k and max_tokens > room:
                raise UserInputError(
                    f"with top_logprobs, prompt + max_tokens must leave one position of the"
                    f" model's context ({info.max_context}) free: max_tokens is at most {room}"
                )
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=options.temperature,
                top_k=options.top_k,
                top_p=options.top_p,
                min_p=options.min_p,
                seed=options.seed,
                # OpenAI's stop strings come on top of the model's end of sequence.
                stop_token_ids=() if options.ignore_eos else info.eos_token_ids,
                stop_strings=tuple(s for s in options.stop if s),
                repetition_penalty=options.repetition_penalty,
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
            )
            calls.append(
                self._sampling.checked(info, TRACK, 0, prompt, options.n, params, False, 0)
            )
        if top_k:  # the follow-up pass (see _top_logprobs) must pass the same check
            self._sampling.checked(
                info, TRACK, 0, calls[0].prompt, 1, SamplingParams(max_tokens=1), False, top_k
            )
        return Request(target, calls, options, stream)

    # -- sampling ---------------------------------------------------------------------

    async def complete(self, user: str, request: Request) -> Completion:
        """Sample every prompt (``n`` completions each, all queued at once) and put the
        answer in text."""
        results = await self._sample_all(user, request.target, request.calls)
        return await self._completion(user, request, results, request.stream)

    async def stream(self, user: str, request: Request) -> AsyncGenerator[Delta | Completion, None]:
        """Sample as :meth:`complete` does, yielding each choice's text as it is decoded
        (:class:`Delta`) and then the :class:`Completion`, whose choices' ``pieces`` are
        what is left to send. With logprobs, the completion comes alone, every piece
        still to send (top logprobs need a pass after the sample)."""
        if request.options.logprobs:
            yield await self.complete(user, request)
            return
        loop = asyncio.get_running_loop()
        # Steps as they arrive, (first choice index of their prompt, new tokens); ``woke``
        # is set by each, and by the end of sampling.
        arrived: collections.deque[tuple[int, list[tuple[int, int, float]]]] = collections.deque()
        woke = asyncio.Event()

        def arrive(step: tuple[int, list[tuple[int, int, float]]]) -> None:
            arrived.append(step)
            woke.set()

        detokenize = self._worker(request.target.base_model).detokenize
        listening = True  # until the stream ends (a client may leave mid-way)
        texts: list[ChoiceStream] = []
        progresses: list[SampleProgress] = []
        for call in request.calls:
            first = len(texts)  # the choice index of this prompt's first completion
            texts.extend(ChoiceStream(call.params, detokenize) for _ in range(call.num_samples))

            def progress(tokens: list[tuple[int, int, float]], first: int = first) -> None:
                # On an engine thread: hand the step to the event loop.
                if listening:
                    loop.call_soon_threadsafe(arrive, (first, tokens))

            progresses.append(progress)
        sampled = asyncio.ensure_future(
            self._sample_all(user, request.target, request.calls, progresses)
        )
        sampled.add_done_callback(lambda _: woke.set())
        try:
            # Every step of a sample arrives before its result (both hop to this loop in
            # the order the engine made them): once sampling is done, all steps are here.
            while True:
                while arrived:
                    first, tokens = arrived.popleft()
                    for index, token, _ in tokens:
                        piece = texts[first + index].add(token)
                        if piece:
                            yield Delta(first + index, piece)
                if sampled.done():
                    break
                await woke.wait()
                woke.clear()
            results = sampled.result()
        finally:
            listening = False
            if sampled.done() and not sampled.cancelled():
                sampled.exception()  # seen (raised above, or the client left before it)
            sampled.cancel()  # the client went away: what has not started never will
        completion = await self._completion(user, request, results, False)
        choices = []
        for choice, text in zip(completion.choices, texts, strict=True):
            # Sent is a beginning of the text by construction; the rest ends the choice.
            sent = text.sent
            if not choice.text.startswith(sent):
                log.warning("streamed text %r is not a beginning of %r", sent, choice.text)
            rest = choice.text[len(sent) :] if choice.text.startswith(sent) else ""
            choices.append(dataclasses.replace(choice, pieces=[rest]))
        yield dataclasses.replace(completion, choices=choices)

    async def _completion(
        self, user: str, request: Request, results: list[SampleResult], stream: bool
    ) -> Completion:
        """The samples' answer in text (``stream``: with every choice's pieces)."""
        worker = self._worker(request.target.base_model)
        options = request.options
        top_k = options.top_logprobs if options.logprobs else 0
        tops: list[list[tuple[np.ndarray, np.ndarray]] | None] = [None] * len(results)
        if top_k:
            tops = await self._top_logprobs(user, request, results, top_k)
        choices: list[Choice] = []
        for call, result, top in zip(request.calls, results, tops, strict=True):
            for j, sequence in enumerate(result.sequences):
                choices.append(
                    _choice(
                        len(choices),
                        sequence,
                        call.params,
                        worker.detokenize,
                        options.logprobs,
                        top[j] if top else None,
                        stream,
                    )
                )
        return Completion(
            choices,
            prompt_tokens=sum(int(call.prompt.shape[0]) for call in request.calls),
            completion_tokens=sum(len(s.tokens) for r in results for s in r.sequences),
        )

    async def _sample_all(
        self,
        user: str,
        target: Target,
        calls: list[SampleCall],
        progresses: Sequence[SampleProgress] | None = None,
    ) -> list[SampleResult]:
        ids = [
            self._sampling.queue(
                user,
                target.base_model,
                target.adapter,
                call,
                progress=progresses[i] if progresses else None,
            )
            for i, call in enumerate(calls)
        ]
        try:
            return [await self._result(user, request_id) for request_id in ids]
        except asyncio.CancelledError:  # the client went away: what has not started never will
            for request_id in ids:
                with contextlib.suppress(NotFound):
                    self._sampling.cancel(user, request_id)
            raise

    async def _result(self, user: str, request_id: str) -> SampleResult:
        while True:
            done, value = await self._futures.wait(request_id, user, 3600.0)
            if done:
                break
        if isinstance(value, Failure):
            if value.category == "user":
                raise UserInputError(value.message)
            raise SamplerFault(value.message)
        assert isinstance(value, SampleResult)
        return value

    async def _top_logprobs(
        self, user: str, request: Request, results: list[SampleResult], k: int
    ) -> list[list[tuple[np.ndarray, np.ndarray]] | None]:
        """The ``k`` most likely tokens at each sampled position: the sampler's top-k
        prompt logprobs of prompt + completion (one more prefill per completion, through
        the same sampler), read at the completion's positions."""
        info = self.info(request.target)
        calls, where = [], []
        for i, (call, result) in enumerate(zip(request.calls, results, strict=True)):
            for j, sequence in enumerate(result.sequences):
                if sequence.tokens:
                    tokens = np.concatenate([call.prompt, np.asarray(sequence.tokens, np.int64)])
                    params = SamplingParams(max_tokens=1, temperature=0.0)
                    calls.append(
                        self._sampling.checked(info, TRACK, 0, tokens, 1, params, False, k)
                    )
                    where.append((i, j, int(call.prompt.shape[0]), len(sequence.tokens)))
        found = await self._sample_all(user, request.target, calls)
        tops: list[list[tuple[np.ndarray, np.ndarray]] | None] = [
            [(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))] * len(r.sequences)
            for r in results
        ]
        for (i, j, start, count), result in zip(where, found, strict=True):
            assert result.topk_prompt_logprobs is not None
            ids, logprobs = result.topk_prompt_logprobs
            top = tops[i]
            assert top is not None
            top[j] = (ids[start : start + count], logprobs[start : start + count])
        return tops


def _choice(
    index: int,
    sequence: SampledSequence,
    params: SamplingParams,
    detokenize: Callable[[Sequence[int]], str],
    logprobs: bool,
    top: tuple[np.ndarray, np.ndarray] | None,
    stream: bool,
) -> Choice:
    """One completion as text. An end-of-sequence token that stopped it is not shown (as
    in OpenAI's answers), and neither is a stop string nor what follows it."""
    tokens = list(sequence.tokens)
    if sequence.stop_reason == "stop" and tokens and tokens[-1] in params.stop_token_ids:
        tokens = tokens[:-1]
    text = detokenize(tokens)
    cut = min((i for i in (text.find(s) for s in params.stop_strings) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    pieces = _clip(text_pieces(tokens, detokenize), len(text)) if stream else None
    entries = None
    if logprobs:
        entries = []
        for t, (token, logprob) in enumerate(zip(tokens, sequence.logprobs, strict=False)):
            best: list[tuple[str, float]] = []
            if top is not None:
                ids, values = top
                best = [
                    (detokenize([int(i)]), float(v)) for i, v in zip(ids[t], values[t], strict=True)
                ]
            entries.append(TokenLogprob(detokenize([token]), float(logprob), best))
    return Choice(index, text, sequence.stop_reason, entries, pieces)


class TextPieces:
    """Text as tokens arrive: :meth:`add` gives the text each token adds, and the pieces
    join to the text of all the tokens once :meth:`rest` is added.

    A token's piece is what decoding a short window ending with it adds to decoding the
    window without it: the window starts one piece back, so tokenizers that decode a
    token differently at the start of a text (a leading space) still give the right
    piece; a piece ending in an incomplete character is held back until it completes.
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str]) -> None:
        self._detokenize = detokenize
        self._tokens: list[int] = []
        self._start = self._given = 0  # tokens[start:given] decode to the end of the text given

    def add(self, token: int) -> str:
        self._tokens.append(token)
        before = self._detokenize(self._tokens[self._start : self._given])
        after = self._detokenize(self._tokens[self._start :])
        if (
            after.startswith(before)
            and len(after) > len(before)
            and not after.endswith(_INCOMPLETE)
        ):
            self._start, self._given = self._given, len(self._tokens)
            return after[len(before) :]
        return ""

    def rest(self) -> str:
        """What is held back at the end: an incomplete character the tokens end in."""
        if self._given == len(self._tokens):
            return ""
        before = self._detokenize(self._tokens[self._start : self._given])
        return self._detokenize(self._tokens[self._start :])[len(before) :]


def text_pieces(tokens: Sequence[int], detokenize: Callable[[Sequence[int]], str]) -> list[str]:
    """The text each token adds, one piece per token, joining to the text of all of them."""
    text = TextPieces(detokenize)
    pieces = [text.add(token) for token in tokens]
    if pieces:
        pieces[-1] += text.rest()
    return pieces


class ChoiceStream:
    """One completion's text while it is sampled: :meth:`add` gives what may be sent now.
    What is sent is always a beginning of the completion's final text (:func:`_choice`):
    the stop token is not shown, and text that could be the start of a stop string is
    held back until the next tokens decide it (the final text is cut before one)."""

    def __init__(self, params: SamplingParams, detokenize: Callable[[Sequence[int]], str]) -> None:
        self._text = TextPieces(detokenize)
        self._stop_tokens = params.stop_token_ids
        self._stops = params.stop_strings
        self._held = ""  # decoded, not sent: it may begin a stop string
        self._ended = False  # a stop token or string came: nothing more is shown
        self._sent: list[str] = []

    @property
    def sent(self) -> str:
        """All the text given out so far."""
        return "".join(self._sent)

    def add(self, token: int) -> str:
        if self._ended or token in self._stop_tokens:
            self._ended = True
            return ""
        self._held += self._text.add(token)
        cut = min((i for i in (self._held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            ready, self._held, self._ended = self._held[:cut], "", True
        else:
            keep = _stop_start(self._held, self._stops)
            ready, self._held = self._held[:keep], self._held[keep:]
        self._sent.append(ready)
        return ready


def _stop_start(text: str, stops: Sequence[str]) -> int:
    """Where the longest end of ``text`` that begins some stop string starts (its length
    if none does). A stop string met later must start there: what comes before is safe."""
    firsts = {s[0] for s in stops}  # (a cheap filter: most positions start none)
    for start in range(max(0, len(text) - max((len(s) for s in stops), default=0) + 1), len(text)):
        if text[start] in firsts and any(s.startswith(text[start:]) for s in stops):
            return start
    return len(text)


def _clip(pieces: list[str], length: int) -> list[str]:
    """``pieces`` cut so that they join to their first ``length`` characters."""
    clipped, total = [], 0
    for piece in pieces:
        piece = piece[: max(0, length - total)]
        clipped.append(piece)
        total += len(piece)
    return clipped
