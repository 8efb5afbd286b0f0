"""Session traces for ``export_session_trace``: where each of a session's requests spent
its time (queue wait, packed forward/backward pass, optimizer step, save, sampling).

The engine loop records a span per phase of a request from timestamps it takes anyway,
once per request, never per layer. Each session keeps its newest spans (a bounded deque)
and only the most recently active sessions keep any. An export is the Chrome JSON
trace-event format, which Perfetto (ui.perfetto.dev) and chrome://tracing open; the SDK
downloads it from a link with an unguessable token, since it sends no API key there.
"""

from __future__ import annotations

import collections
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# How long an export link stays valid (Tinker's signed URLs last about an hour).
_LINK_SECONDS = 3600.0
# Live export links kept at most; the oldest go first.
_LINKS_KEPT = 4096


@dataclass(frozen=True, slots=True)  # (slots: a session keeps thousands)
class Span:
    """One phase of one request. ``start``/``end`` are ``time.monotonic()`` seconds;
    ``track`` is the lane it is drawn in (its training model or sampling session)."""

    name: str
    track: str
    request_id: str
    start: float
    end: float
    args: Mapping[str, Any]


def session_of(model_or_sampler_id: str) -> str:
    """The session a training model (``sess:train:N``) or sampling session
    (``sess:sample:N``) id belongs to."""
    for marker in (":train:", ":sample:"):
        if marker in model_or_sampler_id:
            return model_or_sampler_id.rsplit(marker, 1)[0]
    return model_or_sampler_id


class Traces:
    """Spans per session; recorded from engine threads, exported from the event loop."""

    def __init__(self, spans_per_session: int, sessions: int) -> None:
        self._lock = threading.Lock()
        self._spans_per_session = spans_per_session
        self._sessions_kept = sessions
        self._sessions: collections.OrderedDict[str, collections.deque[Span]] = (
            collections.OrderedDict()
        )
        self._links: dict[str, tuple[str, float]] = {}  # token -> (session, expiry)
        # Monotonic seconds + offset = unix seconds (a trace shows wall-clock times).
        self._offset = time.time() - time.monotonic()

    def record(self, span: Span) -> None:
        session_id = session_of(span.track)
        with self._lock:
            spans = self._sessions.get(session_id)
            if spans is None:
                spans = self._sessions[session_id] = collections.deque(
                    maxlen=self._spans_per_session
                )
                while len(self._sessions) > self._sessions_kept:
                    self._sessions.popitem(last=False)
            else:
                self._sessions.move_to_end(session_id)
            spans.append(span)

    def spans(self, session_id: str) -> list[Span]:
        with self._lock:
            return list(self._sessions.get(session_id, ()))

    def link(self, session_id: str) -> str:
        """A new download token for ``session_id``'s trace (the caller checked it is
        theirs)."""
        now = time.monotonic()
        token = secrets.token_urlsafe(24)
        with self._lock:
            for old in [t for t, (_, expiry) in self._links.items() if expiry < now]:
                del self._links[old]
            self._links[token] = (session_id, now + _LINK_SECONDS)
            while len(self._links) > _LINKS_KEPT:  # bounded however often one asks
                del self._links[next(iter(self._links))]
        return token

    def linked_session(self, token: str) -> str | None:
        """The session a live token was made for."""
        with self._lock:
            found = self._links.get(token)
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def export(self, session_id: str, waiting: list[Span]) -> bytes:
        """The session's spans, and the queue waits so far of its ``waiting`` requests,
        as a Chrome JSON trace: one lane (thread) per training model or sampling session,
        a complete event ("X") per span, in microseconds."""
        spans = sorted(self.spans(session_id) + waiting, key=lambda s: (s.start, s.end))
        lanes: dict[str, int] = {}
        events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": session_id}}
        ]
        for span in spans:
            if span.track not in lanes:
                lanes[span.track] = len(lanes) + 1
                events.append(
                    {
                        "ph": "M",
                        "name": "thread_name",
                        "pid": 1,
                        "tid": lanes[span.track],
                        "args": {"name": span.track},
                    }
                )
            # Both ends from absolute times: a span that ends where the next starts
            # shows so exactly.
            begin = _micros(span.start + self._offset)
            events.append(
                {
                    "ph": "X",
                    "name": span.name,
                    "cat": "queue" if span.name == "queue_wait" else "compute",
                    "pid": 1,
                    "tid": lanes[span.track],
                    "ts": begin,
                    "dur": _micros(span.end + self._offset) - begin,
                    "args": {"request_id": span.request_id, **span.args},
                }
            )
        trace = {"traceEvents": events, "displayTimeUnit": "ms"}
        return json.dumps(trace, separators=(",", ":")).encode()


def _micros(seconds: float) -> int:
    return round(seconds * 1e6)
