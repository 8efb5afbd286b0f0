"""``retrieve_future``: the long-poll every asynchronous call ends in."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from treadle.errors import Failure, NotFound
from treadle.server import wire
from treadle.server.deps import ServiceDep, UserDep
from treadle.service.futures import UnknownFuture
from treadle.types import ForwardBackwardResult, SampleResult

router = APIRouter(prefix="/api/v1")


class RetrieveFutureRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: str
    allow_metadata_only: bool = False


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
