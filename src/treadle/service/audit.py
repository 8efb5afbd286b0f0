"""The audit log (``AdminClient.get_audit_log``): who did what to which training run and
checkpoint, kept in the data dir's SQLite.

An entry belongs to the user who owns what it is about, and only they see it. Events are
named ``<resource>_<action>`` as on Tinker; ``event_details`` says who acted (a user, or
``treadle`` itself for an expiry) and on what.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from treadle.errors import StorageFull, UserInputError
from treadle.service.store import AuditRow, Store

log = logging.getLogger(__name__)

# The actor of what treadle does by itself (a checkpoint's expiry).
TREADLE = "treadle"

TRAINING_RUN_CREATE = "training_run_create"
CHECKPOINT_SAVE = "checkpoint_save"
CHECKPOINT_DELETE = "checkpoint_delete"
CHECKPOINT_PUBLISH = "checkpoint_publish"
CHECKPOINT_UNPUBLISH = "checkpoint_unpublish"
CHECKPOINT_TTL_SET = "checkpoint_ttl_set"
CHECKPOINT_COPY = "checkpoint_copy"
CHECKPOINT_EXPIRE = "checkpoint_expire"

# get_audit_log's event_type -> the resource whose events it selects (None: all). Treadle
# has no projects, teams or organizations to change, so those select nothing.
EVENT_TYPES: dict[str, str | None] = {
    "all": None,
    "checkpoints": "checkpoint_",
    "projects": "project_",
    "teams": "team_",
    "organizations": "organization_",
}


def record(store: Store, owner: str, event: str, actor: str, **details: Any) -> None:
    """Add an entry to ``owner``'s log. Written after the change it records: on a full
    disk the change stands and the entry is lost (with a warning), rather than a change
    that happened being reported as failed."""
    try:
        store.add_audit(owner, event, {"actor": actor, **details})
    except StorageFull as exc:
        log.warning("audit log: %s not recorded: %s", event, exc)


def entries(store: Store, user: str, event_type: str, day: datetime.date | None) -> list[AuditRow]:
    """``user``'s entries of one UTC day (default: today) of the ``event_type`` resource."""
    if event_type not in EVENT_TYPES:
        raise UserInputError(f"event_type {event_type!r} must be one of {', '.join(EVENT_TYPES)}")
    day = day or datetime.datetime.now(datetime.UTC).date()
    start = datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()
    rows = store.audit(user, start, start + 24 * 3600)
    prefix = EVENT_TYPES[event_type]
    return [row for row in rows if prefix is None or row.event.startswith(prefix)]
