"""REST views of training runs and checkpoints, and what their owner does with them
(``RestClient``: delete, publish, set a TTL, copy)."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict

from treadle.server.deps import ServiceDep, UserDep, page
from treadle.service.checkpoints import CheckpointPath
from treadle.service.store import CheckpointRow, TrainingRunRow

router = APIRouter(prefix="/api/v1")

_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _checkpoint(row: CheckpointRow) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": _TYPES[row.kind],
        "time": _iso(row.created_at),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": row.public,
        "expires_at": None if row.expires_at is None else _iso(row.expires_at),
    }


def _run(row: TrainingRunRow, checkpoints: list[CheckpointRow]) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "training_run_id": row.model_id,
        "base_model": row.base_model,
        "model_owner": row.user,
        "is_lora": True,
        "lora_rank": row.lora_rank,
        "corrupted": False,
        "last_request_time": _iso(row.last_request_time),
        "user_metadata": {str(k): str(v) for k, v in row.user_metadata.items()},
    }
    for kind, key in (
        ("weights", "last_checkpoint"),
        ("sampler_weights", "last_sampler_checkpoint"),
    ):
        mine = [c for c in checkpoints if c.kind == kind]
        if mine:
            answer[key] = _checkpoint(mine[-1])
    return answer


@router.get("/training_runs")
async def list_training_runs(
    service: ServiceDep, user: UserDep, limit: int = 20, offset: int = 0
) -> dict[str, Any]:
    rows = service.training.training_runs(user)
    shown = rows[page(service, limit, offset)]
    return {
        "training_runs": [_run(r, service.training.checkpoints(user, r.model_id)) for r in shown],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)},
    }


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, service: ServiceDep, user: UserDep) -> dict[str, Any]:
    row = service.training.training_run(user, run_id)
    return _run(row, service.training.checkpoints(user, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, service: ServiceDep, user: UserDep) -> dict[str, Any]:
    return {"checkpoints": [_checkpoint(c) for c in service.training.checkpoints(user, run_id)]}


@router.get("/checkpoints")
async def list_user_checkpoints(
    service: ServiceDep, user: UserDep, limit: int = 100, offset: int = 0
) -> dict[str, Any]:
    rows = service.training.all_checkpoints(user)
    return {
        "checkpoints": [_checkpoint(c) for c in rows[page(service, limit, offset)]],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)},
    }


def _path(run_id: str, kind: str, name: str) -> CheckpointPath:
    return CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}", status_code=204)
async def delete_checkpoint(
    run_id: str, kind: str, name: str, service: ServiceDep, user: UserDep
) -> Response:
    service.checkpoints.delete(user, _path(run_id, kind, name))
    return Response(status_code=204)


@router.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish", status_code=204)
async def publish_checkpoint(
    run_id: str, kind: str, name: str, service: ServiceDep, user: UserDep
) -> Response:
    """Any user may then read, load and sample it; only its owner changes or deletes it."""
    service.checkpoints.publish(user, _path(run_id, kind, name), public=True)
    return Response(status_code=204)


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish", status_code=204)
async def unpublish_checkpoint(
    run_id: str, kind: str, name: str, service: ServiceDep, user: UserDep
) -> Response:
    service.checkpoints.publish(user, _path(run_id, kind, name), public=False)
    return Response(status_code=204)


class TtlRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ttl_seconds: int | None  # None removes the expiry


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl", status_code=204)
async def set_checkpoint_ttl(
    run_id: str, kind: str, name: str, body: TtlRequest, service: ServiceDep, user: UserDep
) -> Response:
    """The checkpoint is deleted ``ttl_seconds`` from now (1 hour to 10 years)."""
    service.checkpoints.set_ttl(user, _path(run_id, kind, name), body.ttl_seconds)
    return Response(status_code=204)


class CopyWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source_path: str
    session_id: str | None = None
    model_seq_id: int | None = None
    destination_project_id: str | None = None
    ttl_seconds: int | None = None


@router.post("/copy_weights")
async def copy_weights(
    body: CopyWeightsRequest,
    service: ServiceDep,
    user: UserDep,
    x_idempotency_key: str | None = Header(default=None),
) -> dict[str, str]:
    path = service.checkpoints.copy(
        user,
        body.source_path,
        body.session_id,
        body.model_seq_id,
        body.destination_project_id,
        body.ttl_seconds,
        x_idempotency_key,
    )
    return {"tinker_path": path}


class WeightsInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tinker_path: str


@router.post("/weights_info")
async def weights_info(
    body: WeightsInfoRequest, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    row = service.training.weights_info(user, body.tinker_path)
    return {
        "base_model": row.base_model,
        "is_lora": True,
        "lora_rank": row.lora_rank,
        "train_attn": row.train_attn,
        "train_mlp": row.train_mlp,
        "train_unembed": row.train_unembed,
    }
