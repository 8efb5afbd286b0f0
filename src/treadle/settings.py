"""All of treadle's configuration in one object, filled from the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from treadle.engine.embedded import EMBEDDED_MODEL_NAME


def default_data_dir() -> Path:
    """``$TREADLE_DATA_DIR``, else ``~/.treadle``."""
    env = os.environ.get("TREADLE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".treadle"


@dataclass(frozen=True)
class ModelEntry:
    """A served base model: the ``name`` clients use and the ``source`` of its weights
    (``embedded``, a model folder, or a hub id in the local HF cache)."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelEntry:
        """``NAME=SOURCE``, or just ``SOURCE`` (then the name is the source itself)."""
        name, sep, source = text.partition("=")
        if not sep:
            return cls(text, text)
        if not name or not source:
            raise ValueError(f"--model {text!r}: expected NAME=PATH_OR_HUB_ID")
        return cls(name, source)


EMBEDDED_DEFAULT = ModelEntry(EMBEDDED_MODEL_NAME, "embedded")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    models: tuple[ModelEntry, ...] = (EMBEDDED_DEFAULT,)
    device: str = "cpu"
    # Tokens per packed forward/backward pass. Bounds activation memory (about 3.5 GB per
    # 1,000 tokens for a 135M model in fp32); larger requests run as several passes.
    max_tokens_per_pass: int = 2048
    max_lora_rank: int = 256
    # retrieve_future holds a poll this long before answering try_again (SDK timeout: 45 s).
    long_poll_seconds: float = 25.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "treadle.sqlite3"
