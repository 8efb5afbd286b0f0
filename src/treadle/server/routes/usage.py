"""Usage: the tokens the caller spent, by hour, base model and kind.

Two views of the same meter (``service/usage.py``): treadle's own ``GET /usage``, and the
SDK's billing calls (``AdminClient.get_billing_usage`` and
``get_current_checkpoint_storage_usage``, also ``tinker billing usage`` and
``tinker billing checkpoint-storage``). Every view answers for the caller only.

Treadle bills nothing, so every cost and rate the SDK asks for is 0; it has no
organizations, so the caller's user name stands where the SDK shows a person and
organization URNs and emails are null.
"""

from __future__ import annotations

import collections
import datetime
from typing import Any

from fastapi import APIRouter

from treadle.errors import UserInputError
from treadle.server.deps import ServiceDep, UserDep

router = APIRouter(prefix="/api/v1")


@router.get("/usage")
async def usage(service: ServiceDep, user: UserDep) -> dict[str, Any]:
    rows = service.usage.of(user)
    totals: dict[str, int] = {}
    for row in rows:
        totals[row.kind] = totals.get(row.kind, 0) + row.tokens
    return {
        "user": user,
        "totals": totals,
        "hours": [
            {
                "hour": _iso(row.hour),
                "base_model": row.base_model,
                "kind": row.kind,
                "tokens": row.tokens,
            }
            for row in rows
        ],
    }


# Meter kind -> the SDK's billing event type. The SDK has no type of its own for
# forward-only passes (TrainingClient.forward): they count as training tokens.
_EVENT_TYPE = {
    "trained": "training",
    "forward": "training",
    "prefill": "sampling_prefill",
    "sampled": "sampling_sample",
}
_MAX_WINDOW = datetime.timedelta(days=14)  # the SDK's documented limit
# The SDK does not say which gigabyte its storage unit is; decimal, as disks count.
_BYTES_PER_GIGABYTE = 10**9


@router.get("/billing/usage/events")
async def billing_usage_events(
    service: ServiceDep,
    user: UserDep,
    starting_on: datetime.datetime,
    ending_before: datetime.datetime,
) -> dict[str, Any]:
    """``AdminClient.get_billing_usage``: the caller's tokens in ``[starting_on,
    ending_before)``, one event per hour, base model and event type."""
    start, end = _hour(starting_on, "starting_on"), _hour(ending_before, "ending_before")
    if end <= start:
        raise UserInputError("ending_before must be after starting_on")
    if end - start > _MAX_WINDOW.total_seconds():
        raise UserInputError("the window is at most 14 days: move ending_before closer")
    if start > datetime.datetime.now(datetime.UTC).timestamp():
        raise UserInputError("starting_on is in the future")
    tokens: collections.Counter[tuple[int, str, str]] = collections.Counter()
    for row in service.usage.of(user):
        if start <= row.hour < end and row.kind in _EVENT_TYPE:
            tokens[(row.hour, row.base_model, _EVENT_TYPE[row.kind])] += row.tokens
    ordered = sorted(tokens.items(), key=lambda item: (item[0][0], -item[1]))
    return {
        "data": [
            _event(user, hour, base_model, event_type, count)
            for (hour, base_model, event_type), count in ordered
        ],
        # The meter does not record sessions: every event has session_id None.
        "sessions": {},
        "cost_data_through": None,  # no invoices behind any cost
    }


@router.get("/billing/usage/checkpoints/current")
async def current_checkpoint_storage(
    service: ServiceDep, user: UserDep, project_id: str | None = None
) -> dict[str, Any]:
    """``AdminClient.get_current_checkpoint_storage_usage``: what the caller's checkpoints
    take on disk now (the bytes the per-user quota counts), by the project of the session
    that created their training run."""
    groups = service.training.checkpoint_storage(user)
    return {
        "effective_rate_usd_per_gigabyte_month": 0.0,
        "data": [
            {
                "project_id": project,
                "org_user_urn": None,
                "user_email": None,
                "user_name": user,
                "checkpoint_count": count,
                "size_bytes": size,
                "size_gigabytes": size / _BYTES_PER_GIGABYTE,
                "estimated_monthly_cost_usd": 0.0,
            }
            for project, count, size in groups
            if project_id is None or project == project_id
        ],
    }


def _hour(value: datetime.datetime, name: str) -> int:
    """``value`` as unix time, checked to be a UTC hour's start; a time without an
    offset is read as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    stamp = value.timestamp()
    if stamp % 3600:
        raise UserInputError(
            f"{name} must be the start of a UTC hour, such as 2026-07-13T05:00:00Z;"
            f" got {value.isoformat()}"
        )
    return int(stamp)


def _event(user: str, hour: int, base_model: str, event_type: str, count: int) -> dict[str, Any]:
    info: dict[str, Any] = {"type": event_type, "token_count": count}
    if event_type == "sampling_prefill":
        info["cached"] = False  # no prefill is billed at a cached rate
    return {
        "bucket_start": _iso(hour),
        "bucket_end": _iso(hour + 3600),
        "base_model": base_model,
        "user_id": None,
        "user_name": user,
        "session_id": None,
        "project_id": None,
        "estimated_cost_usd": 0.0,
        "effective_rate_usd_per_million_tokens": 0.0,
        "effective_rate_usd_per_gigabyte_month": None,  # applies to storage events only
        "event_info": info,
    }


def _iso(timestamp: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()
