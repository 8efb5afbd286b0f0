"""The engine loop: one thread per base model that runs everything computed on it.

It alternates one decode step of every running sample with one training *cycle*. A
cycle is either the leading forward/backward requests of the models with work ready,
packed into shared passes (Tinker's clock cycle), or the leading requests that run
alone (``optim_step``, saves, loads, …), one per model; when both wait they take turns,
so a model's ``optim_step`` runs right after its pass and its next ``forward_backward``
is back in time for the next packed cycle (which waits for it briefly, see
:meth:`EngineLoop._gathering`). Requests arrive through the model's
:class:`~treadle.service.ordering.Ordering`, so a model's requests still execute
strictly in ``seq_id`` order.

Sharing is fair: a cycle has a token budget, filled one request per user in turn (users
not served yet first, then whoever was served longest ago), so a user with a huge queue
delays another's small request by about one cycle at most. Decoding goes on inside a
cycle too: the passes pause between layers for a decode step whenever decoding's share
of the time (``--decode-share``) is due. Nothing computes on the event loop.

Samples wait here, not in the sampler, until the sampler has room for their sequences
(``--sampler-max-batch``): a sample still waiting can be cancelled, and its queue wait
ends where its decoding starts. Every request leaves two spans in its session's trace
(:mod:`treadle.service.trace`): its queue wait and what it ran as, from timestamps taken
once per request. The metrics (:mod:`treadle.service.metrics`) get each cycle's and decode
step's time and each sample's time to first token, and each request's future learns
when it started running.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from treadle.errors import Failure, failure_of
from treadle.service.futures import About, FutureStore
from treadle.service.metrics import Metrics
from treadle.service.ordering import Ordering
from treadle.service.served import Worker
from treadle.service.trace import Span, Traces, session_of
from treadle.types import ForwardBackwardResult

log = logging.getLogger(__name__)

# Waiting for the rest of a cycle (see EngineLoop._gathering): at most this long, and at
# most this share of the last pass's time, so a lone request never waits noticeably.
_GATHER_SECONDS = 0.1
_GATHER_SHARE = 0.1


@dataclass(frozen=True)
class Packable:
    """A forward(/backward) of ``user``'s that shares the cycle's packed passes. ``build``
    makes its engine work when the cycle runs: the model may still be being created when
    it is queued. ``tokens`` counts against the cycle's budget. ``done``, if given, sees
    its result on the loop thread once its future holds it."""

    request_id: str
    build: Callable[[], Any]
    user: str = ""
    tokens: int = 0
    done: Callable[[ForwardBackwardResult], None] | None = None


@dataclass(frozen=True)
class Solo:
    """A request that runs alone, between cycles; ``call`` returns its result."""

    request_id: str
    call: Callable[[], Any]


@dataclass(frozen=True)
class Rejected:
    """A request whose input was refused; its failure is reported in its turn."""

    request_id: str
    failure: Failure


Queued = Packable | Solo | Rejected


@dataclass(frozen=True)
class QueuedSample:
    """A sample request waiting for room in the sampler. ``start`` hands it to the worker
    and must arrange for the callback it is given to be called (on the loop thread) when
    the sample ends; ``track`` is its sampling session."""

    request_id: str
    track: str
    sequences: int
    start: Callable[[Callable[[], None]], None]
    arrived: float


@dataclass(frozen=True)
class QueueState:
    """What waits and runs on a base model's engine loop right now (the console's live
    queue): requests released in order but not started, with their tokens, and samples
    waiting for room and decoding."""

    requests: int
    tokens: int
    samples_waiting: int
    sequences_decoding: int


class ShuttingDown(Exception):
    """Raised inside a running cycle when the server stops before it ends."""


class EngineLoop:
    """Ordering of a base model's requests plus the thread that executes them."""

    def __init__(
        self,
        worker: Worker,
        futures: FutureStore,
        retry_window: int,
        cycle_tokens: int,
        decode_share: float,
        max_batch: int,
        traces: Traces,
        metrics: Metrics,
    ) -> None:
        self.name = worker.info.name
        self._worker = worker
        self._futures = futures
        self._traces = traces
        self._metrics = metrics
        self._lock = threading.Condition()
        self._ordering: Ordering[Queued] = Ordering(retry_window)
        self._ready: dict[str, collections.deque[Queued]] = collections.defaultdict(
            collections.deque
        )
        self._samples: collections.deque[QueuedSample] = collections.deque()
        self._max_batch = max_batch
        self._decoding = 0  # sequences handed to the worker and not finished (loop thread)
        # Request id -> (when it arrived, its model), until it runs: its queue wait.
        self._arrivals: dict[str, tuple[float, str]] = {}
        self._cycles = itertools.count(1)
        self._cycle_tokens = cycle_tokens
        self._turns: collections.deque[str] = collections.deque()  # users, next served first
        self._expected: set[str] = set()  # models served in the last cycle
        self._solo_turn = True  # whether requests that run alone go next, when both wait
        self._gather_until: float | None = None
        self._last_pass = 0.0  # seconds the last packed forward/backward took
        # While both wait, training runs this many seconds per second of decoding.
        self._training_per_decode = (1.0 - decode_share) / decode_share
        self._decode_due = 0.0  # when a training cycle next pauses for a decode step
        self._stopped = False
        self._aborting = False
        self._thread = threading.Thread(target=self._loop, name=f"loop:{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=60)

    def submit(
        self,
        user: str,
        model_id: str,
        seq_id: int | None,
        make: Callable[[str], Queued],
        kind: str = "request",
        tokens: int = 0,
    ) -> str:
        """Queue ``user``'s request of ``model_id`` in its ``seq_id`` turn (``None``: no
        ordering, run when the loop is free). Returns the request id; a repeated
        ``seq_id`` returns the first submit's. ``kind`` (``optim_step``, …) and ``tokens``
        are what the metrics and the request log say about it."""
        about = About(kind, self.name, model_id, tokens)

        def checked(request_id: str) -> Queued:
            self._arrivals[request_id] = (time.monotonic(), model_id)
            # A request whose checks break must still take its turn, or every later
            # request of its model would wait for the gap.
            try:
                return make(request_id)
            except Exception as exc:
                return Rejected(request_id, failure_of(exc, "treadle service"))

        with self._lock:
            request_id, released = self._ordering.submit(
                model_id, seq_id, lambda: self._futures.create(user, about=about), checked
            )
            if released:
                self._ready[model_id].extend(released)
                self._lock.notify()
            return request_id

    def call(self, user: str, model_id: str, fn: Callable[[], Any], kind: str = "request") -> str:
        """Run ``fn`` on the loop thread outside any model's ordering."""
        return self.submit(user, model_id, None, lambda request_id: Solo(request_id, fn), kind)

    def sample(self, sample: QueuedSample) -> None:
        """Queue a sample; the loop thread starts it at the first decode step with room
        for its sequences (one alone always fits)."""
        with self._lock:
            self._samples.append(sample)
            self._lock.notify()

    def cancel_sample(self, request_id: str) -> bool:
        """Take a sample that has not started out of the queue (its future is the
        caller's to answer); False if it is not waiting here."""
        with self._lock:
            for sample in self._samples:
                if sample.request_id == request_id:
                    self._samples.remove(sample)
                    break
            else:
                return False
        now = time.monotonic()
        args = {"cancelled": True}
        self._traces.record(Span("queue_wait", sample.track, request_id, sample.arrived, now, args))
        return True

    def queued_samples(self, session_id: str) -> list[Span]:
        """The queue waits, so far, of ``session_id``'s samples that have not started."""
        now = time.monotonic()
        with self._lock:
            waiting = [s for s in self._samples if session_of(s.track) == session_id]
        return [
            Span(
                "queue_wait",
                s.track,
                s.request_id,
                s.arrived,
                now,
                {"waiting": True, "sequences": s.sequences},
            )
            for s in waiting
        ]

    def queue_state(self) -> QueueState:
        with self._lock:
            heads = [item for queue in self._ready.values() for item in queue]
            return QueueState(
                requests=len(heads),
                tokens=sum(item.tokens for item in heads if isinstance(item, Packable)),
                samples_waiting=len(self._samples),
                # (set on the loop thread; an int read is atomic, a moment stale at worst)
                sequences_decoding=self._decoding,
            )

    def start_order(self, model_id: str, next_seq: int) -> None:
        with self._lock:
            self._ordering.start(model_id, next_seq)

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._ordering.forget(model_id)

    def _take_cycle(self) -> list[Queued]:
        """The next cycle, taking turns when both kinds wait: the leading requests of
        every model that run alone (an ``optim_step`` after its model's pass, a save, …),
        or the leading forward/backward requests within the token budget, one per user in
        turn (at least one, however large). The models served become
        :attr:`_expected`."""
        solos = {m: q for m, q in self._ready.items() if q and not isinstance(q[0], Packable)}
        packables = {m: q for m, q in self._ready.items() if q and isinstance(q[0], Packable)}
        if solos and (self._solo_turn or not packables):
            self._solo_turn = False
            self._expected = set(solos)
            return [queue.popleft() for queue in solos.values()]
        self._solo_turn = True
        queues: dict[str, list[tuple[str, collections.deque[Queued]]]] = {}
        for model_id, queue in packables.items():
            queues.setdefault(cast(Packable, queue[0]).user, []).append((model_id, queue))
        for user in queues:
            if user not in self._turns:
                self._turns.appendleft(user)  # not served yet: first in line
        cycle: list[Queued] = []
        tokens, users, served = 0, [], set()
        taking = True
        while taking:
            taking = False
            for user in [u for u in self._turns if u in queues]:
                for model_id, queue in queues[user]:
                    head = queue[0] if queue else None
                    if not isinstance(head, Packable):
                        continue
                    if cycle and tokens + head.tokens > self._cycle_tokens:
                        continue
                    cycle.append(queue.popleft())
                    tokens += head.tokens
                    served.add(model_id)
                    users.append(user)
                    taking = True
                    break
        for user in dict.fromkeys(users):  # served users go to the back of the line
            self._turns.remove(user)
            self._turns.append(user)
        if cycle:
            self._expected = served
        return cycle

    def _gathering(self) -> float:
        """Seconds to wait for the rest of a packed cycle before taking it, or 0.

        Models served in the last cycle usually send their next request at once (the
        SDK's ``forward_backward`` + ``optim_step`` loop), a few milliseconds after their
        results. Taking a cycle the moment its first request is ready would run the others
        alone, one after another, and they would never pack again; so while the next cycle
        is forward/backward work and some of those models have not come back, the loop
        waits for them briefly (``_GATHER_SECONDS`` at most, and a small share of the last
        pass's time). Whoever misses it joins the next cycle.
        """
        heads = [q[0] for q in self._ready.values() if q]
        if not any(isinstance(head, Packable) for head in heads):
            return 0.0
        if self._solo_turn and not all(isinstance(head, Packable) for head in heads):
            return 0.0
        if not self._expected - {m for m, q in self._ready.items() if q}:
            return 0.0
        now = time.monotonic()
        if self._gather_until is None:
            self._gather_until = now + min(_GATHER_SECONDS, _GATHER_SHARE * self._last_pass)
        return max(0.0, self._gather_until - now)

    def _loop(self) -> None:
        self._worker.claim_thread()
        while True:
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    cycle: list[Queued] = []
                    pause = self._gathering()
                    if not pause:
                        cycle = self._take_cycle()
                        self._gather_until = None
                    if cycle or self._samples or self._worker.sampling():
                        break  # (decode steps go on while a cycle gathers)
                    self._lock.wait(timeout=pause or None)
                for model_id in [m for m, q in self._ready.items() if not q]:
                    del self._ready[model_id]
            self._decode_step()
            if cycle:
                self._run(cycle)

    def _admit(self) -> list[QueuedSample]:
        """Queued samples, in order, while their sequences fit the sampler's batch (one
        alone always fits). Under the lock."""
        admitted: list[QueuedSample] = []
        room = self._max_batch - self._decoding
        while self._samples and (self._samples[0].sequences <= room or room == self._max_batch):
            sample = self._samples.popleft()
            room -= sample.sequences
            admitted.append(sample)
        return admitted

    def _decode_step(self) -> None:
        """Hand the samples that fit to the worker, then advance every running one by a
        token (admitting new ones with a prefill first)."""
        with self._lock:
            admitted = self._admit()
        started = time.monotonic()
        for sample in admitted:
            self._decoding += sample.sequences
            self._futures.running(sample.request_id)
            sample.start(functools.partial(self._sample_finished, sample, started))
        if self._worker.sampling():
            try:
                self._worker.sample_step()
            except Exception:
                log.exception("%s: sampling step failed", self.name)
            self._metrics.decode_step(self.name, time.monotonic() - started)
        ended = time.monotonic()
        # The step that admitted a sample prefilled its prompt and chose its first tokens.
        for sample in admitted:
            self._metrics.first_token(self.name, ended - sample.arrived)
        self._decode_due = ended + (ended - started) * self._training_per_decode

    def _pause(self) -> None:
        """Offered by a training cycle between passes and layers: a decode step, when
        there is sampling work and decoding's share of the engine's time is due. After
        :meth:`abort`, it ends the cycle instead."""
        if self._aborting:
            raise ShuttingDown("the server shut down while this request was running")
        if (self._samples or self._worker.sampling()) and time.monotonic() >= self._decode_due:
            self._decode_step()

    def _sample_finished(self, sample: QueuedSample, started: float) -> None:
        self._decoding -= sample.sequences
        track, request_id = sample.track, sample.request_id
        self._traces.record(Span("queue_wait", track, request_id, sample.arrived, started, {}))
        args = {"sequences": sample.sequences}
        self._traces.record(Span("sample", track, request_id, started, time.monotonic(), args))

    def _trace(self, request_id: str, name: str, start: float, end: float, **args: Any) -> None:
        """Record a request's queue wait (up to ``start``) and what it ran as."""
        arrived, model_id = self._arrivals.pop(request_id, (start, ""))
        self._traces.record(Span("queue_wait", model_id, request_id, arrived, start, {}))
        self._traces.record(Span(name, model_id, request_id, start, end, args))

    def abort(self) -> None:
        """Stop at the next layer of the running cycle and take nothing more (shutdown
        past its deadline); the futures left are the caller's to answer."""
        self._aborting = True
        self.stop()

    def _run(self, cycle: list[Queued]) -> None:
        """Run a cycle: the requests that run alone first (each is its model's leading
        request, ahead of any of its model's packed work), then the packed passes."""
        for item in cycle:
            started = time.monotonic()
            if isinstance(item, Solo):
                self._futures.running(item.request_id)
            if isinstance(item, Rejected):
                self._futures.resolve(item.request_id, item.failure)
                self._trace(item.request_id, "rejected", started, started)
            elif isinstance(item, Solo):
                try:
                    result = item.call()
                except Exception as exc:
                    self._fail([item.request_id], exc)
                    self._trace(item.request_id, "failed", started, time.monotonic())
                else:
                    self._futures.resolve(item.request_id, result)
                    # Named by what it answers: optim_step, save_weights, load_weights, …
                    name = result.get("type", "request") if isinstance(result, dict) else "request"
                    self._trace(item.request_id, name, started, time.monotonic())
        works: list[Any] = []
        packed: list[Packable] = []
        for item in cycle:
            if isinstance(item, Packable):
                try:
                    works.append(item.build())
                except Exception as exc:
                    self._fail([item.request_id], exc)
                    now = time.monotonic()
                    self._trace(item.request_id, "failed", now, now)
                else:
                    packed.append(item)
        if not works:
            return
        cycle_id = next(self._cycles)
        started = time.monotonic()
        for item in packed:
            self._futures.running(item.request_id)
        names = ["failed"] * len(packed)  # (each request's span in its trace)
        try:
            outcomes = self._worker.forward_backward(works, self._pause)
        except Exception as exc:
            self._fail([item.request_id for item in packed], exc)
        else:
            for index, (item, outcome) in enumerate(zip(packed, outcomes, strict=True)):
                if outcome.error is not None:  # a custom loss that failed: nothing kept
                    self._futures.resolve(item.request_id, Failure(outcome.error, "user"))
                    continue
                metrics = {
                    "loss:sum": outcome.loss,
                    **outcome.metrics,
                    "clock_cycle:unique": float(cycle_id),
                }
                result = ForwardBackwardResult(outcome.logprobs, metrics)
                self._futures.resolve(item.request_id, result)
                names[index] = "forward_backward"
                if item.done is not None:
                    item.done(result)
        ended = time.monotonic()
        self._last_pass = ended - started
        self._metrics.cycle(self.name, self._last_pass)
        for item, name in zip(packed, names, strict=True):
            self._trace(
                item.request_id,
                name,
                started,
                ended,
                cycle=cycle_id,
                packed_requests=len(packed),
                tokens=item.tokens,
            )

    def _fail(self, request_ids: list[str], exc: Exception) -> None:
        failure = failure_of(exc, f"treadle engine ({self.name})")
        for request_id in request_ids:
            self._futures.resolve(request_id, failure)
