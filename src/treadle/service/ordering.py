"""Per-model ``seq_id`` ordering: a reorder buffer and retry de-duplication.

Each training model numbers its requests ``seq_id = 1, 2, 3…`` and the SDK sends the
chunks of one ``forward_backward`` out of order on purpose (first chunk last), so a
request waits here until every lower ``seq_id`` of its model has arrived. A retried
submit of a ``seq_id`` already seen gets the first submit's request id instead of running
twice; the last ``window`` seq_ids of each model are remembered for that. A request that
was rejected (bad input) still takes its turn, or every later request of its model would
wait for the gap: the buffer holds whatever items it is given and never looks inside.

Pure and thread-free: the engine loop calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from treadle.errors import UserInputError

T = TypeVar("T")


@dataclass
class _ModelOrder(Generic[T]):
    next_seq: int = 1
    early: dict[int, T] = field(default_factory=dict)  # arrived before their turn
    seen: dict[int, str] = field(default_factory=dict)  # seq_id -> request id


class Ordering(Generic[T]):
    """The reorder buffers of every model of one base model."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._orders: dict[Hashable, _ModelOrder[T]] = {}

    def start(self, model_id: Hashable, next_seq: int) -> None:
        """Set the first ``seq_id`` expected from a model (1 after ``create_model``)."""
        self._order(model_id).next_seq = next_seq

    def forget(self, model_id: Hashable) -> None:
        self._orders.pop(model_id, None)

    def submit(
        self,
        model_id: Hashable,
        seq_id: int | None,
        new_id: Callable[[], str],
        make: Callable[[str], T],
    ) -> tuple[str, list[T]]:
        """Accept a request: ``(request id, items now released in order)``. ``seq_id``
        None is released at once, outside the order; a ``seq_id`` seen before answers with
        its first request id and releases nothing. ``make`` builds the item from its new
        request id."""
        order = self._order(model_id)
        if seq_id is None:
            request_id = new_id()
            return request_id, [make(request_id)]
        existing = order.seen.get(seq_id)
        if existing is not None:
            return existing, []
        if seq_id < order.next_seq:
            raise UserInputError(
                f"seq_id {seq_id} of model {model_id} was already executed long ago;"
                " seq_ids must increase"
            )
        request_id = new_id()
        order.seen[seq_id] = request_id
        order.seen.pop(seq_id - self._window, None)
        order.early[seq_id] = make(request_id)
        released: list[T] = []
        while order.next_seq in order.early:
            released.append(order.early.pop(order.next_seq))
            order.next_seq += 1
        return request_id, released

    def _order(self, model_id: Hashable) -> _ModelOrder[T]:
        order = self._orders.get(model_id)
        if order is None:
            order = self._orders[model_id] = _ModelOrder()
        return order
