"""Sessions: one per ``ServiceClient``. They belong to the user whose key made them,
group that user's training runs and sampling sessions, keep heartbeats, and record how
the client finished."""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treadle.errors import UserInputError
from treadle.service.auth import owned
from treadle.service.limits import check_metadata, check_names
from treadle.service.store import SessionRow, Store
from treadle.settings import Settings

_MAX_TAGS = 64
# How a client may finish a session (ServiceClient.close); other reasons (a session
# that went silent and expired) are no status search_sessions knows.
CLIENT_FINISH_REASONS = ("success", "errored", "interrupted")
_STATUS_TYPES = ("active", "cancelled", "failed", "client_finished")
MAX_SEARCH_LIMIT = 200


@dataclass(frozen=True)
class SessionSearch:
    """``search_sessions``' filters; a session matches all that are set."""

    session_id: str | None = None  # with display_name: either one matches
    display_name: str | None = None  # case-insensitive; every word must appear
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] | None = None  # exact matches of every pair
    owners: list[str] | None = None  # user names; None: the caller's own
    statuses: list[tuple[str, list[str] | None]] | None = None  # (type, finish reasons)
    limit: int = 50
    after: tuple[datetime.datetime, str] | None = None  # the previous page's last session


@dataclass(frozen=True)
class FoundSession:
    row: SessionRow
    created_at: datetime.datetime
    status: str | None  # "active", "client_finished" (see row.finish_reason) or None


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

    def live(self) -> int:
        """Sessions not ended (for the metrics)."""
        return len(self._heartbeats)

    def expired(self, timeout: float) -> list[str]:
        """Live sessions whose client sent nothing for ``timeout`` seconds."""
        horizon = time.monotonic() - timeout
        return [s for s, seen in self._heartbeats.items() if seen < horizon]

    def list(self, user: str, limit: int, offset: int) -> list[str]:
        return self._store.list_sessions(user, limit, offset)

    def assign_project(self, user: str, session_id: str, project_id: str) -> None:
        """``assign_session_project``: move one of ``user``'s sessions into a project."""
        self.check(session_id, user)
        if not project_id:
            raise UserInputError("project_id must be a non-empty string")
        check_names(self._settings.max_name_chars, _MAX_TAGS, [], project_id=project_id)
        self._store.set_session_project(session_id, project_id)

    def search(self, user: str, search: SessionSearch) -> tuple[Sequence[FoundSession], bool]:
        """``user``'s sessions matching ``search``, newest first, one page; and whether
        more follow. Other users' sessions do not exist for ``user``, whoever the search
        names as owners."""
        if not 1 <= search.limit <= MAX_SEARCH_LIMIT:
            raise UserInputError(f"limit must be between 1 and {MAX_SEARCH_LIMIT}")
        for kind, _ in search.statuses or ():
            if kind not in _STATUS_TYPES:
                raise UserInputError(
                    f"status type {kind!r} must be one of {', '.join(_STATUS_TYPES)}"
                )
        if search.owners is not None and user not in search.owners:
            return [], False
        found = []
        for row in self._store.sessions_of(user):
            session = FoundSession(
                row,
                datetime.datetime.fromtimestamp(row.created_at, datetime.UTC),
                self._status(row),
            )
            if _matches(session, search):
                found.append(session)
        # The cursor carries microseconds: order and page by what it can say.
        found.sort(key=lambda f: (f.created_at, f.row.session_id), reverse=True)
        if search.after is not None:
            found = [f for f in found if (f.created_at, f.row.session_id) < search.after]
        return found[: search.limit], len(found) > search.limit

    def _status(self, row: SessionRow) -> str | None:
        if row.session_id in self._heartbeats:
            return "active"
        if row.finish_reason in CLIENT_FINISH_REASONS:
            return "client_finished"
        return None


def _matches(session: FoundSession, search: SessionSearch) -> bool:
    row = session.row
    if search.session_id is not None or search.display_name is not None:
        name = (row.display_name or "").casefold()
        words = (search.display_name or "").casefold().split()
        if not (
            row.session_id == search.session_id
            or (search.display_name is not None and all(w in name for w in words))
        ):
            return False
    if search.project_ids is not None and row.project_id not in search.project_ids:
        return False
    for key, value in (search.user_metadata or {}).items():
        if key not in row.user_metadata or str(row.user_metadata[key]) != value:
            return False
    if search.statuses is not None:
        return any(
            kind == session.status
            and (kind != "client_finished" or not reasons or row.finish_reason in reasons)
            for kind, reasons in search.statuses
        )
    return True
