"""Request-scoped access to the running service (a FastAPI dependency)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from treadle.service.service import Service


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]
