"""Sampling sessions and ``asample``.

A sampling session samples from a base model alone or from an adapter snapshot: one taken
from memory by ``save_weights_for_sampler`` (no disk round trip), or loaded from a saved
checkpoint path. Requests are checked here (:func:`~treadle.sampling_params.check_sample`),
then decoded on the base model's engine loop together with every other running request
(continuous batching).
"""

from __future__ import annotations

import collections
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from treadle.engine.adapter_config import read_spec
from treadle.errors import Failure, NotFound, UserInputError, failure_of
from treadle.sampling_params import SampleLimits, SamplingParams, check_sample
from treadle.service.auth import owned
from treadle.service.checkpoints import readable_checkpoint
from treadle.service.engine_loop import QueuedSample
from treadle.service.futures import About, Channel, FutureStore, UnknownFuture
from treadle.service.served import Adapter, SampleProgress, ServedModel, find_model
from treadle.service.sessions import Sessions
from treadle.service.store import Store
from treadle.service.usage import Usage
from treadle.settings import Settings
from treadle.types import ModelInfo, SampleResult


@dataclass
class SamplingSession:
    sampling_session_id: str
    user: str
    base_model: str
    adapter: Adapter | None  # the engine's frozen adapter; None samples the base model
    model_path: str | None
    clones: int = 0  # clone ids handed out by join_sampling_session


@dataclass(frozen=True)
class SampleCall:
    """A checked ``asample`` request, ready for the engine."""

    sampling_session_id: str
    seq_id: int
    prompt: np.ndarray
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool
    topk_prompt_logprobs: int

    def sequence_ids(self) -> list[str]:
        return [
            f"{self.sampling_session_id}:seq:{self.seq_id}:{i}" for i in range(self.num_samples)
        ]


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


# A SamplingClient rebuilt in another process (a *clone*) numbers its samples from
# clone * 10**9; the clone id is the block.
CLONE_BLOCK = 1_000_000_000


class Sampling:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        futures: FutureStore,
        store: Store,
        sessions: Sessions,
        usage: Usage,
        settings: Settings,
    ) -> None:
        self._models = models
        self._futures = futures
        self._store = store
        self._client_sessions = sessions
        self._usage = usage
        self._data_dir = settings.data_dir
        self._ephemeral_per_model = settings.ephemeral_samplers_per_model
        self._max_per_user = settings.max_samplers_per_user
        self._limits = SampleLimits.of(settings)
        self._sessions: dict[str, SamplingSession] = {}
        # Named sampler checkpoints saved by live runs, sampled without reading disk.
        self._snapshots: dict[str, Adapter] = {}  # tinker path -> adapter
        # Every adapter loaded for a checkpoint path, while a sampling session uses it:
        # sessions on one checkpoint share one copy.
        self._loaded: weakref.WeakValueDictionary[str, Adapter] = weakref.WeakValueDictionary()
        self._ephemeral: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque
        )
        # (session, seq_id) -> request id, so a retried submit runs once; the oldest
        # entries go first (a retry comes within seconds).
        self._seen: collections.OrderedDict[tuple[str, int], str] = collections.OrderedDict()
        self._seen_limit = settings.retry_window

    def model(self, base_model: str) -> ServedModel:
        return find_model(self._models, base_model)

    def remember_snapshot(self, tinker_path: str, adapter: Adapter) -> None:
        """A named sampler checkpoint just saved: sample from it without reading disk."""
        self._snapshots[tinker_path] = adapter

    def forget_snapshot(self, tinker_path: str) -> None:
        self._snapshots.pop(tinker_path, None)

    def forget_run(self, model_id: str) -> None:
        """A training model was unloaded: its ephemeral samplers go, and its saved
        sampler checkpoints are read from disk from now on."""
        for sampler in self._ephemeral.pop(model_id, ()):
            self._sessions.pop(sampler, None)
        prefix = f"tinker://{model_id}/"
        for path in [p for p in self._snapshots if p.startswith(prefix)]:
            del self._snapshots[path]

    def end_session(self, session_id: str) -> None:
        """Drop every sampling session of a client session that ended."""
        prefix = f"{session_id}:sample:"
        for sampler in [s for s in self._sessions if s.startswith(prefix)]:
            del self._sessions[sampler]

    def add_ephemeral(
        self,
        user: str,
        sampling_session_id: str,
        base_model: str,
        model_id: str,
        adapter: Adapter,
    ) -> None:
        recent = self._ephemeral[model_id]
        recent.append(sampling_session_id)
        while len(recent) > self._ephemeral_per_model:
            self._sessions.pop(recent.popleft(), None)
        self._sessions[sampling_session_id] = SamplingSession(
            sampling_session_id, user, base_model, adapter, None
        )

    def create_session(
        self,
        user: str,
        session_id: str,
        sampling_session_seq_id: int,
        base_model: str | None,
        model_path: str | None,
    ) -> str:
        """A sampling session of one of ``user``'s client sessions; returns its id (the
        same on a retry)."""
        self._client_sessions.check_live(session_id, user)
        sampling_session_id = sampler_id(session_id, sampling_session_seq_id)
        if sampling_session_id in self._sessions:
            return sampling_session_id
        mine = sum(1 for s in self._sessions.values() if s.user == user)
        if mine >= self._max_per_user:
            raise UserInputError(
                f"sampling sessions per user: the limit is {self._max_per_user} and you have"
                f" {mine}; end a session (ServiceClient.close) to free some"
            )
        if model_path:
            session = self._from_path(user, sampling_session_id, base_model, model_path)
        elif base_model:
            self.model(base_model)
            session = SamplingSession(sampling_session_id, user, base_model, None, None)
        else:
            raise UserInputError("create_sampling_session needs a base_model or a model_path")
        self._sessions[sampling_session_id] = session
        return sampling_session_id

    def _from_path(
        self, user: str, sampling_session_id: str, base_model: str | None, model_path: str
    ) -> SamplingSession:
        trained_on, adapter = self.checkpoint_adapter(user, base_model, model_path)
        return SamplingSession(sampling_session_id, user, trained_on, adapter, model_path)

    def checkpoint_adapter(
        self, user: str, base_model: str | None, model_path: str
    ) -> tuple[str, Adapter]:
        """The base model a checkpoint ``user`` may read was trained on, and its adapter
        (from memory if a live run saved it; everyone sampling one path shares one copy).
        ``base_model``, if given, must be the one it was trained on."""
        folder = readable_checkpoint(self._store, self._data_dir, user, model_path)
        _, trained_on = read_spec(folder)
        if trained_on is None:
            raise UserInputError(f"{model_path} does not record its base model")
        if base_model and base_model != trained_on:
            raise UserInputError(
                f"{model_path} was trained on {trained_on}, not {base_model}; sample it with"
                f" base model {trained_on}"
            )
        served = self.model(trained_on)
        adapter = self._snapshots.get(model_path) or self._loaded.get(model_path)
        if adapter is None:
            adapter = served.worker.load_adapter(folder)
            self._loaded[model_path] = adapter
        return trained_on, adapter

    def live_samplers(self) -> dict[str, int]:
        """Sampling sessions live now, by base model (for the metrics)."""
        return dict(collections.Counter(s.base_model for s in list(self._sessions.values())))

    def samplers_of(self, user: str, session_id: str) -> list[str]:
        """The live sampling sessions ``user`` made in client session ``session_id``."""
        prefix = f"{session_id}:sample:"
        return [
            sampler
            for sampler, session in self._sessions.items()
            if sampler.startswith(prefix) and session.user == user
        ]

    def session(self, user: str, sampling_session_id: str) -> SamplingSession:
        """One of ``user``'s sampling sessions; not found for anyone else's."""
        session = self._sessions.get(sampling_session_id)
        owned(
            session.user if session else None,
            user,
            f"unknown sampling session {sampling_session_id!r} (ephemeral samplers are"
            f" kept for the last {self._ephemeral_per_model} saves of a model, and not"
            " across restarts); create a sampling client again",
        )
        assert session is not None
        return session

    def info(self, user: str, sampling_session_id: str) -> ModelInfo:
        return self.model(self.session(user, sampling_session_id).base_model).info

    def sample(self, user: str, call: SampleCall) -> str:
        """Queue a checked request; returns its request id (the same for a resubmit)."""
        session = self.session(user, call.sampling_session_id)
        key = (call.sampling_session_id, call.seq_id)
        if key in self._seen:
            return self._seen[key]
        channel: Channel = (call.sampling_session_id, call.seq_id // CLONE_BLOCK)
        request_id = self.queue(user, session.base_model, session.adapter, call, channel)
        self._seen[key] = request_id
        while len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)
        return request_id

    def queue(
        self,
        user: str,
        base_model: str,
        adapter: Adapter | None,
        call: SampleCall,
        channel: Channel | None = None,
        progress: SampleProgress | None = None,
    ) -> str:
        """Queue a checked request of ``user``'s on ``base_model``'s sampler, with
        ``adapter`` (None: the base model alone); returns the request id of its future.
        Every sample, the SDK's or another API's, takes this one way: the same queue,
        batches, fairness and usage counts. ``progress`` (a streaming request's) gets each
        decode step's new tokens on an engine thread, before the future resolves."""
        served = self.model(base_model)
        about = About("sample", base_model, call.sampling_session_id, int(call.prompt.shape[0]))
        request_id = self._futures.create(user, channel, about)

        def start(finished: Callable[[], None]) -> None:
            def done(outcome: SampleResult | BaseException) -> None:
                finished()
                if isinstance(outcome, BaseException):
                    self._futures.resolve(request_id, failure_of(outcome, "treadle sampler"))
                    return
                prompt = int(call.prompt.shape[0])
                self._usage.add(user, base_model, "prefill", prompt)
                sampled = sum(len(sequence.tokens) for sequence in outcome.sequences)
                self._usage.add(user, base_model, "sampled", sampled)
                self._futures.resolve(request_id, outcome, sampled)

            served.worker.add_sample(
                call.prompt,
                call.num_samples,
                call.params,
                adapter,
                call.prompt_logprobs,
                call.topk_prompt_logprobs,
                done,
                progress,
            )

        queued = QueuedSample(
            request_id, call.sampling_session_id, call.num_samples, start, time.monotonic()
        )
        served.loop.sample(queued)
        return request_id

    def cancel(self, user: str, request_id: str) -> tuple[bool, str]:
        """``cancel_future``: ``(True, message)`` if ``user``'s sample had not started and
        now never will (its future fails); ``(False, why not)`` if it started or finished.
        Another user's request, like an unknown one, is not found."""
        try:
            finished = self._futures.state(request_id, user)
        except UnknownFuture:
            raise NotFound(
                f"unknown request_id {request_id!r} (results are kept for an hour, and not"
                " across restarts)"
            ) from None
        if finished:
            return False, f"request {request_id} has already finished; nothing to cancel"
        if any(served.loop.cancel_sample(request_id) for served in self._models.values()):
            message = "sample cancelled (cancel_future) before it started; send it again to run it"
            self._futures.resolve(request_id, Failure(message, "user"))
            return True, f"request {request_id} was cancelled before it started"
        return False, (
            f"request {request_id} has already started (or is not a sample) and runs to its"
            " end; only samples still queued can be cancelled"
        )

    def join(self, user: str, sampling_session_id: str) -> int:
        """``join_sampling_session``: a new clone id (1, 2, …) for a SamplingClient rebuilt
        from a sampler handle or a pickle, so its seq_ids never collide with another's."""
        session = self.session(user, sampling_session_id)
        session.clones += 1
        return session.clones

    def check(
        self,
        user: str,
        sampling_session_id: str,
        seq_id: int,
        prompt: np.ndarray,
        num_samples: int,
        max_tokens: int | None,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        seed: int | None,
        stop: str | Sequence[str] | Sequence[int] | None,
        penalties: tuple[float, float, float],
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> SampleCall:
        """An ``asample`` request in the engine's terms, checked against its model."""
        info = self.info(user, sampling_session_id)
        repetition, presence, frequency = penalties
        stop_tokens, stop_strings = _stops(stop, info.eos_token_ids)
        params = SamplingParams(
            # Unset: as many as the context leaves (check_sample refuses an empty prompt
            # or one that fills the context before this matters).
            max_tokens=info.max_context - int(prompt.shape[0])
            if max_tokens is None
            else max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            stop_token_ids=stop_tokens,
            stop_strings=stop_strings,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
        )
        return self.checked(
            info,
            sampling_session_id,
            seq_id,
            prompt,
            num_samples,
            params,
            prompt_logprobs,
            topk_prompt_logprobs,
        )

    def checked(
        self,
        info: ModelInfo,
        track: str,
        seq_id: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> SampleCall:
        """A request for model ``info`` that passed the one sampling check (a user error
        saying what to change if not); ``track`` is the sampling session it is traced
        under."""
        check_sample(
            prompt,
            num_samples,
            params,
            topk_prompt_logprobs,
            info.vocab_size,
            info.max_context,
            self._limits,
        )
        return SampleCall(
            track,
            seq_id,
            prompt,
            num_samples,
            params,
            prompt_logprobs or topk_prompt_logprobs > 0,
            topk_prompt_logprobs,
        )


def _stops(
    stop: str | Sequence[str] | Sequence[int] | None, eos: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``None``: stop at the model's end-of-sequence tokens; ``[]``: never stop early;
    else stop strings or stop token ids, as given."""
    if stop is None:
        return eos, ()
    if isinstance(stop, str):
        return (), (stop,) if stop else ()
    items = list(stop)
    if all(isinstance(s, str) for s in items):
        return (), tuple(str(s) for s in items if s)
    ints = [s for s in items if isinstance(s, int) and not isinstance(s, bool)]
    if len(ints) == len(items):
        return tuple(ints), ()
    raise UserInputError("stop must be a string, a list of strings, or a list of token ids")
