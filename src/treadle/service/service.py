"""Assembling the service: store, futures, sessions, and a worker and engine loop per
served base model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treadle.errors import Failure, StorageFull
from treadle.service.auth import Auth
from treadle.service.checkpoints import Checkpoints, remove_interrupted_saves
from treadle.service.engine_loop import EngineLoop
from treadle.service.exports import Exports
from treadle.service.futures import FutureStore
from treadle.service.metrics import Metrics
from treadle.service.sampling import Sampling
from treadle.service.served import ServedModel, Worker
from treadle.service.sessions import Sessions
from treadle.service.store import Store
from treadle.service.trace import Traces
from treadle.service.training import Training
from treadle.service.usage import Usage
from treadle.settings import ModelEntry, Settings

log = logging.getLogger(__name__)

# Loads a served model into a worker (blocking); the engine's is
# treadle.engine.worker.load_worker. Passed in, so this layer never imports torch.
LoadWorker = Callable[[ModelEntry, Settings], Worker]

# After a shutdown answered everything, how long clients have to fetch the answers.
_FETCH_GRACE_SECONDS = 5.0
# Sessions that end within this long of each other share one memory release.
_RELEASE_DELAY_SECONDS = 0.5


@dataclass
class Service:
    settings: Settings
    store: Store
    futures: FutureStore
    sessions: Sessions
    training: Training
    sampling: Sampling
    models: dict[str, ServedModel]
    auth: Auth
    usage: Usage
    exports: Exports
    checkpoints: Checkpoints
    traces: Traces
    metrics: Metrics
    closing: bool = False  # shutting down: new work is refused (see drain)
    _stopped: bool = False
    _releasing: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(
        cls, settings: Settings, loop: asyncio.AbstractEventLoop, load_worker: LoadWorker
    ) -> Service:
        """Load every served model (blocking: run it off the event loop) and start their
        engine loops."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        remove_interrupted_saves(settings.data_dir)
        store = Store(settings.db_path)
        metrics = Metrics()
        futures = FutureStore(loop, settings.future_retention_seconds, metrics)
        models: dict[str, ServedModel] = {}
        traces = Traces(settings.trace_spans_per_session, settings.trace_sessions)
        for entry in settings.models:
            worker = load_worker(entry, settings)
            # Only a convenience for `treadle adapters import`: a full disk must not stop
            # the server from starting.
            with contextlib.suppress(StorageFull):
                store.add_served_model(entry.name, str(worker.info.tokenizer_dir))
            engine_loop = EngineLoop(
                worker,
                futures,
                settings.retry_window,
                settings.cycle_tokens,
                settings.decode_share,
                settings.sampler_max_batch,
                traces,
                metrics,
            )
            engine_loop.start()
            models[entry.name] = ServedModel(worker, engine_loop)
        sessions = Sessions(store, settings)
        usage = Usage(store)
        sampling = Sampling(models, futures, store, sessions, usage, settings)
        training = Training(models, futures, store, sessions, sampling, usage, settings)
        exports = Exports(store, settings.data_dir, settings.export_url_seconds)
        checkpoints = Checkpoints(store, sessions, training, settings)
        # Those whose expiry came while no server ran go before anyone can load them.
        checkpoints.expire_due()
        _watch(metrics, models, training, sampling, sessions)
        return cls(
            settings,
            store,
            futures,
            sessions,
            training,
            sampling,
            models,
            Auth(store),
            usage,
            exports,
            checkpoints,
            traces,
            metrics,
        )

    def drain(self, deadline: float) -> None:
        """Shut down cleanly (SIGTERM/SIGINT; blocking): take no new work, let what is
        queued and running finish within ``deadline`` seconds, answer everything still
        pending after that with a server failure, give clients a moment to fetch their
        answers. :meth:`stop` follows once the HTTP server has closed."""
        self.closing = True
        log.info("shutting down: finishing %d pending requests", self.futures.pending())
        ends = time.monotonic() + deadline
        while self.futures.pending() and time.monotonic() < ends:
            time.sleep(0.05)
        if self.futures.pending():
            log.warning(
                "shutdown deadline (%.0f s) passed: failing %d requests",
                deadline,
                self.futures.pending(),
            )
            for served in self.models.values():
                served.loop.abort()
            message = "the server shut down before this request finished; send it again"
            self.futures.fail_pending(Failure(message, "server"))
        # Long-polls return as soon as their answer is set; wait for them briefly.
        fetch_until = time.monotonic() + _FETCH_GRACE_SECONDS
        while self.futures.unfetched() and time.monotonic() < fetch_until:
            time.sleep(0.05)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for served in self.models.values():
            served.loop.stop()
        self.usage.flush()
        self.store.close()

    def finish_session(self, user: str, session_id: str, reason: str) -> None:
        """``ServiceClient.close``: the session ends and what it held is unloaded."""
        self.sessions.check(session_id, user)
        self.end_session(session_id, reason)

    def end_session(self, session_id: str, reason: str) -> None:
        self.sessions.finish(session_id, reason)
        self.training.end_session(session_id)
        self.sampling.end_session(session_id)
        self._release_memory_soon()

    def _release_memory_soon(self) -> None:
        """Return what the ended session held to the OS, off the event loop (a collection
        and a trim of GBs take seconds) and once for sessions that end together."""
        if not self.models or self._releasing.is_set():
            return
        self._releasing.set()
        # One process, one allocator: any worker can trim it.
        worker = next(iter(self.models.values())).worker

        def release() -> None:
            time.sleep(_RELEASE_DELAY_SECONDS)
            self._releasing.clear()
            worker.release_memory()

        threading.Thread(target=release, name="release-memory", daemon=True).start()

    def tick(self) -> None:
        """Housekeeping every few seconds: silent sessions end, usage is written,
        checkpoints whose expiry came are deleted."""
        self.end_expired_sessions()
        self.checkpoints.expire_due()
        self.usage.flush()

    def end_expired_sessions(self) -> list[str]:
        """End every session whose client went silent (no heartbeat for the timeout)."""
        expired = self.sessions.expired(self.settings.session_timeout_seconds)
        for session_id in expired:
            log.info(
                "session %s sent no heartbeat for %.0f s: ending it",
                session_id,
                self.settings.session_timeout_seconds,
            )
            self.end_session(session_id, "expired")
        return expired

    def capabilities(self) -> list[dict[str, Any]]:
        return [
            {
                "model_name": name,
                "max_context_length": served.info.max_context,
                "trainable": True,
                "sampleable": True,
            }
            for name, served in self.models.items()
        ]


def _watch(
    metrics: Metrics,
    models: dict[str, ServedModel],
    training: Training,
    sampling: Sampling,
    sessions: Sessions,
) -> None:
    """The live gauges, read at each scrape; every served model has a value, 0 included,
    so a series never vanishes while its model is served."""

    def per_model(counts: dict[str, int]) -> dict[tuple[str, ...], float]:
        return {(name,): counts.get(name, 0) for name in models}

    def queues() -> dict[tuple[str, ...], float]:
        values: dict[tuple[str, ...], float] = {}
        for name, served in models.items():
            state = served.loop.queue_state()
            values[(name, "training")] = state.requests
            values[(name, "sample")] = state.samples_waiting
        return values

    def queue_tokens() -> dict[tuple[str, ...], float]:
        return {(name,): served.loop.queue_state().tokens for name, served in models.items()}

    def decoding() -> dict[tuple[str, ...], float]:
        return {
            (name,): served.loop.queue_state().sequences_decoding for name, served in models.items()
        }

    metrics.live(
        "treadle_queue_requests",
        "Requests waiting to run: training requests released in seq_id order, and samples"
        " waiting for room in the sampler.",
        ("model", "kind"),
        queues,
    )
    metrics.live(
        "treadle_queue_tokens",
        "Datum tokens of the forward/backward requests waiting to run.",
        ("model",),
        queue_tokens,
    )
    metrics.live(
        "treadle_decoding_sequences",
        "Sequences the sampler is decoding (each sample has num_samples of them).",
        ("model",),
        decoding,
    )
    metrics.live(
        "treadle_training_models",
        "Training models (LoRA adapters with their optimizer state) loaded.",
        ("model",),
        lambda: per_model(training.live_models()),
    )
    metrics.live(
        "treadle_samplers",
        "Sampling sessions live, ephemeral ones included.",
        ("model",),
        lambda: per_model(sampling.live_samplers()),
    )
    metrics.live(
        "treadle_sessions",
        "Client sessions (ServiceClients) live.",
        (),
        lambda: {(): sessions.live()},
    )
