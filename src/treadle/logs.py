"""Logging for ``treadle serve``: readable text lines, or one JSON object per line
(``--log-format json``) for log pipelines (Loki, Elasticsearch, CloudWatch, …).

A JSON line holds the time (UTC, ISO 8601), level, logger and message, plus every field a
record was given with ``extra=`` at the top level: the request log
(:mod:`treadle.service.metrics`) gives each finished request's id, user, model, kind,
tokens, queue wait, run time and outcome that way. Torch-free, stdlib only.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from ``extra=``. uvicorn adds
# ``color_message`` (the message with ANSI colours) to its records: not for a log file.
_STANDARD = frozenset(
    [
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "color_message",
    ]
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # (default=str: an extra field JSON can't hold is written as its text, not lost)
        return json.dumps(entry, default=str)


def setup(level: str, log_format: str) -> None:
    """Every log record of the process, and every Python warning, goes to stderr at
    ``level`` and up, in ``log_format`` (one of :data:`FORMATS`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings too, as log records in that format
