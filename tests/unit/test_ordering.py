"""The per-model reorder buffer and retry de-duplication, alone: no server, no threads,
no timing."""

from __future__ import annotations

import itertools

import pytest

from treadle.errors import UserInputError
from treadle.service.ordering import Ordering


class _Ids:
    def __init__(self) -> None:
        self._next = itertools.count(1)
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        return f"r{next(self._next)}"


def _submit(order: Ordering[str], ids: _Ids, model: str, seq: int | None, item: str):
    return order.submit(model, seq, ids, lambda request_id: f"{item}@{request_id}")


def test_out_of_order_requests_are_released_in_seq_id_order():
    order: Ordering[str] = Ordering(window=16)
    ids = _Ids()
    assert _submit(order, ids, "m", 3, "c") == ("r1", [])
    assert _submit(order, ids, "m", 2, "b") == ("r2", [])
    rid, released = _submit(order, ids, "m", 1, "a")
    assert rid == "r3"
    assert released == ["a@r3", "b@r2", "c@r1"]
    assert _submit(order, ids, "m", 4, "d") == ("r4", ["d@r4"])


def test_models_are_ordered_independently():
    order: Ordering[str] = Ordering(window=16)
    ids = _Ids()
    assert _submit(order, ids, "x", 2, "x2")[1] == []
    assert _submit(order, ids, "y", 1, "y1")[1] == ["y1@r2"]
    assert _submit(order, ids, "x", 1, "x1")[1] == ["x1@r3", "x2@r1"]


def test_a_retried_submit_gets_the_first_request_id_and_runs_once():
    order: Ordering[str] = Ordering(window=16)
    ids = _Ids()
    first, released = _submit(order, ids, "m", 1, "a")
    assert released == ["a@r1"]
    # Retried after it ran, and a retry of one still waiting for its turn.
    assert _submit(order, ids, "m", 1, "again") == (first, [])
    waiting, _ = _submit(order, ids, "m", 3, "c")
    assert _submit(order, ids, "m", 3, "c-retry") == (waiting, [])
    assert ids.made == 2
    assert _submit(order, ids, "m", 2, "b")[1] == ["b@r3", "c@r2"]


def test_a_rejected_request_takes_its_turn():
    """The buffer does not look inside items: a rejection queued for seq 2 is released in
    its turn, so seq 3 is not stuck behind a gap."""
    order: Ordering[object] = Ordering(window=16)
    ids = _Ids()
    rejected = ("rejected", "bad input")
    order.submit("m", 2, ids, lambda request_id: rejected)
    _, released = order.submit("m", 1, ids, lambda request_id: "ok")
    assert released == ["ok", rejected]
    assert order.submit("m", 3, ids, lambda request_id: "next")[1] == ["next"]


def test_unordered_requests_are_released_at_once_and_never_deduplicated():
    order: Ordering[str] = Ordering(window=16)
    ids = _Ids()
    assert _submit(order, ids, "m", None, "u") == ("r1", ["u@r1"])
    assert _submit(order, ids, "m", None, "u") == ("r2", ["u@r2"])
    assert _submit(order, ids, "m", 2, "b")[1] == []


def test_the_retry_window_is_bounded():
    """Beyond the window an old seq_id is forgotten: resubmitting it is an error, not a
    second run."""
    order: Ordering[str] = Ordering(window=4)
    ids = _Ids()
    for seq in range(1, 11):
        _submit(order, ids, "m", seq, "x")
    assert _submit(order, ids, "m", 8, "retry")[0] == "r8"
    with pytest.raises(UserInputError, match="already executed long ago"):
        _submit(order, ids, "m", 2, "late")
    assert ids.made == 10


def test_start_and_forget():
    order: Ordering[str] = Ordering(window=16)
    ids = _Ids()
    order.start("m", 5)
    assert _submit(order, ids, "m", 5, "e")[1] == ["e@r1"]
    order.forget("m")
    # A forgotten model starts again at seq_id 1.
    assert _submit(order, ids, "m", 1, "a")[1] == ["a@r2"]
