"""External weights: ``save_weights_external`` exports and their signed download URLs.

An export is a checkpoint of kind ``external_weights``: the adapter as a PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``, no optimizer state), or, when
the caller names age recipients, those files encrypted to them as ``NAME.age``. It lives
under ``{data_dir}/checkpoints`` like every checkpoint.

Its files leave treadle through URLs that treadle itself serves, signed like a bucket's
presigned URLs: whoever holds one may fetch that one file until it expires, without an
API key (the SDK's CLI and the cookbook fetch them with plain ``urllib``). A URL signs
the export's path, the file's name, its expiry and the export's creation time, so it
opens no other file, and an export saved again under the same name invalidates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pyrage

from treadle.engine.adapter_config import staging_folder
from treadle.errors import NotFound, StorageFull, UserInputError
from treadle.service.checkpoints import CheckpointPath, readable_checkpoint
from treadle.service.store import Store

KIND = "external_weights"
AGE_SUFFIX = ".age"
# The SDK's documented limit for save_weights_external.
MAX_RECIPIENTS = 10
# Where signed downloads are served; the app lets these through without an API key.
DOWNLOAD_PREFIX = "/api/v1/external_weights/"
_SECRET_FILE = "export_url_secret"

# The extension module ships no type information.
_age: Any = pyrage


def recipients_of(texts: list[str] | None) -> list[Any]:
    """age recipients from their text: native ``age1...`` keys or SSH public keys."""
    if not texts:
        return []
    if len(texts) > MAX_RECIPIENTS:
        raise UserInputError(f"{len(texts)} age_encryption_recipients; at most {MAX_RECIPIENTS}")
    recipients = []
    for text in texts:
        parse = _age.x25519.Recipient if text.startswith("age1") else _age.ssh.Recipient
        try:
            recipients.append(parse.from_str(text))
        except (_age.RecipientError, ValueError) as exc:
            raise UserInputError(
                f"age recipient {text[:80]!r} is not an age1... public key or an SSH public"
                f" key ({exc})"
            ) from exc
    return recipients


def write_export(folder: Path, save_adapter: Callable[[Path], int], recipients: list[Any]) -> int:
    """Write an export into ``folder``: ``save_adapter`` writes the PEFT folder, which is
    then encrypted to ``recipients`` (if any). Everything happens in a hidden staging
    folder renamed into place at the end, so no plaintext copy of an encrypted export is
    ever at ``folder``, and a crash leaves nothing that looks saved. Returns the bytes."""
    staging = staging_folder(folder)
    try:
        plain = staging / "plain"
        save_adapter(plain)
        done = plain
        if recipients:
            done = staging / "encrypted"
            done.mkdir()
            for file in sorted(plain.iterdir()):
                target = done / f"{file.name}{AGE_SUFFIX}"
                _age.encrypt_file(str(file), str(target), recipients)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(done, folder)
    except OSError as exc:
        raise StorageFull(
            f"could not write {folder.name}: {exc}; nothing was saved, export again once"
            " the server's data dir has room and is writable"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(f.stat().st_size for f in folder.iterdir())


def exported(folder: Path) -> bool:
    """Whether ``folder`` is a whole export (it is renamed into place only when whole, so
    one that is gone or emptied behind treadle's back is not)."""
    return folder.is_dir() and any(f.is_file() for f in folder.iterdir())


def _files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.is_file() and not f.is_symlink())


class Exports:
    """Signs download URLs for exports and checks them when they are used."""

    def __init__(self, store: Store, data_dir: Path, url_seconds: float) -> None:
        self._store = store
        self._data_dir = data_dir
        self._url_seconds = url_seconds
        self._secret: bytes | None = None

    def urls(self, user: str, path: CheckpointPath, base_url: str) -> tuple[dict[str, str], float]:
        """Signed URLs (one per file, keyed by its name) for an export ``user`` may read
        (their own, or a published one), and when they expire."""
        folder = readable_checkpoint(self._store, self._data_dir, user, path.tinker_path)
        if path.kind != KIND:
            raise UserInputError(
                f"{path.tinker_path} is not external weights: only checkpoints saved with"
                " save_weights_external have download URLs. Export a save_state checkpoint"
                " with `tinker checkpoint download` (it loads it and calls"
                " save_weights_external); sampler checkpoints cannot be downloaded"
            )
        expires = int(time.time() + self._url_seconds)
        row = self._store.checkpoint(path.tinker_path)
        assert row is not None  # readable_checkpoint found it
        urls = {}
        for file in _files(folder):
            signature = self._sign(path, file, expires, row.created_at)
            query = urlencode({"expires": expires, "signature": signature})
            where = "/".join(quote(part, safe="") for part in (path.model_id, path.name, file))
            urls[file] = f"{base_url.rstrip('/')}{DOWNLOAD_PREFIX}{where}?{query}"
        return urls, float(expires)

    def open(self, run_id: str, name: str, file: str, expires: int, signature: str) -> Path:
        """The file a signed URL names, if its signature holds and it has not expired."""
        try:
            path = CheckpointPath(run_id, KIND, name)
        except UserInputError as exc:
            raise NotFound(f"no external weights at this URL ({exc})") from exc
        row = self._store.checkpoint(path.tinker_path)
        if row is None:
            # Run ids hold 128 random bits: saying "none" reveals nothing guessable.
            raise NotFound(
                f"no external weights at {path.tinker_path} (deleted, expired, or never saved)"
            )
        expected = self._sign(path, file, expires, row.created_at)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise Forbidden(
                "this download URL's signature does not match (altered, for another file, or"
                " its export was saved again or deleted); get new URLs with"
                " RestClient.get_external_weights_urls"
            )
        if time.time() >= expires:
            raise Forbidden(
                "this download URL has expired; get new URLs with"
                " RestClient.get_external_weights_urls"
            )
        folder = path.folder(self._data_dir)
        if not folder.is_dir() or file not in _files(folder):
            raise NotFound(f"{path.tinker_path} holds no file {file!r} any more")
        return folder / file

    def _sign(self, path: CheckpointPath, file: str, expires: int, created: float) -> str:
        message = f"{path.tinker_path}\n{file}\n{expires}\n{created!r}".encode()
        return hmac.new(self._key(), message, hashlib.sha256).hexdigest()

    def _key(self) -> bytes:
        """The server's URL-signing secret: random, made on first use, kept in the data
        dir (readable by its owner only) so URLs survive a restart."""
        if self._secret is None:
            file = self._data_dir / _SECRET_FILE
            if not file.exists():
                # Written whole under another name, then linked into place: a reader never
                # sees a half-written secret, and of two first uses one secret wins.
                staged = file.with_name(f".{_SECRET_FILE}.{secrets.token_hex(8)}")
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(secrets.token_bytes(32))
                with contextlib.suppress(FileExistsError):
                    os.link(staged, file)
                staged.unlink()
            self._secret = file.read_bytes()
        return self._secret


class Forbidden(Exception):
    """A download URL that does not grant what it asks for; the message says why."""
