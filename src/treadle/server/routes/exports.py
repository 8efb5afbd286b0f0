"""External weights leave treadle: signed download URLs (``RestClient.
get_external_weights_urls``) and the downloads they point at."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from treadle.server.deps import ServiceDep, UserDep
from treadle.service.checkpoints import CheckpointPath
from treadle.service.exports import DOWNLOAD_PREFIX, Forbidden

router = APIRouter(prefix="/api/v1")


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
async def external_weights_urls(
    run_id: str, kind: str, name: str, request: Request, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    path = CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")
    # URLs point back at the address the caller reached this server by.
    urls, expires = service.exports.urls(user, path, str(request.base_url))
    return {"urls": urls, "expires": datetime.datetime.fromtimestamp(expires, datetime.UTC)}


# Needs no API key (the app lets DOWNLOAD_PREFIX through): the signature is the grant.
@router.get(DOWNLOAD_PREFIX.removeprefix("/api/v1") + "{run_id}/{name}/{file}")
async def download(
    run_id: str, name: str, file: str, expires: int, signature: str, service: ServiceDep
) -> Response:
    try:
        found = service.exports.open(run_id, name, file, expires, signature)
    except Forbidden as exc:
        return JSONResponse({"detail": str(exc)}, status_code=403)
    return FileResponse(found, media_type="application/octet-stream", filename=file)
