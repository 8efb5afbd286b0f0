"""Size checks of what a client asks the server to store: metadata and names. Each cap
is a setting, and each refusal names it (``--max-metadata-bytes``,
``--max-name-chars``)."""

from __future__ import annotations

import json
from typing import Any

from treadle.errors import UserInputError


def check_metadata(metadata: dict[str, Any], cap: int) -> None:
    size = len(json.dumps(metadata))
    if size > cap:
        raise UserInputError(
            f"user_metadata is {size} bytes as JSON; at most {cap} (--max-metadata-bytes)"
        )


def check_names(cap: int, max_tags: int, tags: list[str], **names: str | None) -> None:
    """``tags`` and each named string (``project_id=...``) within ``cap`` characters."""
    if len(tags) > max_tags:
        raise UserInputError(f"{len(tags)} tags; at most {max_tags}")
    for what, text in [*(("a tag", tag) for tag in tags), *names.items()]:
        if text is not None and len(text) > cap:
            raise UserInputError(
                f"{what} is {len(text)} characters; at most {cap} (--max-name-chars)"
            )
