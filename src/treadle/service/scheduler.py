"""Ordering and packing of training work, one scheduler (and one engine thread) per base
model.

Each training model numbers its requests ``seq_id = 1, 2, 3…`` and the SDK sends the
chunks of one ``forward_backward`` out of order on purpose (first chunk last), so every
model has a reorder buffer: a request waits until all lower ``seq_id`` s have arrived, and
a retried submit of a ``seq_id`` already seen returns the first submit's request id
instead of running twice.

Released requests queue per model. The engine thread repeatedly takes a *cycle*: the
leading run of forward/backward requests of every model with work ready, packed into
shared passes (Tinker's clock cycle), or else one other request (``optim_step``, …).
A model's requests therefore still execute strictly in ``seq_id`` order.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treadle.engine.datum import UserInputError
from treadle.engine.sample import Sampler, SampleRequest, SampleResult
from treadle.engine.train import ForwardBackwardOutcome, ForwardBackwardWork
from treadle.service.errors import NotFound
from treadle.service.futures import Failure, FutureStore

log = logging.getLogger(__name__)

# How many seq_ids per model are remembered for de-duplicating retried submits.
_DEDUP_WINDOW = 4096


@dataclass
class Op:
    """One queued request: packable forward/backward ``work`` (built when its cycle runs,
    since the model may still be being created when it is queued), a ``call`` to run
    alone, or an input ``failure`` to report in its turn."""

    request_id: str
    work: Callable[[], ForwardBackwardWork] | None = None
    call: Callable[[], Any] | None = None
    failure: Failure | None = None


@dataclass
class _Order:
    next_seq: int = 1
    early: dict[int, Op] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)


PackedRunner = Callable[[list[ForwardBackwardWork], int], list[ForwardBackwardOutcome]]
ResultOf = Callable[[ForwardBackwardOutcome, int], Any]
SampleDone = Callable[[SampleResult | BaseException], None]


class Scheduler:
    """Per-base-model request ordering plus the engine thread that executes requests."""

    def __init__(
        self,
        name: str,
        futures: FutureStore,
        run_packed: PackedRunner,
        result_of: ResultOf,
        sampler: Sampler,
        prepare_thread: Callable[[], None],
    ) -> None:
        self.name = name
        self._prepare_thread = prepare_thread
        self._sampler = sampler
        self._incoming: list[tuple[SampleRequest, SampleDone]] = []
        self._futures = futures
        self._run_packed = run_packed
        self._result_of = result_of
        self._lock = threading.Condition()
        self._orders: dict[str, _Order] = collections.defaultdict(_Order)
        self._ready: dict[str, collections.deque[Op]] = collections.defaultdict(collections.deque)
        self._cycles = itertools.count(1)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"engine:{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=60)

    def submit(
        self, model_id: str, seq_id: int | None, kind: str, make_op: Callable[[str], Op]
    ) -> str:
        """Queue a request of ``model_id`` in its ``seq_id`` turn (``None``: no ordering,
        run when the engine is free). Returns the request id; a duplicate ``seq_id``
        returns the original's."""
        with self._lock:
            order = self._orders[model_id]
            if seq_id is not None:
                existing = order.seen.get(seq_id)
                if existing is not None:
                    return existing
                if seq_id < order.next_seq:
                    raise UserInputError(
                        f"seq_id {seq_id} of model {model_id} was already executed long ago;"
                        " seq_ids must increase"
                    )
            request_id = self._futures.create(kind)
            op = make_op(request_id)
            if seq_id is None:
                self._ready[model_id].append(op)
            else:
                order.seen[seq_id] = request_id
                order.seen.pop(seq_id - _DEDUP_WINDOW, None)
                order.early[seq_id] = op
                while order.next_seq in order.early:
                    self._ready[model_id].append(order.early.pop(order.next_seq))
                    order.next_seq += 1
            self._lock.notify()
            return request_id

    def sample(self, request: SampleRequest, done: SampleDone) -> None:
        """Hand a sampling request to the engine thread; ``done`` gets its result there."""
        with self._lock:
            self._incoming.append((request, done))
            self._lock.notify()

    def call(self, model_id: str, fn: Callable[[], Any], kind: str) -> str:
        """Run ``fn`` on the engine thread outside any model's ordering."""
        return self.submit(model_id, None, kind, lambda request_id: Op(request_id, call=fn))

    def start_order(self, model_id: str, next_seq: int) -> None:
        """Set the first ``seq_id`` expected from a model (1 after ``create_model``)."""
        with self._lock:
            self._orders[model_id].next_seq = next_seq

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._orders.pop(model_id, None)

    def waiting(self, model_id: str) -> list[int]:
        """seq_ids that arrived early and wait for a gap to fill (for diagnostics)."""
        with self._lock:
            return sorted(self._orders[model_id].early)

    def _take_cycle(self) -> list[Op]:
        packable: list[Op] = []
        for queue in self._ready.values():
            while queue and queue[0].work is not None:
                packable.append(queue.popleft())
        if packable:
            return packable
        for queue in self._ready.values():
            if queue:
                return [queue.popleft()]
        return []

    def _loop(self) -> None:
        """Alternate one decode step of every running sample with one training cycle, so
        neither starves the other."""
        self._prepare_thread()
        while True:
            with self._lock:
                cycle = self._take_cycle()
                while not (cycle or self._incoming or self._sampler.has_work() or self._stopped):
                    self._lock.wait()
                    cycle = self._take_cycle()
                if self._stopped:
                    return
                incoming, self._incoming = self._incoming, []
                for model_id in [m for m, q in self._ready.items() if not q]:
                    del self._ready[model_id]
            for request, done in incoming:
                self._sampler.add(request, done)
            if self._sampler.has_work():
                try:
                    self._sampler.step()
                except Exception:
                    log.exception("engine %s: sampling step failed", self.name)
            if cycle:
                self._run(cycle)

    def _run(self, cycle: list[Op]) -> None:
        failed = [op for op in cycle if op.failure is not None]
        for op in failed:
            self._futures.resolve(op.request_id, op.failure)
        calls = [op for op in cycle if op.call is not None and op.failure is None]
        works: list[ForwardBackwardWork] = []
        packed: list[Op] = []
        for op in cycle:
            if op.work is None or op.failure is not None:
                continue
            try:
                works.append(op.work())
            except Exception as exc:
                self._fail([op], exc)
            else:
                packed.append(op)
        if works:
            cycle_id = next(self._cycles)
            try:
                outcomes = self._run_packed(works, cycle_id)
            except Exception as exc:
                self._fail(packed, exc)
            else:
                for op, outcome in zip(packed, outcomes, strict=True):
                    self._futures.resolve(op.request_id, self._result_of(outcome, cycle_id))
        for op in calls:
            assert op.call is not None
            try:
                result = op.call()
            except Exception as exc:
                self._fail([op], exc)
            else:
                self._futures.resolve(op.request_id, result)

    def _fail(self, ops: list[Op], exc: Exception) -> None:
        if isinstance(exc, UserInputError | NotFound):
            failure = Failure(str(exc.args[0]) if exc.args else str(exc), "user")
        else:
            log.exception("engine %s failed a request", self.name)
            failure = Failure(f"treadle engine error: {type(exc).__name__}: {exc}", "server")
        for op in ops:
            self._futures.resolve(op.request_id, failure)
