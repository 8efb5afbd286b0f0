"""Running the app under uvicorn, with a clean shutdown.

On SIGTERM or SIGINT the service drains first (:meth:`~treadle.service.service.Service.
drain`: no new work, what runs finishes or fails within the deadline, every pending
future is answered) while HTTP keeps answering polls; only then does uvicorn stop. A
second signal stops at once.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, deadline: float) -> None:
        super().__init__(config)
        self._app = app
        self._deadline = deadline
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(self._app.state, "service", None)
        if self._draining or service is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True

        def drain() -> None:
            try:
                service.drain(self._deadline)
            finally:
                self.should_exit = True

        threading.Thread(target=drain, name="shutdown", daemon=True).start()


def run(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str,
    shutdown_seconds: float,
    log_format: str = "text",
) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # JSON logs: uvicorn's records go through the root logger's JSON handler too (its
        # own config would print text lines among the JSON).
        log_config=uvicorn.config.LOGGING_CONFIG if log_format == "text" else None,
        # Long-polls hold connections for up to 25 s; keep idle ones open a little longer.
        timeout_keep_alive=30,
    )
    _DrainingServer(config, app, shutdown_seconds).run()
