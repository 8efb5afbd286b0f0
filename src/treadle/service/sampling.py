"""Sampling sessions and ``asample``.

A sampling session samples from a base model alone or from an adapter snapshot: one taken
from memory by ``save_weights_for_sampler`` (no disk round trip), or loaded from a saved
checkpoint path. Requests are checked here, then decoded on the base model's engine thread
together with every other running request (continuous batching).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from treadle.engine.checkpoint import CheckpointError, load_adapter, read_spec
from treadle.engine.datum import UserInputError
from treadle.engine.lora import Adapter
from treadle.engine.sample import SampleRequest, SampleResult, SamplingParams
from treadle.service.checkpoints import CheckpointPath
from treadle.service.engines import Engine, find_engine
from treadle.service.errors import NotFound
from treadle.service.futures import Failure, FutureStore

# Ephemeral samplers kept per training model (the cookbook samples a few steps
# off-policy at most); older ones are dropped to bound memory.
EPHEMERAL_PER_MODEL = 8


@dataclass
class SamplingSession:
    sampling_session_id: str
    base_model: str
    adapter: Adapter | None
    model_path: str | None
    source_model_id: str | None = None


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


class Sampling:
    def __init__(self, engines: Mapping[str, Engine], futures: FutureStore, data_dir: Path) -> None:
        self._engines = engines
        self._futures = futures
        self._data_dir = data_dir
        self._sessions: dict[str, SamplingSession] = {}
        self._snapshots: dict[str, Adapter] = {}  # tinker path -> adapter saved this run
        self._ephemeral: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque
        )
        self._seen: dict[tuple[str, int], str] = {}  # (session, seq_id) -> request id

    def engine(self, base_model: str) -> Engine:
        return find_engine(self._engines, base_model)

    def remember_snapshot(self, tinker_path: str, adapter: Adapter) -> None:
        """A named sampler checkpoint just saved: sample from it without reading disk."""
        self._snapshots[tinker_path] = adapter

    def forget_snapshot(self, tinker_path: str) -> None:
        self._snapshots.pop(tinker_path, None)

    def add_ephemeral(
        self, sampling_session_id: str, base_model: str, model_id: str, adapter: Adapter
    ) -> None:
        recent = self._ephemeral[model_id]
        recent.append(sampling_session_id)
        while len(recent) > EPHEMERAL_PER_MODEL:
            self._sessions.pop(recent.popleft(), None)
        self._sessions[sampling_session_id] = SamplingSession(
            sampling_session_id, base_model, adapter, None, model_id
        )

    def create_session(
        self, sampling_session_id: str, base_model: str | None, model_path: str | None
    ) -> SamplingSession:
        if sampling_session_id in self._sessions:
            return self._sessions[sampling_session_id]
        if model_path:
            session = self._from_path(sampling_session_id, base_model, model_path)
        elif base_model:
            self.engine(base_model)
            session = SamplingSession(sampling_session_id, base_model, None, None)
        else:
            raise UserInputError("create_sampling_session needs a base_model or a model_path")
        self._sessions[sampling_session_id] = session
        return session

    def _from_path(
        self, sampling_session_id: str, base_model: str | None, model_path: str
    ) -> SamplingSession:
        path = CheckpointPath.parse(model_path)
        folder = path.folder(self._data_dir)
        if not folder.is_dir():
            raise NotFound(f"no checkpoint at {model_path}")
        try:
            _, trained_on = read_spec(folder)
        except CheckpointError as exc:
            raise UserInputError(str(exc)) from exc
        if trained_on is None:
            raise UserInputError(f"{model_path} does not record its base model")
        if base_model and base_model != trained_on:
            raise UserInputError(
                f"{model_path} was trained on {trained_on}, not {base_model}; sample it with"
                f" base model {trained_on}"
            )
        engine = self.engine(trained_on)
        adapter = self._snapshots.get(model_path)
        if adapter is None:
            try:
                adapter = load_adapter(folder, engine.base.layers).detached()
            except CheckpointError as exc:
                raise UserInputError(str(exc)) from exc
        return SamplingSession(sampling_session_id, trained_on, adapter, model_path)

    def session(self, sampling_session_id: str) -> SamplingSession:
        session = self._sessions.get(sampling_session_id)
        if session is None:
            raise NotFound(
                f"unknown sampling session {sampling_session_id!r} (ephemeral samplers are"
                f" kept for the last {EPHEMERAL_PER_MODEL} saves of a model, and not across"
                " restarts); create a sampling client again"
            )
        return session

    def sample(self, call: SampleCall) -> str:
        """Queue a checked request; returns its request id (the same for a resubmit)."""
        key = (call.sampling_session_id, call.seq_id)
        if key in self._seen:
            return self._seen[key]
        session = self.session(call.sampling_session_id)
        engine = self.engine(session.base_model)
        request_id = self._futures.create("sample")
        self._seen[key] = request_id
        request = SampleRequest(
            prompt=call.prompt,
            num_samples=call.num_samples,
            params=call.params,
            adapter=session.adapter,
            prompt_logprobs=call.prompt_logprobs,
            topk_prompt_logprobs=call.topk_prompt_logprobs,
        )
        engine.scheduler.sample(request, self._resolver(request_id))
        return request_id

    def _resolver(self, request_id: str) -> Callable[[SampleResult | BaseException], None]:
        def done(outcome: SampleResult | BaseException) -> None:
            if isinstance(outcome, UserInputError):
                self._futures.resolve(request_id, Failure(str(outcome)))
            elif isinstance(outcome, BaseException):
                message = f"treadle sampler error: {type(outcome).__name__}: {outcome}"
                self._futures.resolve(request_id, Failure(message, "server"))
            else:
                self._futures.resolve(request_id, outcome)

        return done

    def check(
        self,
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
        """Validate an ``asample`` request against its session's model."""
        session = self.session(sampling_session_id)
        base = self.engine(session.base_model).base
        n = int(prompt.shape[0])
        if n == 0:
            raise UserInputError("the prompt is empty; give it at least one token")
        if prompt.min() < 0 or prompt.max() >= base.vocab_size:
            raise UserInputError(
                f"the prompt contains a token id outside the vocabulary [0, {base.vocab_size})"
            )
        room = base.max_context - n
        if room <= 0:
            raise UserInputError(
                f"the prompt has {n} tokens; the model's context is {base.max_context},"
                " which leaves no room to sample; shorten the prompt"
            )
        if max_tokens is None:
            max_tokens = room
        if max_tokens <= 0 or max_tokens > room:
            raise UserInputError(
                f"max_tokens must be between 1 and {room} (context {base.max_context} minus"
                f" the prompt's {n} tokens), got {max_tokens}"
            )
        if not 1 <= num_samples <= 128:
            raise UserInputError(f"num_samples must be between 1 and 128, got {num_samples}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise UserInputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {top_p}")
        if top_k == 0 or top_k < -1:
            raise UserInputError(f"top_k must be -1 (off) or positive, got {top_k}")
        if not 0 <= min_p <= 1:
            raise UserInputError(f"min_p must be in [0, 1], got {min_p}")
        repetition, presence, frequency = penalties
        if not (repetition > 0 and math.isfinite(presence) and math.isfinite(frequency)):
            raise UserInputError("repetition_penalty must be > 0; penalties must be finite")
        if not 0 <= topk_prompt_logprobs <= 64:
            raise UserInputError("topk_prompt_logprobs must be between 0 and 64")
        stop_tokens, stop_strings = _stops(stop, base.eos_token_ids, base.vocab_size)
        params = SamplingParams(
            max_tokens=max_tokens,
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
        return SampleCall(
            sampling_session_id,
            seq_id,
            prompt,
            num_samples,
            params,
            prompt_logprobs or topk_prompt_logprobs > 0,
            topk_prompt_logprobs,
        )


def _stops(
    stop: str | Sequence[str] | Sequence[int] | None, eos: tuple[int, ...], vocab_size: int
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
        tokens = tuple(ints)
        if any(not 0 <= t < vocab_size for t in tokens):
            raise UserInputError(f"stop token ids must be in [0, {vocab_size})")
        return tokens, ()
    raise UserInputError("stop must be a string, a list of strings, or a list of token ids")
