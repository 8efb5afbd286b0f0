"""Request-scoped access to the running service and the caller (FastAPI dependencies)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from treadle.errors import UserInputError
from treadle.service.service import Service


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _user(request: Request) -> str:
    # Set by the app-wide key check (server/app.py) before any route runs.
    user: str = request.state.user
    return user


def page(service: Service, limit: int, offset: int) -> slice:
    """The slice a list route's ``limit`` and ``offset`` ask for, within the cap."""
    cap = service.settings.max_list_limit
    if not 0 <= limit <= cap or offset < 0:
        raise UserInputError(
            f"limit must be between 0 and {cap} (--max-list-limit) and offset at least 0;"
            f" got limit={limit}, offset={offset}"
        )
    return slice(offset, offset + limit)


ServiceDep = Annotated[Service, Depends(_service)]
# The user whose key the request carries; every service call acts for them.
UserDep = Annotated[str, Depends(_user)]
