"""``GET /metrics``: the Prometheus text format (see :mod:`treadle.service.metrics`).

Served without a key, as ``healthz`` is and as vLLM serves its own: Prometheus scrapes
with no Tinker key, and the series carry no user, key or id (their labels are served
model names, request kinds, outcomes and route templates). Keep the port off networks
that should not see the server's load.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from treadle.server.deps import ServiceDep

PATH = "/metrics"

router = APIRouter()


@router.get(PATH, include_in_schema=False)
async def metrics(service: ServiceDep) -> Response:
    # On the event loop, where the sessions, models and samplers it counts change: a
    # consistent read, and a scrape takes well under a millisecond per model.
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
