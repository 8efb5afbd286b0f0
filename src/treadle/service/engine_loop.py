"""The engine loop: one thread per base model that runs everything computed on it.

It alternates one decode step of every running sample with one training *cycle*: the
leading forward/backward requests of the models with work ready, packed into shared
passes (Tinker's clock cycle), or else one request that runs alone (``optim_step``,
saves, loads, …). Requests arrive through the model's :class:`~treadle.service.ordering.
Ordering`, so a model's requests still execute strictly in ``seq_id`` order.

Sharing is fair: a cycle has a token budget, filled one request per user in turn (users
not served yet first, then whoever was served longest ago), so a user with a huge queue
delays another's small request by about one cycle at most. Decoding goes on inside a
cycle too: one decode step runs between its passes. Nothing computes on the event loop.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from treadle.errors import Failure, failure_of
from treadle.service.futures import FutureStore
from treadle.service.ordering import Ordering
from treadle.service.served import Worker
from treadle.types import ForwardBackwardResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packable:
    """A forward(/backward) of ``user``'s that shares the cycle's packed passes. ``build``
    makes its engine work when the cycle runs: the model may still be being created when
    it is queued. ``tokens`` counts against the cycle's budget."""

    request_id: str
    build: Callable[[], Any]
    user: str = ""
    tokens: int = 0


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


class EngineLoop:
    """Ordering of a base model's requests plus the thread that executes them."""

    def __init__(
        self, worker: Worker, futures: FutureStore, retry_window: int, cycle_tokens: int
    ) -> None:
        self.name = worker.info.name
        self._worker = worker
        self._futures = futures
        self._lock = threading.Condition()
        self._ordering: Ordering[Queued] = Ordering(retry_window)
        self._ready: dict[str, collections.deque[Queued]] = collections.defaultdict(
            collections.deque
        )
        self._incoming: list[Callable[[], None]] = []  # samples to hand to the worker
        self._cycles = itertools.count(1)
        self._cycle_tokens = cycle_tokens
        self._turns: collections.deque[str] = collections.deque()  # users, next served first
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"loop:{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=60)

    def submit(
        self, user: str, model_id: str, seq_id: int | None, make: Callable[[str], Queued]
    ) -> str:
        """Queue ``user``'s request of ``model_id`` in its ``seq_id`` turn (``None``: no
        ordering, run when the loop is free). Returns the request id; a repeated
        ``seq_id`` returns the first submit's."""

        def checked(request_id: str) -> Queued:
            # A request whose checks break must still take its turn, or every later
            # request of its model would wait for the gap.
            try:
                return make(request_id)
            except Exception as exc:
                return Rejected(request_id, failure_of(exc, "treadle service"))

        with self._lock:
            request_id, released = self._ordering.submit(
                model_id, seq_id, lambda: self._futures.create(user), checked
            )
            if released:
                self._ready[model_id].extend(released)
                self._lock.notify()
            return request_id

    def call(self, user: str, model_id: str, fn: Callable[[], Any]) -> str:
        """Run ``fn`` on the loop thread outside any model's ordering."""
        return self.submit(user, model_id, None, lambda request_id: Solo(request_id, fn))

    def sample(self, start: Callable[[], None]) -> None:
        """Run ``start`` (which hands a sampling request to the worker) on the loop thread
        before its next decode step."""
        with self._lock:
            self._incoming.append(start)
            self._lock.notify()

    def start_order(self, model_id: str, next_seq: int) -> None:
        with self._lock:
            self._ordering.start(model_id, next_seq)

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._ordering.forget(model_id)

    def _take_cycle(self) -> list[Queued]:
        """The next cycle: leading forward/backward requests within the token budget, one
        per user in turn (at least one, however large); else one request to run alone."""
        queues: dict[str, list[collections.deque[Queued]]] = {}
        for queue in self._ready.values():
            if queue and isinstance(queue[0], Packable):
                queues.setdefault(queue[0].user, []).append(queue)
        for user in queues:
            if user not in self._turns:
                self._turns.appendleft(user)  # not served yet: first in line
        cycle: list[Queued] = []
        tokens, served = 0, []
        taking = True
        while taking:
            taking = False
            for user in [u for u in self._turns if u in queues]:
                for queue in queues[user]:
                    head = queue[0] if queue else None
                    if not isinstance(head, Packable):
                        continue
                    if cycle and tokens + head.tokens > self._cycle_tokens:
                        continue
                    cycle.append(queue.popleft())
                    tokens += head.tokens
                    served.append(user)
                    taking = True
                    break
        if cycle:
            for user in dict.fromkeys(served):  # served users go to the back of the line
                self._turns.remove(user)
                self._turns.append(user)
            return cycle
        for queue in self._ready.values():
            if queue:
                return [queue.popleft()]
        return []

    def _loop(self) -> None:
        self._worker.claim_thread()
        while True:
            with self._lock:
                cycle = self._take_cycle()
                while not (cycle or self._incoming or self._worker.sampling() or self._stopped):
                    self._lock.wait()
                    cycle = self._take_cycle()
                if self._stopped:
                    return
                incoming, self._incoming = self._incoming, []
                for model_id in [m for m, q in self._ready.items() if not q]:
                    del self._ready[model_id]
            self._decode_step(incoming)
            if cycle:
                self._run(cycle)

    def _decode_step(self, incoming: list[Callable[[], None]] | None = None) -> None:
        """Hand new samples to the worker, then advance every running one by a token."""
        if incoming is None:
            with self._lock:
                incoming, self._incoming = self._incoming, []
        for start in incoming:
            start()
        if self._worker.sampling():
            try:
                self._worker.sample_step()
            except Exception:
                log.exception("%s: sampling step failed", self.name)

    def _run(self, cycle: list[Queued]) -> None:
        works: list[Any] = []
        packed: list[Packable] = []
        for item in cycle:
            if isinstance(item, Rejected):
                self._futures.resolve(item.request_id, item.failure)
            elif isinstance(item, Packable):
                try:
                    works.append(item.build())
                except Exception as exc:
                    self._fail([item.request_id], exc)
                else:
                    packed.append(item)
        if works:
            cycle_id = next(self._cycles)
            try:
                outcomes = self._worker.forward_backward(works, self._decode_step)
            except Exception as exc:
                self._fail([item.request_id for item in packed], exc)
            else:
                for item, outcome in zip(packed, outcomes, strict=True):
                    metrics = {"loss:sum": outcome.loss, "clock_cycle:unique": float(cycle_id)}
                    result = ForwardBackwardResult(outcome.logprobs, metrics)
                    self._futures.resolve(item.request_id, result)
        for item in cycle:
            if isinstance(item, Solo):
                try:
                    result = item.call()
                except Exception as exc:
                    self._fail([item.request_id], exc)
                else:
                    self._futures.resolve(item.request_id, result)

    def _fail(self, request_ids: list[str], exc: Exception) -> None:
        failure = failure_of(exc, f"treadle engine ({self.name})")
        for request_id in request_ids:
            self._futures.resolve(request_id, failure)
