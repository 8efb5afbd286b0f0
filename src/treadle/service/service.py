"""Assembling the service: store, futures, sessions and one engine per served model."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from treadle.engine.models import load_base_model
from treadle.engine.process import claim_compute_threads
from treadle.engine.sample import Sampler
from treadle.service.engines import Engine
from treadle.service.futures import FutureStore
from treadle.service.sampling import Sampling
from treadle.service.scheduler import Scheduler
from treadle.service.sessions import Sessions
from treadle.service.store import Store
from treadle.service.training import Training, packed_runner, result_of
from treadle.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    store: Store
    futures: FutureStore
    sessions: Sessions
    training: Training
    sampling: Sampling

    @classmethod
    def start(cls, settings: Settings, loop: asyncio.AbstractEventLoop) -> Service:
        """Load every served model (blocking: run it off the event loop) and start their
        engine threads."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.db_path)
        futures = FutureStore(loop)
        engines: dict[str, Engine] = {}
        for entry in settings.models:
            base = load_base_model(entry.name, entry.source, settings.data_dir, settings.device)
            scheduler = Scheduler(
                entry.name,
                futures,
                packed_runner(base, settings.max_tokens_per_pass),
                result_of,
                Sampler(base, base.decode),
                claim_compute_threads,
            )
            scheduler.start()
            engines[entry.name] = Engine(base, scheduler)
        sampling = Sampling(engines, futures, settings.data_dir)
        training = Training(
            engines, futures, store, sampling, settings.data_dir, settings.max_lora_rank
        )
        return cls(settings, store, futures, Sessions(store), training, sampling)

    def stop(self) -> None:
        for engine in self.training.engines.values():
            engine.scheduler.stop()
        self.store.close()
