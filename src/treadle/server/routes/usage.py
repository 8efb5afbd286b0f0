"""Usage: the tokens the caller spent, by hour, base model and kind."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter

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
                "hour": datetime.datetime.fromtimestamp(row.hour, datetime.UTC).isoformat(),
                "base_model": row.base_model,
                "kind": row.kind,
                "tokens": row.tokens,
            }
            for row in rows
        ],
    }
