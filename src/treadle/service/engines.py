"""An engine: one base model plus the scheduler and thread that run all work on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from treadle.engine.datum import UserInputError
from treadle.engine.models import BaseModel
from treadle.service.scheduler import Scheduler


@dataclass
class Engine:
    base: BaseModel
    scheduler: Scheduler


def find_engine(engines: Mapping[str, Engine], base_model: str) -> Engine:
    """The engine serving ``base_model``; a user error naming the served ones if none."""
    engine = engines.get(base_model)
    if engine is None:
        raise UserInputError(
            f"base model {base_model!r} is not served here; served models: {', '.join(engines)}"
        )
    return engine
