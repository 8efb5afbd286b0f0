"""What must survive a restart: API keys, sessions, training runs and checkpoints, in
SQLite in the data dir.

Only metadata lives here (a row per key, session, training run and checkpoint, written
when they are created, finished or used); futures and tensors never touch the database.
Keys are stored as SHA-256 hashes only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treadle.errors import StorageFull

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    sdk_version TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    user_metadata TEXT NOT NULL DEFAULT '{}',
    project_id TEXT,
    display_name TEXT,
    finished_at REAL,
    finish_reason TEXT,
    user TEXT NOT NULL DEFAULT 'local'
);
CREATE TABLE IF NOT EXISTS training_runs (
    model_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    base_model TEXT NOT NULL,
    lora_rank INTEGER NOT NULL,
    train_attn INTEGER NOT NULL,
    train_mlp INTEGER NOT NULL,
    train_unembed INTEGER NOT NULL,
    seed INTEGER,
    user_metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    last_request_time REAL NOT NULL,
    user TEXT NOT NULL DEFAULT 'local'
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS usage (
    user TEXT NOT NULL,
    hour INTEGER NOT NULL,
    base_model TEXT NOT NULL,
    kind TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (user, hour, base_model, kind)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    public INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS served_models (
    name TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    served_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    timestamp REAL NOT NULL,
    user TEXT NOT NULL,
    event TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_log_by_user ON audit_log (user, timestamp);
CREATE TABLE IF NOT EXISTS training_steps (
    model_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    loss_sum REAL NOT NULL,
    loss_tokens REAL NOT NULL,
    datums INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (model_id, step)
);
"""
# Columns added after a table's first release: (table, column, definition). A data dir
# made before gets them with their defaults (everything it holds was the local user's).
_ADDED_COLUMNS = [
    ("sessions", "user", "TEXT NOT NULL DEFAULT 'local'"),
    ("training_runs", "user", "TEXT NOT NULL DEFAULT 'local'"),
    ("checkpoints", "public", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoints", "expires_at", "REAL"),
]


@dataclass(frozen=True)
class TrainingRunRow:
    model_id: str
    session_id: str
    base_model: str
    lora_rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    seed: int | None
    user_metadata: dict[str, Any]
    created_at: float
    last_request_time: float
    user: str


class Store:
    """A small synchronous SQLite store; every call is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, _full_disk():
            return self._db.execute(sql, args).fetchall()

    def add_session(
        self,
        session_id: str,
        sdk_version: str | None,
        tags: list[str],
        user_metadata: dict[str, Any],
        project_id: str | None,
        display_name: str | None,
        user: str,
    ) -> None:
        self._execute(
            "INSERT INTO sessions (session_id, created_at, sdk_version, tags, user_metadata,"
            " project_id, display_name, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                time.time(),
                sdk_version,
                json.dumps(tags),
                json.dumps(user_metadata),
                project_id,
                display_name,
                user,
            ),
        )

    def session_owner(self, session_id: str) -> str | None:
        rows = self._execute("SELECT user FROM sessions WHERE session_id = ?", (session_id,))
        return str(rows[0][0]) if rows else None

    def finish_session(self, session_id: str, reason: str) -> None:
        """Record the first finish reason."""
        self._execute(
            "UPDATE sessions SET finished_at = ?, finish_reason = ?"
            " WHERE session_id = ? AND finished_at IS NULL",
            (time.time(), reason, session_id),
        )

    def list_sessions(self, user: str, limit: int, offset: int) -> list[str]:
        rows = self._execute(
            "SELECT session_id FROM sessions WHERE user = ?"
            " ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (user, limit, offset),
        )
        return [row[0] for row in rows]

    def sessions_of(self, user: str) -> list[SessionRow]:
        """Every session of ``user``, newest first, with what its runs' checkpoints take."""
        rows = self._execute(
            "SELECT s.session_id, s.created_at, s.tags, s.user_metadata, s.project_id,"
            " s.display_name, s.finished_at, s.finish_reason, COUNT(c.tinker_path),"
            " COALESCE(SUM(c.size_bytes), 0) FROM sessions s"
            " LEFT JOIN training_runs r ON r.session_id = s.session_id"
            " LEFT JOIN checkpoints c ON c.model_id = r.model_id"
            " WHERE s.user = ? GROUP BY s.session_id ORDER BY s.created_at DESC, s.session_id DESC",
            (user,),
        )
        return [
            SessionRow(
                session_id=row[0],
                created_at=row[1],
                tags=json.loads(row[2]),
                user_metadata=json.loads(row[3]),
                project_id=row[4],
                display_name=row[5],
                finished_at=row[6],
                finish_reason=row[7],
                checkpoints_count=int(row[8]),
                checkpoint_bytes=int(row[9]),
            )
            for row in rows
        ]

    def set_session_project(self, session_id: str, project_id: str) -> None:
        self._execute(
            "UPDATE sessions SET project_id = ? WHERE session_id = ?", (project_id, session_id)
        )

    def add_training_run(self, row: TrainingRunRow) -> None:
        self._execute(
            "INSERT INTO training_runs (model_id, session_id, base_model, lora_rank, train_attn,"
            " train_mlp, train_unembed, seed, user_metadata, created_at, last_request_time,"
            " user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.model_id,
                row.session_id,
                row.base_model,
                row.lora_rank,
                row.train_attn,
                row.train_mlp,
                row.train_unembed,
                row.seed,
                json.dumps(row.user_metadata),
                row.created_at,
                row.last_request_time,
                row.user,
            ),
        )

    def touch_training_run(self, model_id: str) -> None:
        # Only a listing's "last request" time: on a full disk the request itself goes on.
        with contextlib.suppress(StorageFull):
            self._execute(
                "UPDATE training_runs SET last_request_time = ? WHERE model_id = ?",
                (time.time(), model_id),
            )

    def training_run(self, model_id: str) -> TrainingRunRow | None:
        rows = self._execute(
            f"SELECT {_RUN_COLUMNS} FROM training_runs WHERE model_id = ?", (model_id,)
        )
        return _run_row(rows[0]) if rows else None

    def training_runs(self, user: str) -> list[TrainingRunRow]:
        rows = self._execute(
            f"SELECT {_RUN_COLUMNS} FROM training_runs WHERE user = ? ORDER BY created_at",
            (user,),
        )
        return [_run_row(row) for row in rows]

    def add_usage(self, rows: list[UsageRow]) -> None:
        with self._lock, _full_disk():
            self._db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (user, hour, base_model,"
                " kind) DO UPDATE SET tokens = tokens + excluded.tokens",
                [(r.user, r.hour, r.base_model, r.kind, r.tokens) for r in rows],
            )

    def usage(self, user: str | None = None) -> list[UsageRow]:
        """Usage rows of ``user`` (None: of everyone), oldest hour first."""
        where, args = ("WHERE user = ?", (user,)) if user is not None else ("", ())
        rows = self._execute(
            f"SELECT user, hour, base_model, kind, tokens FROM usage {where}"
            " ORDER BY hour, user, base_model, kind",
            args,
        )
        return [UsageRow(*row) for row in rows]

    def add_key(self, key_hash: str, prefix: str, user: str) -> None:
        self._execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)", (key_hash, prefix, user, time.time())
        )

    def keys(self) -> list[KeyRow]:
        rows = self._execute(
            "SELECT prefix, user, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [KeyRow(*row) for row in rows]

    def user_of_key(self, key_hash: str) -> str | None:
        """The user of an active (unrevoked) key."""
        rows = self._execute(
            "SELECT user FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
        )
        return str(rows[0][0]) if rows else None

    def has_active_keys(self) -> bool:
        return bool(self._execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1"))

    def revoke_keys(self, key_hash: str, prefix: str) -> list[KeyRow]:
        """Revoke the active key with this hash or this listed prefix; returns what was
        revoked."""
        where = "revoked_at IS NULL AND (key_hash = ? OR prefix = ?)"
        with self._lock:
            rows = self._db.execute(
                f"SELECT prefix, user, created_at, revoked_at FROM api_keys WHERE {where}",
                (key_hash, prefix),
            ).fetchall()
            self._db.execute(
                f"UPDATE api_keys SET revoked_at = ? WHERE {where}", (time.time(), key_hash, prefix)
            )
        return [KeyRow(*row) for row in rows]

    def add_checkpoint(self, row: CheckpointRow) -> None:
        self._execute(
            "INSERT OR REPLACE INTO checkpoints (tinker_path, model_id, kind, name, created_at,"
            " size_bytes, public, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.tinker_path,
                row.model_id,
                row.kind,
                row.name,
                row.created_at,
                row.size_bytes,
                row.public,
                row.expires_at,
            ),
        )

    def checkpoint(self, tinker_path: str) -> CheckpointRow | None:
        rows = self._execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE tinker_path = ?", (tinker_path,)
        )
        return _checkpoint_row(rows[0]) if rows else None

    def checkpoints(self, model_id: str) -> list[CheckpointRow]:
        rows = self._execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE model_id = ? ORDER BY created_at",
            (model_id,),
        )
        return [_checkpoint_row(row) for row in rows]

    def checkpoints_of(self, user: str) -> list[CheckpointRow]:
        """Every checkpoint of ``user``'s training runs."""
        columns = ", ".join(f"c.{c.strip()}" for c in _CHECKPOINT_COLUMNS.split(","))
        rows = self._execute(
            f"SELECT {columns} FROM checkpoints c JOIN training_runs r ON c.model_id = r.model_id"
            " WHERE r.user = ? ORDER BY c.created_at",
            (user,),
        )
        return [_checkpoint_row(row) for row in rows]

    def checkpoint_storage(self, user: str) -> list[tuple[str | None, int, int]]:
        """``user``'s checkpoints grouped by the project of the session that created their
        training run: ``(project_id, count, bytes)``, by project id."""
        rows = self._execute(
            "SELECT s.project_id, COUNT(*), SUM(c.size_bytes) FROM checkpoints c"
            " JOIN training_runs r ON c.model_id = r.model_id"
            " LEFT JOIN sessions s ON r.session_id = s.session_id"
            " WHERE r.user = ? GROUP BY s.project_id ORDER BY s.project_id",
            (user,),
        )
        return [(row[0], int(row[1]), int(row[2])) for row in rows]

    def set_public(self, tinker_path: str, public: bool) -> None:
        self._execute(
            "UPDATE checkpoints SET public = ? WHERE tinker_path = ?", (public, tinker_path)
        )

    def set_expires_at(self, tinker_path: str, expires_at: float | None) -> None:
        """When the checkpoint expires (unix time; None: never)."""
        self._execute(
            "UPDATE checkpoints SET expires_at = ? WHERE tinker_path = ?",
            (expires_at, tinker_path),
        )

    def delete_checkpoint(self, tinker_path: str) -> bool:
        found = bool(
            self._execute("SELECT 1 FROM checkpoints WHERE tinker_path = ?", (tinker_path,))
        )
        self._execute("DELETE FROM checkpoints WHERE tinker_path = ?", (tinker_path,))
        return found

    def expired_checkpoints(self, now: float) -> list[CheckpointRow]:
        """Checkpoints whose expiry is ``now`` or before."""
        rows = self._execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints"
            " WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at",
            (now,),
        )
        return [_checkpoint_row(row) for row in rows]

    def add_audit(self, user: str, event: str, details: dict[str, Any]) -> None:
        self._execute(
            "INSERT INTO audit_log VALUES (?, ?, ?, ?)",
            (time.time(), user, event, json.dumps(details)),
        )

    def audit(self, user: str, start: float, end: float) -> list[AuditRow]:
        """``user``'s audit entries from ``start`` (inclusive) to ``end``, oldest first."""
        rows = self._execute(
            "SELECT timestamp, event, details FROM audit_log"
            " WHERE user = ? AND timestamp >= ? AND timestamp < ? ORDER BY timestamp, rowid",
            (user, start, end),
        )
        return [AuditRow(row[0], row[1], json.loads(row[2])) for row in rows]

    def add_training_step(self, row: TrainingStepRow) -> None:
        # Only the console's loss curve: on a full disk the optim_step itself goes on.
        with contextlib.suppress(StorageFull):
            self._execute(
                "INSERT OR REPLACE INTO training_steps VALUES (?, ?, ?, ?, ?, ?)",
                (row.model_id, row.step, row.loss_sum, row.loss_tokens, row.datums, time.time()),
            )

    def training_steps(self, model_id: str, limit: int) -> list[TrainingStepRow]:
        """The run's recorded steps in order: every one, or every k-th (from the first) so
        that at most ``limit`` come back and a long run's whole curve still fits."""
        last = self._execute(
            "SELECT COALESCE(MAX(step), 0) FROM training_steps WHERE model_id = ?", (model_id,)
        )[0][0]
        stride = max(1, -(-int(last) // limit))
        rows = self._execute(
            "SELECT model_id, step, loss_sum, loss_tokens, datums FROM training_steps"
            " WHERE model_id = ? AND (step - 1) % ? = 0 ORDER BY step LIMIT ?",
            (model_id, stride, limit),
        )
        return [TrainingStepRow(*row) for row in rows]

    def last_training_steps(self, user: str) -> dict[str, TrainingStepRow]:
        """The last recorded step of each of ``user``'s runs that has one, by run."""
        rows = self._execute(
            "SELECT t.model_id, t.step, t.loss_sum, t.loss_tokens, t.datums FROM training_steps t"
            " JOIN (SELECT s.model_id, MAX(s.step) AS last FROM training_steps s"
            " JOIN training_runs r ON r.model_id = s.model_id WHERE r.user = ?"
            " GROUP BY s.model_id) m ON m.model_id = t.model_id AND m.last = t.step",
            (user,),
        )
        return {row[0]: TrainingStepRow(*row) for row in rows}

    def add_served_model(self, name: str, folder: str) -> None:
        """Remember where the base model served as ``name`` was loaded from, so commands
        run beside the server (``treadle adapters import``) find it by that name."""
        self._execute(
            "INSERT OR REPLACE INTO served_models VALUES (?, ?, ?)", (name, folder, time.time())
        )

    def served_models(self) -> dict[str, str]:
        """Served name -> model folder, as the last server on this data dir loaded them."""
        rows = self._execute("SELECT name, folder FROM served_models ORDER BY name")
        return {str(row[0]): str(row[1]) for row in rows}


@contextlib.contextmanager
def _full_disk() -> Iterator[None]:
    """SQLite's "database or disk is full" (and I/O errors of a full or read-only disk) as
    :class:`StorageFull`, which the HTTP layer answers with a clear 507."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "full" in text or "disk I/O" in text or "readonly" in text:
            raise StorageFull(f"the server's data dir takes no more data ({text})") from exc
        raise


@dataclass(frozen=True)
class CheckpointRow:
    tinker_path: str
    model_id: str
    kind: str  # "weights" (save_state) or "sampler_weights"
    name: str
    created_at: float
    size_bytes: int
    public: bool = False  # published: any user may read, load and sample it
    expires_at: float | None = None  # unix time it is deleted at (None: never)


@dataclass(frozen=True)
class UsageRow:
    user: str
    hour: int  # unix time of the hour's start
    base_model: str
    kind: str  # prefill, sampled, trained or forward
    tokens: int


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    created_at: float
    tags: list[str]
    user_metadata: dict[str, Any]
    project_id: str | None
    display_name: str | None
    finished_at: float | None
    finish_reason: str | None
    checkpoints_count: int  # of the session's training runs
    checkpoint_bytes: int


@dataclass(frozen=True)
class AuditRow:
    timestamp: float
    event: str  # <resource>_<action>, e.g. checkpoint_publish
    details: dict[str, Any]


@dataclass(frozen=True)
class TrainingStepRow:
    """One optimizer step of a training run: what its ``forward_backward`` calls since the
    previous ``optim_step`` summed to (``forward`` calls compute no gradient and count not)."""

    model_id: str
    step: int  # 1 for the run's first optim_step
    loss_sum: float  # the calls' ``loss:sum``, added up
    loss_tokens: float  # their loss-weighted target tokens (see Training), the per-token divisor
    datums: int


@dataclass(frozen=True)
class KeyRow:
    prefix: str  # the key's first characters, enough to name it in `treadle keys`
    user: str
    created_at: float
    revoked_at: float | None


_RUN_COLUMNS = (
    "model_id, session_id, base_model, lora_rank, train_attn, train_mlp, train_unembed, seed,"
    " user_metadata, created_at, last_request_time, user"
)
_CHECKPOINT_COLUMNS = (
    "tinker_path, model_id, kind, name, created_at, size_bytes, public, expires_at"
)


def _checkpoint_row(row: sqlite3.Row | tuple[Any, ...]) -> CheckpointRow:
    path, model_id, kind, name, created_at, size_bytes, public, expires_at = row
    return CheckpointRow(
        path, model_id, kind, name, created_at, size_bytes, bool(public), expires_at
    )


def _run_row(row: sqlite3.Row | tuple[Any, ...]) -> TrainingRunRow:
    return TrainingRunRow(
        model_id=row[0],
        session_id=row[1],
        base_model=row[2],
        lora_rank=row[3],
        train_attn=bool(row[4]),
        train_mlp=bool(row[5]),
        train_unembed=bool(row[6]),
        seed=row[7],
        user_metadata=json.loads(row[8]),
        created_at=row[9],
        last_request_time=row[10],
        user=row[11],
    )
