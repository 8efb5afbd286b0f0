"""ASGI middleware counting HTTP requests by route template, method and status
(``treadle_http_requests_total``).

The route is the matched route's path template (``/api/v1/training_runs/{run_id}``),
never the raw path, so ids in paths can't grow the number of series; a path no route
matches is ``unmatched``, and a method outside the standard ones ``other``. A request
answered before routing (a body over the cap) is matched against the API's path
templates, as its OpenAPI schema lists them.
"""

from __future__ import annotations

import logging
import re

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

UNMATCHED = "unmatched"
# Methods counted by name; any other (a client may send any token) is ``OTHER``.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"


class HttpMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sent)
        finally:
            service = getattr(scope["app"].state, "service", None)
            if service is not None:
                method = scope["method"] if scope["method"] in _METHODS else OTHER
                service.metrics.http_request(self._route(scope), method, status)

    def _route(self, scope: Scope) -> str:
        """The template of the route that served (or would have served) the request."""
        route = scope.get("route")  # set by the router once it matched one
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        if self._templates is None:
            self._templates = _templates(scope["app"])
        return next((t for regex, t in self._templates if regex.match(scope["path"])), UNMATCHED)


def _templates(app: object) -> list[tuple[re.Pattern[str], str]]:
    """The app's path templates with their regexes (once: the schema takes ~0.1 s)."""
    try:
        paths = app.openapi()["paths"]  # type: ignore[attr-defined]
    except Exception:  # a schema that can't be built only costs these labels
        log.exception("metrics: no OpenAPI schema; unrouted requests count as unmatched")
        return []
    return [(compile_path(template)[0], template) for template in paths]
