"""An engine: one base model plus the scheduler and thread that run all work on it."""

from __future__ import annotations

from dataclasses import dataclass

from treadle.engine.models import BaseModel
from treadle.service.scheduler import Scheduler


@dataclass
class Engine:
    base: BaseModel
    scheduler: Scheduler
