"""Bootstrap calls every SDK client makes: client config, capabilities, health, telemetry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from treadle.server.deps import ServiceDep

router = APIRouter(prefix="/api/v1")


@router.post("/client/config")
async def client_config(service: ServiceDep, body: dict[str, Any] | None = None) -> dict[str, Any]:
    # Other flags at the SDK's default: no JWT exchange, JSON forward_backward for SDKs
    # older than 0.25 (they only send protobuf when asked to). Rebuilt SamplingClients
    # always join: their clone ids then never collide.
    return {
        "pjwt_auth_enabled": False,
        "sample_use_retrieve_futures": service.settings.sample_retrieve_futures,
        "sample_join_sampling_session": True,
        "custom_loss_server_side": service.settings.custom_loss_server_side,
    }


@router.post("/client/dynamic_config")
async def dynamic_config(service: ServiceDep, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": service.settings.sample_cancel}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/telemetry")
async def telemetry(body: dict[str, Any] | None = None) -> dict[str, str]:
    # The SDK reports its own events here; treadle has no use for them.
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
async def capabilities(service: ServiceDep) -> dict[str, Any]:
    return {"supported_models": service.capabilities()}
