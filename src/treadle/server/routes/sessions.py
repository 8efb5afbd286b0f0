"""Sessions: create, heartbeat, finish, list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from treadle.server.deps import ServiceDep, UserDep, page
from treadle.service.sessions import SessionEnded

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
    return {"training_run_ids": service.training.runs_of(user, session_id), "sampler_ids": []}
