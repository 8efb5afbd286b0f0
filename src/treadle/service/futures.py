"""The future table: every asynchronous Tinker call returns a request id at once, and its
result is fetched by long-polling ``retrieve_future``.

Futures live in memory only — the hot path (submit, resolve, poll) touches no database.
Results are resolved from engine-loop threads and awaited on the event loop; a finished
result is kept for ``retention`` seconds (a setting): the SDK may poll again after a
transport error.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Entry:
    user: str  # whose request it is; only they can poll it
    done: asyncio.Event = field(default_factory=asyncio.Event)
    value: Any = None
    finished_at: float | None = None
    fetched: bool = False  # a poll has taken the answer


class UnknownFuture(KeyError):
    pass


class FutureStore:
    """Request ids to results. Create and wait on the event loop; resolve from anywhere."""

    def __init__(self, loop: asyncio.AbstractEventLoop, retention: float) -> None:
        self._loop = loop
        self._retention = retention
        self._entries: dict[str, _Entry] = {}
        self._pruned_at = time.monotonic()

    def create(self, user: str) -> str:
        """A new request of ``user``'s; its id is 128 random bits."""
        now = time.monotonic()
        if now - self._pruned_at > 60:
            self._prune(now)
        request_id = f"req-{secrets.token_hex(16)}"
        self._entries[request_id] = _Entry(user)
        return request_id

    def resolve(self, request_id: str, value: Any) -> None:
        """Set the result (a :class:`~treadle.errors.Failure` for errors). Safe from any
        thread."""
        self._loop.call_soon_threadsafe(self._set, request_id, value)

    def _set(self, request_id: str, value: Any) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.done.is_set():
            return
        entry.value = value
        entry.finished_at = time.monotonic()
        entry.done.set()

    def pending(self) -> int:
        """Requests not answered yet."""
        return sum(not entry.done.is_set() for entry in list(self._entries.values()))

    def unfetched(self) -> int:
        """Answered requests whose answer no poll has taken yet."""
        return sum(
            entry.done.is_set() and not entry.fetched for entry in list(self._entries.values())
        )

    def fail_pending(self, failure: Any) -> None:
        """Answer every request still pending with ``failure``. Safe from any thread."""

        def fail_all() -> None:
            for request_id, entry in list(self._entries.items()):
                if not entry.done.is_set():
                    self._set(request_id, failure)

        self._loop.call_soon_threadsafe(fail_all)

    async def wait(self, request_id: str, user: str, timeout: float) -> tuple[bool, Any]:
        """``(True, result)`` once done, or ``(False, None)`` after ``timeout`` seconds.
        Another user's request is as unknown as one that never existed."""
        entry = self._entries.get(request_id)
        if entry is None or entry.user != user:
            raise UnknownFuture(request_id)
        try:
            await asyncio.wait_for(entry.done.wait(), timeout)
        except TimeoutError:
            return False, None
        entry.fetched = True
        return True, entry.value

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        horizon = now - self._retention
        stale = [
            request_id
            for request_id, entry in self._entries.items()
            if entry.finished_at is not None and entry.finished_at < horizon
        ]
        for request_id in stale:
            del self._entries[request_id]
