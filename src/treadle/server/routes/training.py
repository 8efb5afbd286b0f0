"""Training: create_model, get_info, forward(_backward), optim_step, unload_model."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from treadle.errors import UserInputError
from treadle.server import wire
from treadle.server.deps import ServiceDep, UserDep
from treadle.types import AdamParams

router = APIRouter(prefix="/api/v1")


class _Lenient(BaseModel):
    # Old SDKs send explicit nulls and omit defaults; new ones may add fields.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class LoraConfig(_Lenient):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Lenient):
    type: str = "adamw"


class CreateModelRequest(_Lenient):
    session_id: str
    model_seq_id: int = 0
    base_model: str
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    user_metadata: dict[str, Any] | None = None


class ModelRequest(_Lenient):
    model_id: str


class OptimStepRequest(_Lenient):
    model_id: str
    seq_id: int | None = None
    # The SDK names the field by optimizer family; all three spellings mean the same.
    # Old SDKs send only the fields the user set: the rest take AdamParams' defaults.
    adam_params: dict[str, float | str] | None = None
    optim_params: dict[str, float | str] | None = None
    optimizer_params: dict[str, float | str] | None = None


_ADAM_FIELDS = {f.name for f in dataclasses.fields(AdamParams)}


def _future(request_id: str, model_id: str) -> dict[str, str]:
    return {"request_id": request_id, "model_id": model_id}


@router.post("/create_model")
async def create_model(
    body: CreateModelRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    lora = body.lora_config or LoraConfig()
    request_id, model_id = service.training.create_model(
        user=user,
        session_id=body.session_id,
        model_seq_id=body.model_seq_id,
        base_model=body.base_model,
        rank=lora.rank,
        seed=lora.seed,
        train_attn=lora.train_attn,
        train_mlp=lora.train_mlp,
        train_unembed=lora.train_unembed,
        optimizer=(body.optimizer_config or OptimizerConfig()).type,
        user_metadata=body.user_metadata or {},
    )
    return _future(request_id, model_id)


@router.post("/get_info")
async def get_info(body: ModelRequest, service: ServiceDep, user: UserDep) -> dict[str, Any]:
    return service.training.get_info(user, body.model_id)


@router.post("/forward_backward")
async def forward_backward(request: Request, service: ServiceDep, user: UserDep) -> dict[str, str]:
    body = await request.body()
    if wire.PROTOBUF in request.headers.get("content-type", ""):
        encoding = request.headers.get("content-encoding")
        call = wire.decode_forward_backward_proto(body, encoding, _limits(service))
    else:
        body_json = _json(body)
        call = wire.decode_forward_backward_json(
            body_json, "forward_backward_input", _limits(service)
        )
    return _submit(call, service, user)


@router.post("/forward")
async def forward(request: Request, service: ServiceDep, user: UserDep) -> dict[str, str]:
    """``TrainingClient.forward`` of SDKs up to 0.24 (JSON); newer ones use
    ``forward_backward`` with ``forward_only``."""
    body = _json(await request.body())
    call = wire.decode_forward_backward_json(body, "forward_input", _limits(service))
    return _submit(call, service, user)


def _limits(service: ServiceDep) -> wire.DecodeLimits:
    settings = service.settings
    return wire.DecodeLimits(settings.max_decompressed_bytes, settings.max_tensor_elements)


def _json(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise UserInputError(f"body is not JSON: {exc!r}") from exc
    if not isinstance(parsed, dict):
        raise UserInputError("body must be a JSON object")
    return parsed


def _submit(call: wire.ForwardBackwardCall, service: ServiceDep, user: str) -> dict[str, str]:
    request_id = service.training.forward_backward(
        user,
        call.model_id,
        call.seq_id,
        call.data,
        call.loss_fn,
        call.loss_fn_config,
        call.forward_only,
        call.problem,
    )
    return _future(request_id, call.model_id)


class CreateCustomLossRequest(_Lenient):
    session_id: str
    custom_loss_seq_id: int
    # name, inputs and graph are checked by the service, which names what is wrong.
    name: Any = None
    inputs: Any = None
    graph: Any = None


@router.post("/create_custom_loss")
async def create_custom_loss(
    body: CreateCustomLossRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    request = body.model_dump(include={"name", "inputs", "graph"})
    request_id = service.training.create_custom_loss(
        user, body.session_id, body.custom_loss_seq_id, request
    )
    return {"request_id": request_id}


@router.post("/optim_step")
async def optim_step(body: OptimStepRequest, service: ServiceDep, user: UserDep) -> dict[str, str]:
    params = dict(body.adam_params or body.optim_params or body.optimizer_params or {})
    family = str(params.pop("type", "adamw"))
    problem = None
    try:
        adam = AdamParams(**{k: float(v) for k, v in params.items() if k in _ADAM_FIELDS})
    except ValueError as exc:
        adam, problem = AdamParams(), f"AdamParams must be numbers: {exc}"
    request_id = service.training.optim_step(
        user, body.model_id, body.seq_id, adam, family, problem
    )
    return _future(request_id, body.model_id)


@router.post("/unload_model")
async def unload_model(body: ModelRequest, service: ServiceDep, user: UserDep) -> dict[str, str]:
    return _future(service.training.unload(user, body.model_id), body.model_id)


class SaveWeightsRequest(_Lenient):
    model_id: str
    path: str
    seq_id: int | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None


class SaveForSamplerRequest(_Lenient):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None


class LoadWeightsRequest(_Lenient):
    path: str
    optimizer: bool = False
    # Either an existing model (load_state) ...
    model_id: str | None = None
    seq_id: int | None = None
    # ... or a new one (create_training_client_from_state), whose request 0 this is.
    session_id: str | None = None
    model_seq_id: int | None = None


@router.post("/save_weights")
async def save_weights(
    body: SaveWeightsRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    request_id = service.training.save_state(
        user, body.model_id, body.seq_id, body.path, body.overwrite, body.ttl_seconds
    )
    return _future(request_id, body.model_id)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(
    body: SaveForSamplerRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    request_id = service.training.save_for_sampler(
        user,
        body.model_id,
        body.seq_id,
        body.path,
        body.sampling_session_seq_id,
        body.ttl_seconds,
    )
    return _future(request_id, body.model_id)


@router.post("/load_weights")
async def load_weights(
    body: LoadWeightsRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    if body.model_id is not None:
        request_id = service.training.load_state(
            user, body.model_id, body.seq_id, body.path, body.optimizer
        )
        return _future(request_id, body.model_id)
    if body.session_id is None or body.model_seq_id is None:
        raise UserInputError("load_weights needs a model_id, or a session_id and model_seq_id")
    request_id, model_id = service.training.create_from_state(
        user, body.session_id, body.model_seq_id, body.path, body.optimizer
    )
    return _future(request_id, model_id)


class SaveWeightsExternalRequest(_Lenient):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


@router.post("/save_weights_external")
async def save_weights_external(
    body: SaveWeightsExternalRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    request_id = service.training.save_external(
        user,
        body.model_id,
        body.seq_id,
        body.path,
        body.ttl_seconds,
        body.age_encryption_recipients,
    )
    return _future(request_id, body.model_id)
