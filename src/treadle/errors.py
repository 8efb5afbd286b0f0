"""Errors a request can end in, and the one place that turns an exception into the
SDK's failure (``{"error": message, "category": "user" | "server"}``).

Every layer raises these; only :func:`failure_of` decides what a user is told. Input a
user can fix is a :class:`UserInputError` (or a subclass, such as the engine's
checkpoint errors), an id the server does not know a :class:`NotFound`; anything else is
treadle's own fault and is logged with its traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class UserInputError(ValueError):
    """Input a user can fix; the message says what to change."""


class NotFound(LookupError):
    """An id the server does not know; the message says which and why."""


class StorageFull(OSError):
    """The data dir took no more (disk full, read-only): the server's condition, not the
    request's fault; nothing was changed, and the same request works once there is room."""


@dataclass(frozen=True)
class Failure:
    """A request that failed; ``category`` is Tinker's: ``user`` (fix the input) or
    ``server`` (treadle's fault; the SDK reports it as such)."""

    message: str
    category: str = "user"


def message_of(exc: BaseException) -> str:
    """The text a user sees: the exception's first argument, without repr quoting."""
    return str(exc.args[0]) if exc.args else str(exc)


def failure_of(exc: BaseException, where: str = "treadle") -> Failure:
    """The failure a request that raised ``exc`` reports; server faults are logged."""
    if isinstance(exc, UserInputError | NotFound):
        return Failure(message_of(exc), "user")
    if isinstance(exc, StorageFull):
        log.warning("%s: %s", where, exc)
        return Failure(str(exc), "server")
    log.error("%s failed a request", where, exc_info=exc)
    return Failure(f"{where} error: {type(exc).__name__}: {exc}", "server")
