"""``tinker://`` checkpoint paths and where they live on disk.

``tinker://{model_id}/weights/{name}`` is a ``save_state`` checkpoint (adapter + AdamW
state), ``tinker://{model_id}/sampler_weights/{name}`` a ``save_weights_for_sampler`` one
(adapter only). Both are PEFT folders under ``{data_dir}/checkpoints/{model_id}/{kind}/``.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from treadle.engine.adapter_config import interrupted_saves
from treadle.errors import NotFound, UserInputError
from treadle.service.auth import owned
from treadle.service.store import CheckpointRow, Store

log = logging.getLogger(__name__)

PREFIX = "tinker://"
KINDS = ("weights", "sampler_weights")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Model ids are SESSION:train:N; a letter or digit first, so no id is "." or "..".
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,255}$")


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
                f"checkpoint path {path!r} must look like tinker://MODEL_ID/weights/NAME or"
                " tinker://MODEL_ID/sampler_weights/NAME"
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
