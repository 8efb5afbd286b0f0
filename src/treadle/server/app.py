"""Builds the FastAPI app; nothing else lives here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from treadle import __version__
from treadle.errors import NotFound, StorageFull, UserInputError, message_of
from treadle.server.body_limit import BodyLimit
from treadle.server.http_metrics import HttpMetrics
from treadle.server.routes import (
    audit,
    checkpoints,
    client,
    console,
    exports,
    futures,
    metrics,
    openai,
    sampling,
    sessions,
    trace,
    training,
    usage,
)
from treadle.service.auth import Unauthorized
from treadle.service.exports import DOWNLOAD_PREFIX
from treadle.service.service import LoadWorker, Service
from treadle.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, load_worker: LoadWorker) -> FastAPI:
    """The app serving ``settings.models``, each loaded by ``load_worker`` at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # Loading models takes seconds to minutes; keep the loop free meanwhile.
        service = await asyncio.to_thread(Service.start, settings, loop, load_worker)
        app.state.service = service
        log.info("treadle %s serving %s", __version__, ", ".join(e.name for e in settings.models))
        reaper = asyncio.create_task(_housekeeping(service))
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="treadle", version=__version__, lifespan=lifespan, dependencies=[Depends(_caller)]
    )
    for module in (client, sessions, training, sampling, checkpoints, futures, usage, exports):
        app.include_router(module.router)
    app.include_router(trace.router)
    app.include_router(audit.router)
    app.include_router(openai.router)
    app.include_router(metrics.router)
    app.include_router(console.router)
    app.mount(
        f"{console.PREFIX}/static", StaticFiles(directory=console.STATIC_DIR), "console_static"
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # The console's login (see server/routes/console.py); its cookie goes to /console only.
    app.add_middleware(console.Sessions, data_dir=settings.data_dir)
    # Outermost: counts every answer, the body cap's 413s included.
    app.add_middleware(HttpMetrics)

    # Permanent errors are 4xx with a JSON body: the SDK retries 5xx for minutes and
    # treats an empty 400 as a proxy glitch.
    @app.exception_handler(UserInputError)
    async def user_error(request: Request, exc: UserInputError) -> JSONResponse:
        return JSONResponse({"detail": message_of(exc)}, status_code=400)

    # FastAPI decodes a JSON body without checking it is UTF-8 first.
    @app.exception_handler(UnicodeDecodeError)
    async def not_utf8(request: Request, exc: UnicodeDecodeError) -> JSONResponse:
        return JSONResponse({"detail": f"body is not UTF-8 JSON: {exc}"}, status_code=400)

    @app.exception_handler(StorageFull)
    async def storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=507)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": message_of(exc)}, status_code=404)

    return app


async def _housekeeping(service: Service) -> None:
    """Sessions whose client stopped sending heartbeats end (checked a few times per
    timeout), and usage counts are written to the data dir."""
    period = min(5.0, service.settings.session_timeout_seconds / 4)
    while True:
        await asyncio.sleep(period)
        try:
            service.tick()
        except StorageFull as exc:  # usage stays counted in memory until there is room
            log.warning("housekeeping: %s", exc)


# What a client may still do while the server shuts down: fetch answers, stay alive.
_ANSWERS = ("/retrieve_future", "/session_heartbeat")


async def _caller(request: Request) -> None:
    """Every route but ``healthz`` and ``metrics`` acts for the user whose key the request
    carries (the SDK sends it as ``X-API-Key``); a missing, unknown or revoked key is a 401
    saying how to get one."""
    if request.url.path.endswith("/healthz"):
        return
    if request.url.path == metrics.PATH:  # Prometheus scrapes without a key
        return
    if request.url.path.startswith(DOWNLOAD_PREFIX):  # a signed URL: its signature is the grant
        return
    if request.url.path.startswith(trace.DOWNLOAD_PREFIX):  # its token is the grant
        return
    if request.url.path == console.PREFIX or request.url.path.startswith(f"{console.PREFIX}/"):
        # The console: a browser, whose session holds the key (checked on every page).
        return
    service: Service = request.app.state.service
    if service.closing and request.method != "GET" and not request.url.path.endswith(_ANSWERS):
        # 503: the SDK retries it (against this server's successor) instead of failing.
        raise HTTPException(503, detail="treadle is shutting down; retry shortly")
    try:
        request.state.user = service.auth.user_of(_api_key(request))
    except Unauthorized as exc:
        raise HTTPException(401, detail=str(exc)) from None


def _api_key(request: Request) -> str | None:
    """The key a request carries: the SDK's ``X-API-Key``, or OpenAI clients'
    ``Authorization: Bearer``."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None
