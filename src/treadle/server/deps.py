"""Request-scoped access to the running service and the caller (FastAPI dependencies)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from treadle.service.service import Service


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _user(request: Request) -> str:
    # Set by the app-wide key check (server/app.py) before any route runs.
    user: str = request.state.user
    return user


ServiceDep = Annotated[Service, Depends(_service)]
# The user whose key the request carries; every service call acts for them.
UserDep = Annotated[str, Depends(_user)]
