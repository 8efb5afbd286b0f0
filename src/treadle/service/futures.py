"""The future table: every asynchronous Tinker call returns a request id at once, and its
result is fetched by long-polling ``retrieve_future``.

Futures live in memory only — the hot path (submit, resolve, poll) touches no database.
Results are resolved from engine-loop threads and awaited on the event loop; a finished
result is kept for ``retention`` seconds (a setting): the SDK may poll again after a
transport error.

A sample's future also belongs to a *channel*, its sampling session and clone: with
``retrieve_futures`` the SDK long-polls a channel for its completions instead of polling
each request. Completions carry a cursor (one counter for all channels, so a channel
dropped when empty and made again never reuses one); a poll acknowledges everything up
to the cursor it sends, and acknowledged completions are dropped.

Every request ends here, when its answer is set: that is where its metrics and its line
in the request log are written (:mod:`treadle.service.metrics`), from what its creator
said it is (:class:`About`) and when the engine loop started it (:meth:`FutureStore.
running`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from treadle.errors import Failure
from treadle.service.metrics import Finished, Metrics

# A sampling session and the clone of its SamplingClient (``seq_id // 10**9``).
Channel = tuple[str, int]
# Unacknowledged completions kept per channel (a client that never polls the channel
# loses the oldest; the SDK acknowledges each poll's completions with the next poll).
_CHANNEL_EVENTS = 16384


@dataclass
class _Completions:
    events: collections.OrderedDict[int, tuple[str, bool]] = field(
        default_factory=collections.OrderedDict
    )  # cursor -> (request id, failed)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # replaced once set
    polls: int = 0  # long-polls waiting on it


@dataclass(frozen=True)
class About:
    """What a request is, for the metrics and the request log (see
    :class:`~treadle.service.metrics.Finished`): ``base_model`` only ever a served
    model's name."""

    kind: str
    base_model: str = ""
    model_id: str = ""
    tokens: int = 0


_ANY_REQUEST = About("request")  # (a request created without saying what it is)


@dataclass
class _Entry:
    user: str  # whose request it is; only they can poll it
    done: asyncio.Event = field(default_factory=asyncio.Event)
    value: Any = None
    finished_at: float | None = None
    fetched: bool = False  # a poll has taken the answer
    channel: Channel | None = None  # set for samples: see retrieve_futures
    about: About = _ANY_REQUEST  # for the metrics and the request log
    created_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it started running (see FutureStore.running)


class UnknownFuture(KeyError):
    pass


class FutureStore:
    """Request ids to results. Create and wait on the event loop; resolve from anywhere."""

    def __init__(self, loop: asyncio.AbstractEventLoop, retention: float, metrics: Metrics) -> None:
        self._loop = loop
        self._metrics = metrics
        self._retention = retention
        self._entries: dict[str, _Entry] = {}
        self._pruned_at = time.monotonic()
        self._channels: dict[Channel, _Completions] = {}
        self._cursors = itertools.count(1)

    def create(self, user: str, channel: Channel | None = None, about: About = _ANY_REQUEST) -> str:
        """A new request of ``user``'s (of a sample: of ``channel``); its id is 128 random
        bits."""
        now = time.monotonic()
        if now - self._pruned_at > 60:
            self._prune(now)
        request_id = f"req-{secrets.token_hex(16)}"
        self._entries[request_id] = _Entry(user, channel=channel, about=about, created_at=now)
        return request_id

    def running(self, request_id: str) -> None:
        """The request starts running now: its queue wait ends. Safe from any thread (the
        answer, which reads it, is set later through the event loop)."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.started_at = time.monotonic()

    def resolve(self, request_id: str, value: Any, sampled_tokens: int = 0) -> None:
        """Set the result (a :class:`~treadle.errors.Failure` for errors); a sample's
        ``sampled_tokens`` are counted. Safe from any thread."""
        self._loop.call_soon_threadsafe(self._set, request_id, value, sampled_tokens)

    def _set(self, request_id: str, value: Any, sampled_tokens: int = 0) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.done.is_set():
            return
        entry.value = value
        entry.finished_at = time.monotonic()
        entry.done.set()
        self._finished(request_id, entry, sampled_tokens)
        if entry.channel is not None:
            completions = self._channels.setdefault(entry.channel, _Completions())
            completions.events[next(self._cursors)] = (request_id, isinstance(value, Failure))
            while len(completions.events) > _CHANNEL_EVENTS:
                completions.events.popitem(last=False)
            completions.arrived.set()
            completions.arrived = asyncio.Event()

    def _finished(self, request_id: str, entry: _Entry, sampled_tokens: int) -> None:
        """The one place every request ends: its metrics and its log line. A request that
        never started (refused, cancelled) waited until its answer and ran for 0 s."""
        about = entry.about
        assert entry.finished_at is not None
        started = entry.finished_at if entry.started_at is None else entry.started_at
        value = entry.value
        self._metrics.finished(
            Finished(
                request_id=request_id,
                user=entry.user,
                base_model=about.base_model,
                model_id=about.model_id,
                kind=about.kind,
                tokens=about.tokens,
                sampled_tokens=sampled_tokens,
                queue_seconds=max(0.0, started - entry.created_at),
                run_seconds=max(0.0, entry.finished_at - started),
                outcome=f"{value.category}_error" if isinstance(value, Failure) else "ok",
            )
        )

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

    def state(self, request_id: str, user: str) -> bool:
        """Whether ``user``'s request is done; another user's is unknown."""
        entry = self._entries.get(request_id)
        if entry is None or entry.user != user:
            raise UnknownFuture(request_id)
        return entry.done.is_set()

    async def completions(
        self,
        channel: Channel,
        user: str,
        prev_cursor: int,
        timeout: float,
        retrieved: list[str],
    ) -> tuple[list[tuple[str, bool]], int]:
        """``retrieve_futures``: ``channel``'s completions after ``prev_cursor`` as
        ``(request id, failed)``, and the cursor to send next; waits up to ``timeout``
        seconds for one when there is none. Completions up to ``prev_cursor`` are
        acknowledged, and ``retrieved`` results (of this user and channel) fetched: both
        are dropped."""
        for request_id in retrieved:
            entry = self._entries.get(request_id)
            if entry and entry.user == user and entry.channel == channel and entry.done.is_set():
                del self._entries[request_id]
        completions = self._channels.setdefault(channel, _Completions())
        while completions.events and next(iter(completions.events)) <= prev_cursor:
            completions.events.popitem(last=False)
        if not completions.events and timeout > 0:
            completions.polls += 1
            try:
                await asyncio.wait_for(completions.arrived.wait(), timeout)
            except TimeoutError:
                pass
            finally:
                completions.polls -= 1
        events = [(c, e) for c, e in completions.events.items() if c > prev_cursor]
        cursor = events[-1][0] if events else prev_cursor
        return [event for _, event in events], cursor

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
        # Completions nobody polls for go with their results; empty channels go too.
        for channel, completions in list(self._channels.items()):
            for cursor, (request_id, _) in list(completions.events.items()):
                if request_id not in self._entries:
                    del completions.events[cursor]
            if not completions.events and not completions.polls:
                del self._channels[channel]
