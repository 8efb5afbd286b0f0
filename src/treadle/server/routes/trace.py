"""``export_session_trace``: a session's timeline as a Perfetto-readable trace.

The SDK polls ``trace_export`` until it is ready, then downloads the URL without its API
key (as from a signed storage URL), so the URL carries an unguessable token instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from treadle.errors import NotFound
from treadle.server.deps import ServiceDep, UserDep

router = APIRouter(prefix="/api/v1")

# Downloads under this path need no API key: the token in the URL is the grant.
DOWNLOAD_PREFIX = "/api/v1/trace_downloads/"


@router.get("/sessions/{session_id}/trace_export")
async def trace_export(
    session_id: str, request: Request, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    service.sessions.check(session_id, user)
    # Built from memory at download time: ready at once.
    token = service.traces.link(session_id)
    return {"status": "ready", "url": str(request.url_for("download_trace", token=token))}


@router.get("/trace_downloads/{token}", name="download_trace")
async def download_trace(token: str, service: ServiceDep) -> Response:
    session_id = service.traces.linked_session(token)
    if session_id is None:
        raise NotFound("unknown or expired trace link (links last an hour); export it again")
    filename = f"{session_id.replace(':', '_')}.json"
    waiting = [
        span
        for served in service.models.values()
        for span in served.loop.queued_samples(session_id)
    ]
    return Response(
        service.traces.export(session_id, waiting),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
