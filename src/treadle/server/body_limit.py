"""A cap on request bodies, enforced while they stream in.

Checked before any route reads a byte: a declared ``Content-Length`` past the cap is
refused at once, and a body that keeps coming (chunked, or lying about its length) is
cut off at the cap. Either way the client gets a 413 with a JSON body naming the cap.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body is larger than the server's cap of {limit} bytes"
            " (--max-body-bytes); send less per request"
        )


class BodyLimit:
    """ASGI middleware: at most ``limit`` body bytes per request."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            await _refuse(send, BodyTooLarge(self._limit))
            return
        received = 0
        cut_off = started = False

        async def limited() -> Message:
            nonlocal received, cut_off
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    cut_off = True
                    raise BodyTooLarge(self._limit)
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if cut_off:
                return  # the route's own answer to a body it could not read
            started = True
            await send(message)

        with contextlib.suppress(BodyTooLarge):  # (the answer is ours, below)
            await self._app(scope, limited, guarded)
        if cut_off and not started:
            await _refuse(send, BodyTooLarge(self._limit))


async def _refuse(send: Send, exc: BodyTooLarge) -> None:
    body = json.dumps({"detail": str(exc)}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
