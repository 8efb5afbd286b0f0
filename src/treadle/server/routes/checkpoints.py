"""REST views of training runs and checkpoints (``RestClient``)."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict

from treadle.server.deps import ServiceDep
from treadle.service.checkpoints import CheckpointPath
from treadle.service.store import CheckpointRow, TrainingRunRow

router = APIRouter(prefix="/api/v1")

_TYPES = {"weights": "training", "sampler_weights": "sampler"}


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _checkpoint(row: CheckpointRow) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": _TYPES[row.kind],
        "time": _iso(row.created_at),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": False,
    }


def _run(row: TrainingRunRow, checkpoints: list[CheckpointRow]) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "training_run_id": row.model_id,
        "base_model": row.base_model,
        "model_owner": "local",
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
    service: ServiceDep, limit: int = 20, offset: int = 0
) -> dict[str, Any]:
    rows = service.training.training_runs()
    page = rows[offset : offset + limit]
    return {
        "training_runs": [_run(r, service.training.checkpoints(r.model_id)) for r in page],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)},
    }


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, service: ServiceDep) -> dict[str, Any]:
    return _run(service.training.training_run(run_id), service.training.checkpoints(run_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, service: ServiceDep) -> dict[str, Any]:
    return {"checkpoints": [_checkpoint(c) for c in service.training.checkpoints(run_id)]}


@router.get("/checkpoints")
async def list_user_checkpoints(
    service: ServiceDep, limit: int = 100, offset: int = 0
) -> dict[str, Any]:
    rows = service.training.checkpoints()
    return {
        "checkpoints": [_checkpoint(c) for c in rows[offset : offset + limit]],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)},
    }


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}", status_code=204)
async def delete_checkpoint(run_id: str, kind: str, name: str, service: ServiceDep) -> Response:
    path = CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")
    service.training.delete_checkpoint(path)
    return Response(status_code=204)


class WeightsInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tinker_path: str


@router.post("/weights_info")
async def weights_info(body: WeightsInfoRequest, service: ServiceDep) -> dict[str, Any]:
    path = CheckpointPath.parse(body.tinker_path)
    row = service.training.training_run(path.model_id)
    return {
        "base_model": row.base_model,
        "is_lora": True,
        "lora_rank": row.lora_rank,
        "train_attn": row.train_attn,
        "train_mlp": row.train_mlp,
        "train_unembed": row.train_unembed,
    }
