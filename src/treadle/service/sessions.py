"""Sessions: one per ``ServiceClient``. They belong to the user whose key made them,
group that user's training runs and sampling sessions, keep heartbeats, and record how
the client finished."""

from __future__ import annotations

import secrets
import time
from typing import Any

from treadle.errors import UserInputError
from treadle.service.auth import owned
from treadle.service.limits import check_metadata, check_names
from treadle.service.store import Store
from treadle.settings import Settings

_MAX_TAGS = 64


class SessionEnded(Exception):
    """A heartbeat for a session that finished or expired (the SDK stops on a 410)."""


class Sessions:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        # Heartbeats arrive every 10 s per client: kept in memory, not written to disk.
        self._heartbeats: dict[str, float] = {}
        self._owners: dict[str, str] = {}  # session id -> user, as the store has it

    def create(
        self,
        user: str,
        sdk_version: str | None,
        tags: list[str],
        user_metadata: dict[str, Any],
        project_id: str | None,
        display_name: str | None,
    ) -> str:
        settings = self._settings
        check_metadata(user_metadata, settings.max_metadata_bytes)
        check_names(
            settings.max_name_chars,
            _MAX_TAGS,
            tags,
            sdk_version=sdk_version,
            project_id=project_id,
            display_name=display_name,
        )
        # 128 random bits: ids that cross the wire are never guessable.
        session_id = f"sess-{secrets.token_hex(16)}"
        self._store.add_session(
            session_id, sdk_version, tags, user_metadata, project_id, display_name, user
        )
        self._owners[session_id] = user
        self._heartbeats[session_id] = time.monotonic()
        return session_id

    def check(self, session_id: str, user: str) -> None:
        """Not found unless ``user`` owns the session."""
        owner = self._owners.get(session_id)
        if owner is None:
            owner = self._store.session_owner(session_id)
            if owner is not None:
                self._owners[session_id] = owner
        owned(owner, user, f"unknown session {session_id!r}; call create_session first")

    def check_live(self, session_id: str, user: str) -> None:
        """Like :meth:`check`, and the session must not have ended."""
        self.check(session_id, user)
        if session_id not in self._heartbeats:
            raise UserInputError(
                f"session {session_id} has ended (it finished, went without heartbeats too"
                " long, or the server restarted); make a new ServiceClient"
            )

    def heartbeat(self, session_id: str, user: str) -> None:
        self.check(session_id, user)
        if session_id not in self._heartbeats:
            raise SessionEnded(f"session {session_id} has finished")
        self._heartbeats[session_id] = time.monotonic()

    def finish(self, session_id: str, reason: str) -> None:
        """Record how it ended; it takes no more heartbeats."""
        self._heartbeats.pop(session_id, None)
        self._store.finish_session(session_id, reason)

    def expired(self, timeout: float) -> list[str]:
        """Live sessions whose client sent nothing for ``timeout`` seconds."""
        horizon = time.monotonic() - timeout
        return [s for s, seen in self._heartbeats.items() if seen < horizon]

    def list(self, user: str, limit: int, offset: int) -> list[str]:
        return self._store.list_sessions(user, limit, offset)
