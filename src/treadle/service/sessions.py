"""Sessions: one per ``ServiceClient``. They group training runs and sampling sessions,
keep heartbeats, and record how the client finished."""

from __future__ import annotations

import time
import uuid
from typing import Any

from treadle.service.store import Store


class Sessions:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Heartbeats arrive every 10 s per client: kept in memory, not written to disk.
        self._heartbeats: dict[str, float] = {}

    def create(
        self,
        sdk_version: str | None,
        tags: list[str],
        user_metadata: dict[str, Any],
        project_id: str | None,
        display_name: str | None,
    ) -> str:
        session_id = f"sess-{uuid.uuid4().hex[:12]}"
        self._store.add_session(
            session_id, sdk_version, tags, user_metadata, project_id, display_name
        )
        self._heartbeats[session_id] = time.monotonic()
        return session_id

    def exists(self, session_id: str) -> bool:
        return session_id in self._heartbeats or self._store.has_session(session_id)

    def heartbeat(self, session_id: str) -> bool:
        if not self.exists(session_id):
            return False
        self._heartbeats[session_id] = time.monotonic()
        return True

    def finish(self, session_id: str, reason: str) -> bool:
        return self._store.finish_session(session_id, reason)

    def list(self, limit: int, offset: int) -> list[str]:
        return self._store.list_sessions(limit, offset)
