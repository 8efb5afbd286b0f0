"""Sessions: create, heartbeat, finish, list, search, move into a project."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from treadle.errors import UserInputError
from treadle.server.deps import ServiceDep, UserDep, page
from treadle.service.sessions import FoundSession, SessionEnded, SessionSearch

router = APIRouter(prefix="/api/v1")


class _Lenient(BaseModel):
    # Old SDKs send explicit nulls and omit fields; new ones may add fields.
    model_config = ConfigDict(extra="ignore")


class CreateSessionRequest(_Lenient):
    tags: list[str] | None = None
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class HeartbeatRequest(_Lenient):
    session_id: str


class FinishReason(_Lenient):
    type: str = "success"


class FinishRequest(_Lenient):
    reason: FinishReason = Field(default_factory=FinishReason)
    detail: str | None = None


@router.post("/create_session")
async def create_session(
    body: CreateSessionRequest, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    session_id = service.sessions.create(
        user,
        body.sdk_version,
        body.tags or [],
        body.user_metadata or {},
        body.project_id,
        body.display_name,
    )
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
async def session_heartbeat(
    body: HeartbeatRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    try:
        service.sessions.heartbeat(body.session_id, user)
    except SessionEnded as exc:
        # The SDK stops heartbeating on a 410.
        raise HTTPException(410, detail=str(exc)) from None
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish", status_code=204)
async def finish_session(
    session_id: str, body: FinishRequest, service: ServiceDep, user: UserDep
) -> Response:
    service.finish_session(user, session_id, body.reason.type)
    return Response(status_code=204)


@router.get("/sessions")
async def list_sessions(
    service: ServiceDep, user: UserDep, limit: int = 20, offset: int = 0
) -> dict[str, Any]:
    page(service, limit, offset)  # the store pages; this checks the bounds
    return {"sessions": service.sessions.list(user, limit, offset)}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, service: ServiceDep, user: UserDep) -> dict[str, Any]:
    return {
        "training_run_ids": service.training.runs_of(user, session_id),
        "sampler_ids": service.sampling.samplers_of(user, session_id),
    }


class SearchOwner(_Lenient):
    type: str = "own"  # own, accessible (every owner's), user (owner_urns')
    owner_urns: list[str] | None = None


class StatusQuery(_Lenient):
    type: str
    reasons: list[str] | None = None  # of client_finished


class SearchCursor(_Lenient):
    last_created_at: datetime.datetime
    last_session_id: str


class SessionSearchRequest(_Lenient):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None
    owner: SearchOwner = Field(default_factory=SearchOwner)
    statuses: list[StatusQuery] | None = None
    limit: int = 50
    cursor: SearchCursor | None = None


@router.post("/sessions/search")
async def search_sessions(
    body: SessionSearchRequest, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    """The caller's sessions (owner ``accessible`` too: another user's do not exist for
    them), newest first; an owner is a user name."""
    if body.owner.type not in ("own", "accessible", "user"):
        raise UserInputError(f"owner type {body.owner.type!r} must be own, accessible or user")
    cursor = body.cursor
    found, more = service.sessions.search(
        user,
        SessionSearch(
            session_id=body.session_id,
            display_name=body.display_name,
            project_ids=body.project_ids,
            user_metadata=body.user_metadata,
            owners=(body.owner.owner_urns or []) if body.owner.type == "user" else None,
            statuses=[(q.type, q.reasons) for q in body.statuses] if body.statuses else None,
            limit=body.limit,
            after=(_utc(cursor.last_created_at), cursor.last_session_id) if cursor else None,
        ),
    )
    last = found[-1] if found and more else None
    return {
        "sessions": [_summary(f, user) for f in found],
        "next_cursor": {
            "last_created_at": last.created_at.isoformat(),
            "last_session_id": last.row.session_id,
        }
        if last
        else None,
    }


def _utc(moment: datetime.datetime) -> datetime.datetime:
    # The SDK sends aware datetimes; a naive one is taken as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _summary(found: FoundSession, user: str) -> dict[str, Any]:
    row = found.row
    status: dict[str, Any] | None = None
    if found.status == "active":
        status = {"type": "active"}
    elif found.status == "client_finished":
        status = {"type": "client_finished", "reason": {"type": row.finish_reason}}
    return {
        "session_id": row.session_id,
        "created_at": found.created_at.isoformat(),
        "owner": user,
        # Tinker's sessions are always in a project; treadle's may be in none.
        "project_id": row.project_id or "",
        "status": status,
        "checkpoints_count": row.checkpoints_count,
        "display_name": row.display_name,
        "user_metadata": {str(k): str(v) for k, v in row.user_metadata.items()},
        "checkpoint_storage_bytes": row.checkpoint_bytes,
    }


class AssignProjectRequest(_Lenient):
    project_id: str | None = None


@router.put("/sessions/{session_id}/project", status_code=204)
async def assign_session_project(
    session_id: str, body: AssignProjectRequest, service: ServiceDep, user: UserDep
) -> Response:
    service.sessions.assign_project(user, session_id, body.project_id or "")
    return Response(status_code=204)
