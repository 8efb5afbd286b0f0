"""``tinker://`` checkpoint paths and where they live on disk.

``tinker://{model_id}/weights/{name}`` is a ``save_state`` checkpoint (adapter + AdamW
state), ``tinker://{model_id}/sampler_weights/{name}`` a ``save_weights_for_sampler`` one
(adapter only), ``tinker://{model_id}/external_weights/{name}`` a ``save_weights_external``
export (adapter only, possibly age-encrypted). All live under
``{data_dir}/checkpoints/{model_id}/{kind}/``.

:class:`Checkpoints` is what their owner does with them after saving: delete, publish,
give an expiry (a TTL), copy; and what treadle does when an expiry comes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from treadle.engine.adapter_config import interrupted_saves, staging_folder
from treadle.errors import NotFound, StorageFull, UserInputError
from treadle.service import audit
from treadle.service.auth import owned
from treadle.service.limits import check_names
from treadle.service.sessions import Sessions
from treadle.service.store import CheckpointRow, Store, TrainingRunRow
from treadle.settings import Settings

if TYPE_CHECKING:  # training.py imports this module
    from treadle.service.training import Training

log = logging.getLogger(__name__)

PREFIX = "tinker://"
KINDS = ("weights", "sampler_weights", "external_weights")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Model ids are SESSION:train:N; a letter or digit first, so no id is "." or "..".
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,255}$")
# The TTLs the SDK documents for saves, copies and set_checkpoint_ttl: 1 hour to 10 years.
MIN_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# Answers of recent copies by idempotency key, so a retried copy makes no second copy.
_REMEMBERED_COPIES = 4096


@dataclass(frozen=True)
class CheckpointPath:
    model_id: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        # Checked here, so no path is ever built from an unchecked part.
        if not _MODEL_ID.match(self.model_id):
            raise UserInputError(f"{self.model_id!r} is not a training run id")
        if self.kind not in KINDS:
            raise UserInputError(f"checkpoint kind {self.kind!r} must be one of {KINDS}")
        _check_name(self.name)

    @property
    def tinker_path(self) -> str:
        return f"{PREFIX}{self.model_id}/{self.kind}/{self.name}"

    def folder(self, data_dir: Path) -> Path:
        return data_dir / "checkpoints" / self.model_id / self.kind / self.name

    @classmethod
    def parse(cls, path: str) -> CheckpointPath:
        if not path.startswith(PREFIX):
            raise UserInputError(f"checkpoint path {path!r} must start with {PREFIX}")
        parts = path[len(PREFIX) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS or not parts[0]:
            raise UserInputError(
                f"checkpoint path {path!r} must look like tinker://MODEL_ID/KIND/NAME with KIND"
                " one of weights, sampler_weights, external_weights"
            )
        return cls(parts[0], parts[1], parts[2])


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserInputError(
            f"checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
            " (starting with a letter or digit)"
        )
    return name


def remove_interrupted_saves(data_dir: Path) -> None:
    """Delete what saves interrupted by a crash left (a save writes a staging folder and
    renames it when complete, so these were never reported saved)."""
    for leftover in interrupted_saves(data_dir / "checkpoints"):
        shutil.rmtree(leftover, ignore_errors=True)
        log.warning("removed %s: the staging folder of a save that was interrupted", leftover)


def readable_checkpoint(store: Store, data_dir: Path, user: str, tinker_path: str) -> Path:
    """The folder of a checkpoint ``user`` may read: one of their own runs', or one its
    owner published. Anything else is "not found", as if it did not exist."""
    path = CheckpointPath.parse(tinker_path)
    missing = f"no checkpoint at {tinker_path}"
    row = store.checkpoint(path.tinker_path)
    if row is None or not row.public:
        owned(_owner(store, row), user, missing)
    folder = path.folder(data_dir)
    if not folder.is_dir():
        raise NotFound(missing)
    return folder


def own_checkpoint(store: Store, user: str, path: CheckpointPath) -> None:
    """Not found unless ``user`` owns the checkpoint (published or not): only its owner
    may change or delete it."""
    row = store.checkpoint(path.tinker_path)
    owned(_owner(store, row), user, f"no checkpoint at {path.tinker_path}")


def _owner(store: Store, row: CheckpointRow | None) -> str | None:
    run = store.training_run(row.model_id) if row else None
    return run.user if run else None


def check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise UserInputError(
            f"ttl_seconds must be between {MIN_TTL_SECONDS} (1 hour) and {MAX_TTL_SECONDS}"
            f" (10 years), or null for no expiry; got {ttl_seconds}"
        )


def expiry(ttl_seconds: int | None) -> float | None:
    """When a checkpoint given ``ttl_seconds`` now expires (checked first)."""
    check_ttl(ttl_seconds)
    return None if ttl_seconds is None else time.time() + ttl_seconds


class Checkpoints:
    def __init__(
        self, store: Store, sessions: Sessions, training: Training, settings: Settings
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._training = training
        self._settings = settings
        self._data_dir = settings.data_dir
        self._copies: OrderedDict[tuple[str, str], str] = OrderedDict()

    def delete(self, user: str, path: CheckpointPath) -> None:
        self._training.delete_checkpoint(user, path)
        audit.record(self._store, user, audit.CHECKPOINT_DELETE, user, **_about(path))

    def publish(self, user: str, path: CheckpointPath, public: bool) -> None:
        """Publish (any user may then read, load and sample it) or unpublish."""
        self._training.publish(user, path, public)
        event = audit.CHECKPOINT_PUBLISH if public else audit.CHECKPOINT_UNPUBLISH
        audit.record(self._store, user, event, user, **_about(path))

    def set_ttl(self, user: str, path: CheckpointPath, ttl_seconds: int | None) -> None:
        """The checkpoint expires ``ttl_seconds`` from now (None: never)."""
        own_checkpoint(self._store, user, path)
        expires_at = expiry(ttl_seconds)
        self._store.set_expires_at(path.tinker_path, expires_at)
        audit.record(
            self._store,
            user,
            audit.CHECKPOINT_TTL_SET,
            user,
            **_about(path),
            ttl_seconds=ttl_seconds,
            expires_at=expires_at,
        )

    def expire_due(self) -> list[str]:
        """Delete every checkpoint whose expiry has come (files and row); the paths."""
        expired = []
        for row in self._store.expired_checkpoints(time.time()):
            path = CheckpointPath.parse(row.tinker_path)
            owner = _owner(self._store, row)
            try:
                if owner is None:  # its run's row is gone: nobody can see it anyway
                    self._store.delete_checkpoint(row.tinker_path)
                    shutil.rmtree(path.folder(self._data_dir), ignore_errors=True)
                    continue
                self._training.delete_checkpoint(owner, path)
            except (OSError, NotFound) as exc:  # tried again at the next tick
                log.warning("could not delete expired checkpoint %s: %s", row.tinker_path, exc)
                continue
            log.info("checkpoint %s expired: deleted", row.tinker_path)
            audit.record(
                self._store,
                owner,
                audit.CHECKPOINT_EXPIRE,
                audit.TREADLE,
                **_about(path),
                expires_at=row.expires_at,
            )
            expired.append(row.tinker_path)
        return expired

    def copy(
        self,
        user: str,
        source_path: str,
        session_id: str | None,
        model_seq_id: int | None,
        project_id: str | None,
        ttl_seconds: int | None,
        idempotency_key: str | None,
    ) -> str:
        """``copy_weights``: a copy of a checkpoint ``user`` may read (their own, or a
        published one), owned by ``user``, under the source's kind and name. It goes into
        training run ``session_id:train:model_seq_id`` of ``user``'s session (a new run
        in that slot, or the one there), or else into a new run of a new session in
        ``project_id``. Returns its path."""
        remembered = (user, idempotency_key or "")
        if idempotency_key and remembered in self._copies:
            return self._copies[remembered]
        expires_at = expiry(ttl_seconds)
        source = CheckpointPath.parse(source_path)
        folder = readable_checkpoint(self._store, self._data_dir, user, source_path)
        source_run = self._store.training_run(source.model_id)
        source_row = self._store.checkpoint(source.tinker_path)
        assert source_run is not None and source_row is not None  # readable
        model_id, new_run = self._destination_run(
            user, source_run, session_id, model_seq_id, project_id
        )
        target = CheckpointPath(model_id, source.kind, source.name)
        if self._store.checkpoint(target.tinker_path) or target.folder(self._data_dir).exists():
            raise UserInputError(
                f"{target.tinker_path} exists; delete it first, or copy into another"
                " training run (another model_seq_id, or a destination_project_id)"
            )
        self._check_disk_quota(user, source_row.size_bytes)
        _copy_folder(folder, target.folder(self._data_dir))
        if new_run is not None:
            self._store.add_training_run(new_run)
            audit.record(
                self._store,
                user,
                audit.TRAINING_RUN_CREATE,
                user,
                model_id=model_id,
                base_model=new_run.base_model,
                session_id=new_run.session_id,
                source_path=source.tinker_path,
            )
        self._store.add_checkpoint(
            CheckpointRow(
                target.tinker_path,
                model_id,
                target.kind,
                target.name,
                time.time(),
                source_row.size_bytes,
                expires_at=expires_at,
            )
        )
        audit.record(
            self._store,
            user,
            audit.CHECKPOINT_COPY,
            user,
            **_about(target),
            source_path=source.tinker_path,
            expires_at=expires_at,
        )
        if idempotency_key:
            self._copies[remembered] = target.tinker_path
            if len(self._copies) > _REMEMBERED_COPIES:
                self._copies.popitem(last=False)
        return target.tinker_path

    def _destination_run(
        self,
        user: str,
        source: TrainingRunRow,
        session_id: str | None,
        model_seq_id: int | None,
        project_id: str | None,
    ) -> tuple[str, TrainingRunRow | None]:
        """The model id a copy goes into, and the run row to create for it (None: the
        run exists)."""
        if session_id is None:
            if not project_id:
                raise UserInputError(
                    "copy_weights needs a destination_project_id, or a session_id and a"
                    " model_seq_id (ServiceClient(project_id=...) or TINKER_PROJECT_ID sets"
                    " the project)"
                )
            check_names(self._settings.max_name_chars, 0, [], project_id=project_id)
            session_id = self._sessions.create(user, None, [], {}, project_id, None)
            # Only a holder of the copy: no client will heartbeat it.
            self._sessions.finish(session_id, "copy_weights")
            model_seq_id = 0
        else:
            if model_seq_id is None or model_seq_id < 0:
                raise UserInputError(
                    "copy_weights into a session needs a model_seq_id >= 0 (the training"
                    f" run slot in the session); got {model_seq_id}"
                )
            self._sessions.check(session_id, user)
        model_id = f"{session_id}:train:{model_seq_id}"
        existing = self._store.training_run(model_id)
        if existing is not None:
            if existing.base_model != source.base_model:
                raise UserInputError(
                    f"training run {model_id} is of {existing.base_model}; the checkpoint is of"
                    f" {source.base_model}: copy it into a new training run"
                )
            return model_id, None
        now = time.time()
        return model_id, TrainingRunRow(
            model_id=model_id,
            session_id=session_id,
            base_model=source.base_model,
            lora_rank=source.lora_rank,
            train_attn=source.train_attn,
            train_mlp=source.train_mlp,
            train_unembed=source.train_unembed,
            seed=None,
            user_metadata={},
            created_at=now,
            last_request_time=now,
            user=user,
        )

    def _check_disk_quota(self, user: str, adding: int) -> None:
        used = sum(row.size_bytes for row in self._store.checkpoints_of(user))
        limit = self._settings.max_checkpoint_bytes_per_user
        if used + adding > limit:
            raise UserInputError(
                f"checkpoint bytes on disk per user: the limit is {limit}, your checkpoints"
                f" take {used} and the copy {adding}; delete some first"
            )


def _about(path: CheckpointPath) -> dict[str, str]:
    return {"model_id": path.model_id, "tinker_path": path.tinker_path}


def _copy_folder(source: Path, target: Path) -> None:
    """Copy a checkpoint folder: its files are hard links (saves never change a file in
    place, they rename a new folder over the old), or copies where links are refused.
    Written in a staging folder renamed into place, like a save."""
    staging = staging_folder(target)
    try:
        shutil.copytree(source, staging / "copy", copy_function=_link_or_copy)
        os.rename(staging / "copy", target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise StorageFull(f"the server's data dir takes no more data ({exc})") from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
