"""What must survive a restart: API keys, sessions, training runs and checkpoints, in
SQLite in the data dir.

Only metadata lives here (a row per key, session, training run and checkpoint, written
when they are created, finished or used); futures and tensors never touch the database.
Keys are stored as SHA-256 hashes only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    finish_reason TEXT
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
    last_request_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL
);
"""


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


class Store:
    """A small synchronous SQLite store; every call is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add_session(
        self,
        session_id: str,
        sdk_version: str | None,
        tags: list[str],
        user_metadata: dict[str, Any],
        project_id: str | None,
        display_name: str | None,
    ) -> None:
        self._execute(
            "INSERT INTO sessions (session_id, created_at, sdk_version, tags, user_metadata,"
            " project_id, display_name) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                time.time(),
                sdk_version,
                json.dumps(tags),
                json.dumps(user_metadata),
                project_id,
                display_name,
            ),
        )

    def has_session(self, session_id: str) -> bool:
        return bool(self._execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)))

    def finish_session(self, session_id: str, reason: str) -> bool:
        """Record the first finish reason; False if the session is unknown."""
        if not self.has_session(session_id):
            return False
        self._execute(
            "UPDATE sessions SET finished_at = ?, finish_reason = ?"
            " WHERE session_id = ? AND finished_at IS NULL",
            (time.time(), reason, session_id),
        )
        return True

    def list_sessions(self, limit: int, offset: int) -> list[str]:
        rows = self._execute(
            "SELECT session_id FROM sessions ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [row[0] for row in rows]

    def add_training_run(self, row: TrainingRunRow) -> None:
        self._execute(
            "INSERT INTO training_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def touch_training_run(self, model_id: str) -> None:
        self._execute(
            "UPDATE training_runs SET last_request_time = ? WHERE model_id = ?",
            (time.time(), model_id),
        )

    def training_run(self, model_id: str) -> TrainingRunRow | None:
        rows = self._execute("SELECT * FROM training_runs WHERE model_id = ?", (model_id,))
        return _run_row(rows[0]) if rows else None

    def training_runs(self) -> list[TrainingRunRow]:
        rows = self._execute("SELECT * FROM training_runs ORDER BY created_at")
        return [_run_row(row) for row in rows]

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
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
            (row.tinker_path, row.model_id, row.kind, row.name, row.created_at, row.size_bytes),
        )

    def checkpoints(self, model_id: str | None = None) -> list[CheckpointRow]:
        if model_id is None:
            rows = self._execute("SELECT * FROM checkpoints ORDER BY created_at")
        else:
            rows = self._execute(
                "SELECT * FROM checkpoints WHERE model_id = ? ORDER BY created_at", (model_id,)
            )
        return [CheckpointRow(*row) for row in rows]

    def delete_checkpoint(self, tinker_path: str) -> bool:
        found = bool(
            self._execute("SELECT 1 FROM checkpoints WHERE tinker_path = ?", (tinker_path,))
        )
        self._execute("DELETE FROM checkpoints WHERE tinker_path = ?", (tinker_path,))
        return found


@dataclass(frozen=True)
class CheckpointRow:
    tinker_path: str
    model_id: str
    kind: str  # "weights" (save_state) or "sampler_weights"
    name: str
    created_at: float
    size_bytes: int


@dataclass(frozen=True)
class KeyRow:
    prefix: str  # the key's first characters, enough to name it in `treadle keys`
    user: str
    created_at: float
    revoked_at: float | None


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
    )
