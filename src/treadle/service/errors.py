"""Errors the service raises for the server to turn into 4xx answers."""

from __future__ import annotations


class NotFound(LookupError):
    """An id the server does not know; the message says which and why."""
