"""The web console at ``/console``: a user's training runs, their checkpoints (publish,
unpublish, delete), a loss curve per run, and the live queues of the base models.

A browser sends no ``X-API-Key``, so the login form takes the key once and keeps it in
the session: a signed (not encrypted), HttpOnly, SameSite=Strict cookie scoped to
``/console``. Every page asks the service who holds that key again, so a revoked key is
logged out within a second; on a server with no keys (one local user) nobody logs in.
Actions are POST forms carrying a per-session CSRF token. Pages are Jinja2 templates with
autoescaping on, served under a Content-Security-Policy that runs only the package's own
scripts: whatever a user named or tagged renders as text.
"""

from __future__ import annotations

import contextlib
import datetime
import hmac
import logging
import os
import secrets
import urllib.parse
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, PackageLoader
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from treadle import __version__
from treadle.errors import NotFound, StorageFull, UserInputError, message_of
from treadle.service.auth import Unauthorized
from treadle.service.checkpoints import CheckpointPath
from treadle.service.service import Service
from treadle.service.store import CheckpointRow

log = logging.getLogger(__name__)

PREFIX = "/console"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(prefix=PREFIX, include_in_schema=False)

# Points of one loss curve a page carries: a longer run is shown every k-th step (see
# Store.training_steps), which keeps the page small and the chart quick.
MAX_POINTS = 2000
# A console form holds a key or a CSRF token; anything much larger is not ours.
_MAX_FORM_BYTES = 8 << 10
_SECRET_FILE = "console_session_secret"
_ACTIONS = ("publish", "unpublish", "delete")
# Only the package's own scripts and styles run; uPlot sets element styles from script,
# which the CSP allows, and no page may be framed (clickjacking on the action buttons).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_templates = Environment(
    loader=PackageLoader("treadle.server", "templates"), autoescape=True, auto_reload=False
)
_templates.filters["when"] = lambda t: datetime.datetime.fromtimestamp(t, datetime.UTC).strftime(
    "%Y-%m-%d %H:%M:%S UTC"
)


def session_secret(data_dir: Path) -> str:
    """The key signing console sessions: random, made on first use and kept (owner-only)
    in the data dir, so logins outlive a restart and every server on the dir agrees. A
    data dir that takes no file (full, read-only) gets one for this process only: the
    console is no reason to refuse to start."""
    file = data_dir / _SECRET_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            # Written aside and linked into place: no reader ever sees a half-written
            # secret, and of two servers starting at once, the first link wins for both.
            staged = file.with_name(f".{_SECRET_FILE}.{secrets.token_hex(8)}")
            descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(secrets.token_urlsafe(32))
                with contextlib.suppress(FileExistsError):
                    os.link(staged, file)
            finally:
                staged.unlink()
        return file.read_text().strip()
    except OSError as exc:
        log.warning("console logins will not outlive this process: %s", exc)
        return secrets.token_urlsafe(32)


class Sessions:
    """Starlette's signed-cookie sessions for the console's paths only (the API's requests
    pass straight through), with the secret read from the data dir at the first console
    request rather than when the app is built."""

    def __init__(self, app: ASGIApp, data_dir: Path) -> None:
        self._app = app
        self._data_dir = data_dir
        self._sessions: SessionMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(f"{PREFIX}/"):
            await self._app(scope, receive, send)
            return
        if self._sessions is None:
            self._sessions = SessionMiddleware(
                self._app,
                secret_key=session_secret(self._data_dir),
                session_cookie="treadle_console",
                max_age=12 * 3600,
                path=PREFIX,
                same_site="strict",
            )
        await self._sessions(scope, receive, send)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _user(request: Request) -> str | None:
    """Who the session's key belongs to (``local`` on a server without keys), or None."""
    try:
        return _service(request).auth.user_of(request.session.get("key"))
    except Unauthorized:
        return None


def _csrf(request: Request) -> str:
    token: str = request.session.setdefault("csrf", secrets.token_urlsafe(32))
    return token


def _page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(template).render(
        prefix=PREFIX, version=__version__, csrf=_csrf(request), **context
    )
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _login(request: Request, error: str | None = None, status: int = 401) -> HTMLResponse:
    return _page(request, "login.html", status, user=None, error=error)


def _problem(request: Request, user: str, exc: Exception) -> HTMLResponse:
    """A user's mistake as a page saying what to change (never a 500)."""
    status = 404 if isinstance(exc, NotFound) else 507 if isinstance(exc, StorageFull) else 400
    title = "Not found" if status == 404 else "Refused"
    return _page(request, "problem.html", status, user=user, title=title, message=message_of(exc))


async def _form(request: Request) -> dict[str, str] | None:
    """A small urlencoded form's fields (the first value of each), or None if it is
    larger than a console form can be."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return None
    fields = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=8)
    return {name: values[0] for name, values in fields.items()}


def _forged(request: Request, form: Mapping[str, str]) -> bool:
    """Whether a POST lacks the session's CSRF token (SameSite=Strict already keeps other
    sites' forms from carrying the cookie; the token also stops same-site ones)."""
    expected = request.session.get("csrf")
    given = form.get("csrf", "")
    return not expected or not hmac.compare_digest(str(expected).encode(), given.encode())


@router.get("")
@router.get("/")
async def index(request: Request) -> Response:
    user = _user(request)
    if user is None:
        return _login(request)
    service = _service(request)
    runs = service.training.training_runs(user)[::-1]  # newest first
    shown = runs[: service.settings.max_list_limit]
    by_run: dict[str, list[CheckpointRow]] = defaultdict(list)
    for row in service.training.all_checkpoints(user):
        by_run[row.model_id].append(row)
    return _page(
        request,
        "index.html",
        user=user,
        runs=shown,
        total=len(runs),
        checkpoints=by_run,
        last_steps=service.training.last_training_steps(user),
        queues=service.training.queues(),
    )


@router.get("/runs/{run_id}")
async def run_page(run_id: str, request: Request) -> Response:
    user = _user(request)
    if user is None:
        return _login(request)
    service = _service(request)
    try:
        run = service.training.training_run(user, run_id)
        checkpoints = service.training.checkpoints(user, run_id)
        steps = service.training.training_steps(user, run_id, MAX_POINTS)
    except (NotFound, UserInputError) as exc:
        return _problem(request, user, exc)
    curve = {
        "step": [s.step for s in steps],
        "loss_per_token": [s.loss_sum / s.loss_tokens if s.loss_tokens else None for s in steps],
    }
    return _page(
        request,
        "run.html",
        user=user,
        run=run,
        checkpoints=checkpoints,
        steps=steps,
        curve=curve,
    )


@router.get("/queue")
async def queue(request: Request) -> Response:
    """The live queues as JSON, which the index page polls."""
    if _user(request) is None:
        return JSONResponse({"detail": "log in to the console first"}, status_code=401)
    queues = _service(request).training.queues()
    return JSONResponse({name: asdict(state) for name, state in queues.items()}, headers=_HEADERS)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    key = (form or {}).get("key", "").strip()
    try:
        _service(request).auth.user_of(key)
    except Unauthorized:
        request.session.clear()
        return _login(request, "That key is unknown or revoked; check it and try again.")
    # A fresh session per login: a token from before the login is worth nothing after it.
    request.session.clear()
    request.session.update(key=key, csrf=secrets.token_urlsafe(32))
    return RedirectResponse(PREFIX, status_code=303, headers=_HEADERS)


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)
    if form is None or _forged(request, form):
        return _page(request, "problem.html", 403, user=None, **_STALE)
    request.session.clear()
    return RedirectResponse(PREFIX, status_code=303, headers=_HEADERS)


_STALE = {
    "title": "Refused",
    "message": "This form was stale or did not come from this console; reload the page and"
    " try again.",
}


@router.post("/runs/{run_id}/checkpoints/{kind}/{name}/{action}")
async def checkpoint_action(
    run_id: str, kind: str, name: str, action: str, request: Request
) -> Response:
    """Publish, unpublish or delete one of the user's checkpoints, through the same
    service calls (and ownership check) as the REST API."""
    user = _user(request)
    if user is None:
        return _login(request)
    form = await _form(request)
    if form is None or _forged(request, form):
        return _page(request, "problem.html", 403, user=user, **_STALE)
    service = _service(request)
    try:
        if action not in _ACTIONS:
            raise UserInputError(f"unknown action {action!r}; one of {', '.join(_ACTIONS)}")
        path = CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")
        if action == "delete":
            service.checkpoints.delete(user, path)
        else:
            service.checkpoints.publish(user, path, public=action == "publish")
    except (NotFound, UserInputError, StorageFull) as exc:
        return _problem(request, user, exc)
    back = f"{PREFIX}/runs/{urllib.parse.quote(run_id, safe='')}"
    return RedirectResponse(back, status_code=303, headers=_HEADERS)
