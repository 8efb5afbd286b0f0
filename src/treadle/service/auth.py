"""API keys and who is calling.

A user is a name; a key (``tml-`` and 256 random bits) belongs to one user. Keys live in
the data dir's SQLite as SHA-256 hashes only (a fast hash suffices: the keys are random,
so there is nothing to guess by brute force). ``treadle keys`` creates, lists and revokes
them, also while a server runs: the server re-reads what it knows of a key at most a
second after it last looked, so a new or revoked key takes effect within a second.

With no active key at all, a server bound to loopback serves one user, ``local``, to
whoever connects (the README's demo needs no step); bound to any other address it
refuses to start (:func:`open_to_network_without_keys`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time

from treadle.errors import NotFound
from treadle.service.store import KeyRow, Store

LOCAL_USER = "local"
KEY_PREFIX = "tml-"
# How long an answer about a key (or about whether keys exist) is trusted.
RECHECK_SECONDS = 1.0
# Characters of a key that `treadle keys list` shows, and `revoke` accepts.
SHOWN = len(KEY_PREFIX) + 8

HOW_TO_GET_A_KEY = (
    "ask the server's operator for a key (`treadle keys create --user NAME` on the server)"
    " and set TINKER_API_KEY to it"
)


def owned(owner: str | None, user: str, what: str) -> None:
    """The one ownership check: anything ``user`` does not own (``owner`` None: it does
    not exist) is "not found", so another user's ids reveal nothing, not even that they
    exist."""
    if owner != user:
        raise NotFound(what)


class Unauthorized(Exception):
    """A request without a valid key; the message says how to get one."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, user: str) -> str:
    """A new key for ``user``; only its hash is stored, so this is the one time it is seen."""
    if not user or not user.isprintable() or len(user) > 64:
        raise ValueError("a user name is 1-64 printable characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    store.add_key(_hash(key), key[:SHOWN], user)
    return key


def list_keys(store: Store) -> list[KeyRow]:
    return store.keys()


def revoke_key(store: Store, key_or_prefix: str) -> list[KeyRow]:
    """Revoke a key given whole or by the prefix ``list_keys`` shows."""
    return store.revoke_keys(_hash(key_or_prefix), key_or_prefix)


def open_to_network_without_keys(host: str, store: Store) -> bool:
    """Whether serving ``host`` would let anyone on the network in: a non-loopback
    address with no active key."""
    if host == "localhost":
        return False
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return not loopback and not store.has_active_keys()


class Auth:
    """Answers "which user holds this key?" for every request, from a cache that is at
    most :data:`RECHECK_SECONDS` old."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._users: dict[str, tuple[str | None, float]] = {}  # key hash -> (user, checked)
        self._keys_exist: tuple[bool, float] = (False, -RECHECK_SECONDS)

    def user_of(self, key: str | None) -> str:
        """The user a request with this ``X-API-Key`` acts as."""
        now = time.monotonic()
        if not self._any_keys(now):
            return LOCAL_USER
        if not key:
            raise Unauthorized(f"this server needs an API key (X-API-Key); {HOW_TO_GET_A_KEY}")
        digest = _hash(key)
        with self._lock:
            cached = self._users.get(digest)
        if cached is None or now - cached[1] > RECHECK_SECONDS:
            cached = (self._store.user_of_key(digest), now)
            with self._lock:
                if len(self._users) > 4096:  # bounded: old entries are re-read anyway
                    self._users.clear()
                self._users[digest] = cached
        if cached[0] is None:
            raise Unauthorized(f"unknown or revoked API key; {HOW_TO_GET_A_KEY}")
        return cached[0]

    def _any_keys(self, now: float) -> bool:
        exist, checked = self._keys_exist
        if now - checked > RECHECK_SECONDS:
            exist = self._store.has_active_keys()
            self._keys_exist = (exist, now)
        return exist
