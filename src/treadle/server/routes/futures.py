"""``retrieve_future``: the long-poll every asynchronous call ends in; its per-sampling-
session form ``retrieve_futures``; and ``cancel_future`` for samples still queued."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from treadle.errors import Failure, NotFound, UserInputError
from treadle.server import wire
from treadle.server.deps import ServiceDep, UserDep
from treadle.service.futures import UnknownFuture
from treadle.types import ForwardBackwardResult, SampleResult

router = APIRouter(prefix="/api/v1")


class RetrieveFutureRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str
    allow_metadata_only: bool = False


class FuturesTarget(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = Field(0, ge=0)


class RetrieveFuturesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    target: FuturesTarget
    prev_cursor: int = Field(0, ge=0)
    # None: hold the poll until a completion (or the long-poll time); 0: answer at once.
    timeout: float | None = Field(None, ge=0)
    retrieved_request_ids: list[str] = []


class CancelFutureRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str


@router.post("/retrieve_future")
async def retrieve_future(
    body: RetrieveFutureRequest, request: Request, service: ServiceDep, user: UserDep
) -> Response:
    # Hold the poll until the result exists: the SDK re-polls a try_again immediately,
    # so answering at once would make every waiting client spin.
    try:
        done, value = await service.futures.wait(
            body.request_id, user, service.settings.long_poll_seconds
        )
    except UnknownFuture:
        raise NotFound(
            f"unknown request_id {body.request_id!r} (results are kept for an hour, and"
            " not across restarts)"
        ) from None
    if not done:
        return JSONResponse(
            {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
        )
    return encode_result(value, request.headers.get("accept", ""))


def encode_result(value: Any, accept: str) -> Response:
    if isinstance(value, Failure):
        return JSONResponse({"error": value.message, "category": value.category})
    if isinstance(value, ForwardBackwardResult):
        if wire.PROTOBUF in accept:
            return Response(wire.encode_forward_backward_proto(value), media_type=wire.PROTOBUF)
        return JSONResponse(wire.encode_forward_backward_json(value))
    if isinstance(value, SampleResult):
        if wire.PROTOBUF in accept:
            return Response(wire.encode_sample_proto(value), media_type=wire.PROTOBUF)
        return JSONResponse(wire.encode_sample_json(value))
    return JSONResponse(value)


@router.post("/retrieve_futures")
async def retrieve_futures(
    body: RetrieveFuturesRequest, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    target = body.target
    if target.type != "sampling_session":
        raise UserInputError(
            f"retrieve_futures target type {target.type!r}; only sampling_session is supported"
        )
    service.sampling.session(user, target.sampling_session_id)  # not found unless theirs
    long_poll = service.settings.long_poll_seconds
    events, cursor = await service.futures.completions(
        (target.sampling_session_id, target.cloned_sampler_id),
        user,
        body.prev_cursor,
        long_poll if body.timeout is None else min(body.timeout, long_poll),
        body.retrieved_request_ids,
    )
    completions = [
        {"state": "failed" if failed else "finished", "request_id": request_id}
        for request_id, failed in events
    ]
    return {"completions": completions, "cursor": cursor}


@router.post("/cancel_future")
async def cancel_future(
    body: CancelFutureRequest, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    # A sample that already started is no error (the SDK cancels whatever it abandons,
    # and would log a 4xx as a failure): the answer says it runs on.
    cancelled, detail = service.sampling.cancel(user, body.request_id)
    return {"request_id": body.request_id, "cancelled": cancelled, "detail": detail}
