"""The audit log (``AdminClient.get_audit_log``): the caller's own entries."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter

from treadle.server.deps import ServiceDep, UserDep
from treadle.service import audit

router = APIRouter(prefix="/api/v1")


@router.get("/audit")
async def get_audit_log(
    service: ServiceDep,
    user: UserDep,
    event_type: str = "all",
    day: datetime.date | None = None,
) -> dict[str, Any]:
    """One UTC day's entries (default: today), oldest first."""
    rows = audit.entries(service.store, user, event_type, day)
    return {
        "entries": [
            {
                "timestamp": _iso(row.timestamp),
                "event": row.event,
                "event_details": row.details,
                # Deprecated top-level copies the SDK still parses.
                "model_id": row.details.get("model_id"),
                "tinker_path": row.details.get("tinker_path"),
            }
            for row in rows
        ]
    }


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()
