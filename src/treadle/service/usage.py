"""Tokens each user spent, by base model and kind, in hourly buckets.

Kinds: ``prefill`` (prompt tokens a sample read), ``sampled`` (tokens it generated),
``trained`` (forward_backward tokens) and ``forward`` (forward-only tokens). Counting is
in memory (the hot path touches no database); the engine loops' callers add, and
:meth:`Usage.flush` writes the counts to SQLite every few seconds and at shutdown, so
``treadle usage`` reads them from the data dir.
"""

from __future__ import annotations

import collections
import threading
import time

from treadle.errors import StorageFull
from treadle.service.store import Store, UsageRow

KINDS = ("prefill", "sampled", "trained", "forward")


class Usage:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        # (user, hour start, base model, kind) -> tokens not yet written
        self._pending: collections.Counter[tuple[str, int, str, str]] = collections.Counter()

    def add(self, user: str, base_model: str, kind: str, tokens: int) -> None:
        """Count ``tokens`` of ``kind``; safe from any thread."""
        if tokens <= 0:
            return
        hour = int(time.time()) // 3600 * 3600
        with self._lock:
            self._pending[(user, hour, base_model, kind)] += tokens

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, collections.Counter()
        if not pending:
            return
        try:
            self._store.add_usage([UsageRow(*key, tokens) for key, tokens in pending.items()])
        except StorageFull:
            with self._lock:  # kept for the next flush, once the disk has room
                self._pending.update(pending)
            raise

    def of(self, user: str) -> list[UsageRow]:
        """``user``'s usage, hour by hour, including what is not written yet."""
        self.flush()
        return self._store.usage(user)
