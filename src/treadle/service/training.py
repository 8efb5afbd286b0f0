"""Training models: ``create_model``, ``forward_backward``, ``optim_step`` and friends.

Requests are checked here, before they are queued, so a bad one becomes a failed future
(category ``user``) that never touches model state; good ones go to the base model's
:class:`~treadle.service.engine_loop.EngineLoop` and run on its thread, through its
worker. Checks that need the model (a checkpoint's shape, pending gradients) run in the
request's turn, so a numbered request always takes its turn.
"""

from __future__ import annotations

import collections
import functools
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treadle.engine.adapter_config import complete, read_spec
from treadle.engine.custom_graph import CustomRun
from treadle.engine.custom_graph import check_data as check_custom_data
from treadle.errors import Failure, NotFound, UserInputError, failure_of
from treadle.service import audit, exports
from treadle.service.auth import owned
from treadle.service.checkpoints import (
    CheckpointPath,
    expiry,
    own_checkpoint,
    readable_checkpoint,
)
from treadle.service.custom_loss import CustomLosses
from treadle.service.engine_loop import Packable, Queued, QueueState, Rejected, Solo
from treadle.service.futures import About, FutureStore
from treadle.service.limits import check_metadata
from treadle.service.sampling import Sampling, sampler_id
from treadle.service.served import Adapter, ServedModel, TrainingModel, find_model
from treadle.service.sessions import Sessions
from treadle.service.store import CheckpointRow, Store, TrainingRunRow, TrainingStepRow
from treadle.service.usage import Usage
from treadle.settings import Settings
from treadle.types import AdamParams, Datum, ForwardBackwardResult, LoraSpec


@dataclass
class TrainingRun:
    model_id: str
    session_id: str
    base_model: str
    spec: LoraSpec
    user: str
    # What created it (the create call and its parameters): a retried create must ask for
    # the same; its answer is the first create's future.
    origin: tuple[Any, ...] = ()
    create_request_id: str = ""
    model: TrainingModel | None = None  # set on the engine loop by create_model
    created_at: float = field(default_factory=time.time)

    ended: bool = False  # its session ended: unloaded
    queued_tokens: int = 0  # of its forward/backward requests not yet running
    # The step being accumulated for the console's loss curve (touched on the engine loop
    # only): what its forward_backward results added up to since the last optim_step.
    steps: int = 0
    step_loss: float = 0.0
    step_loss_tokens: float = 0.0
    step_datums: int = 0

    def built(self) -> TrainingModel:
        if self.ended:
            raise NotFound(f"model {self.model_id} was unloaded when its session ended")
        if self.model is None:
            raise UserInputError(f"model {self.model_id} failed to be created")
        return self.model


class Training:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        futures: FutureStore,
        store: Store,
        sessions: Sessions,
        sampling: Sampling,
        usage: Usage,
        settings: Settings,
    ) -> None:
        self.models = models
        self._futures = futures
        self._store = store
        self._sessions = sessions
        self._usage = usage
        self._sampling = sampling
        self._data_dir = settings.data_dir
        self._max_rank = settings.max_lora_rank
        self._settings = settings
        self._runs: dict[str, TrainingRun] = {}
        self._tokens_lock = threading.Lock()
        self.custom_losses = CustomLosses(sessions, settings)

    def model(self, base_model: str) -> ServedModel:
        return find_model(self.models, base_model)

    def queues(self) -> dict[str, QueueState]:
        """What waits and runs on each base model's engine loop now (every user's)."""
        return {name: served.loop.queue_state() for name, served in self.models.items()}

    def run(self, user: str, model_id: str) -> TrainingRun:
        """``user``'s live training model; not found for anyone else's."""
        unknown = f"unknown model_id {model_id!r}; create it with create_model first"
        run = self._runs.get(model_id)
        if run is not None:
            owned(run.user, user, unknown)
            return run
        row = self._store.training_run(model_id)
        owned(row.user if row else None, user, unknown)
        raise NotFound(
            f"model {model_id} is no longer loaded (its session ended, it was unloaded, or"
            " the server restarted; adapters live in memory until saved); create a new one,"
            " or load it from a checkpoint"
        )

    # -- creating models --------------------------------------------------------------

    def create_model(
        self,
        user: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        rank: int,
        seed: int | None,
        train_attn: bool,
        train_mlp: bool,
        train_unembed: bool,
        optimizer: str,
        user_metadata: dict[str, Any],
    ) -> tuple[str, str]:
        """Returns ``(request_id, model_id)``; the adapter is built on the engine loop.
        Bad input is a failed future, as for every create."""

        flags = (train_attn, train_mlp, train_unembed)
        origin = ("create_model", base_model, rank, seed, flags, optimizer)

        def start(model_id: str) -> tuple[TrainingRun, ServedModel, Callable[[], Any]]:
            served = self._check_create(base_model, rank, optimizer)
            if not any(flags):
                raise UserInputError("set at least one of train_attn, train_mlp, train_unembed")
            check_metadata(user_metadata, self._settings.max_metadata_bytes)
            spec = LoraSpec(
                rank, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
            )
            run = TrainingRun(model_id, session_id, base_model, spec, user, origin)
            self._record(run, seed, user_metadata)

            def build() -> dict[str, str]:
                run.model = served.worker.new_model(spec, seed)
                return {"model_id": model_id, "type": "create_model"}

            return run, served, build

        return self._create(user, session_id, model_seq_id, origin, start)

    def create_from_state(
        self, user: str, session_id: str, model_seq_id: int, tinker_path: str, optimizer: bool
    ) -> tuple[str, str]:
        """``create_training_client_from_state``: a new model whose request 0 is this load
        (of ``user``'s own checkpoint, or a published one)."""
        origin = ("create_from_state", tinker_path, optimizer)

        def start(model_id: str) -> tuple[TrainingRun, ServedModel, Callable[[], Any]]:
            folder = readable_checkpoint(self._store, self._data_dir, user, tinker_path)
            spec, base_model = read_spec(folder)
            served = self.model(base_model or "")
            run = TrainingRun(model_id, session_id, served.info.name, spec, user, origin)
            self._record(run, None)

            def load() -> dict[str, str]:
                run.model = served.worker.load(folder, optimizer)
                return {"type": "load_weights", "path": tinker_path, "model_id": model_id}

            return run, served, load

        return self._create(user, session_id, model_seq_id, origin, start)

    def _create(
        self,
        user: str,
        session_id: str,
        model_seq_id: int,
        origin: tuple[Any, ...],
        start: Callable[[str], tuple[TrainingRun, ServedModel, Callable[[], Any]]],
    ) -> tuple[str, str]:
        """Make model ``session:train:seq`` in ``user``'s session with ``start``'s checks
        and first request. A retried create of a live model answers with the first
        create's future; a refused one changed nothing, so its retry is checked (and
        refused) again. Bad input of either kind is a failed future."""
        model_id = f"{session_id}:train:{model_seq_id}"
        try:
            self._sessions.check_live(session_id, user)
            live = self._runs.get(model_id)
            if live is not None:
                if live.origin != origin:
                    raise UserInputError(
                        f"model {model_id} exists with other parameters; create a new model"
                        " under another model_seq_id"
                    )
                return live.create_request_id, model_id
            if self._store.training_run(model_id) is not None:
                raise UserInputError(
                    f"model {model_id} was created before and is gone (unloaded, or lost in a"
                    " restart); create a new one under another model_seq_id"
                )
            mine = sum(1 for r in self._runs.values() if r.user == user)
            limit = self._settings.max_models_per_user
            if mine >= limit:
                raise UserInputError(
                    f"live training models per user: the limit is {limit} and you have {mine};"
                    " unload one (unload_model, or end its session) first"
                )
            run, served, first = start(model_id)
        except (UserInputError, NotFound) as exc:
            request_id = self._futures.create(user, about=About(origin[0], model_id=model_id))
            self._futures.resolve(request_id, failure_of(exc))
            return request_id, model_id
        self._runs[model_id] = run
        run.create_request_id = served.loop.call(user, model_id, first, kind=origin[0])
        served.loop.start_order(model_id, 1)
        return run.create_request_id, model_id

    def _record(
        self, run: TrainingRun, seed: int | None, user_metadata: dict[str, Any] | None = None
    ) -> None:
        self._store.add_training_run(
            TrainingRunRow(
                model_id=run.model_id,
                session_id=run.session_id,
                base_model=run.base_model,
                lora_rank=run.spec.rank,
                train_attn=run.spec.train_attn,
                train_mlp=run.spec.train_mlp,
                train_unembed=run.spec.train_unembed,
                seed=seed,
                user_metadata=user_metadata or {},
                created_at=run.created_at,
                last_request_time=run.created_at,
                user=run.user,
            )
        )
        audit.record(
            self._store,
            run.user,
            audit.TRAINING_RUN_CREATE,
            run.user,
            model_id=run.model_id,
            base_model=run.base_model,
            session_id=run.session_id,
        )

    def _check_create(self, base_model: str, rank: int, optimizer: str) -> ServedModel:
        served = self.model(base_model)
        if not 1 <= rank <= self._max_rank:
            raise UserInputError(f"LoRA rank must be between 1 and {self._max_rank}, got {rank}")
        if optimizer != "adamw":
            raise UserInputError(
                f"optimizer {optimizer!r} is not supported by treadle; use AdamW (the default)"
            )
        return served

    def get_info(self, user: str, model_id: str) -> dict[str, Any]:
        run = self.run(user, model_id)
        info = self.models[run.base_model].info
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {
                "arch": info.arch,
                "model_name": run.base_model,
                # A local folder: the client loads the tokenizer offline from it.
                "tokenizer_id": str(info.tokenizer_dir),
            },
            "is_lora": True,
            "lora_rank": run.spec.rank,
            "model_name": run.base_model,
            "optimizer_config": {"type": "adamw"},
        }

    def create_custom_loss(
        self, user: str, session_id: str, seq_id: int, body: dict[str, Any]
    ) -> str:
        """``create_custom_loss``: checked at once; the future holds the ``loss_id`` or
        what to change."""
        request_id = self._futures.create(user, about=About("create_custom_loss"))
        try:
            answer: Any = self.custom_losses.create(user, session_id, seq_id, body)
        except (UserInputError, NotFound) as exc:
            answer = failure_of(exc)
        self._futures.resolve(request_id, answer)
        return request_id

    # -- requests in seq_id order -------------------------------------------------------

    def forward_backward(
        self,
        user: str,
        model_id: str,
        seq_id: int | None,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str],
        forward_only: bool,
        problem: str | None = None,
    ) -> str:
        """Queue a forward(_backward); ``problem`` is a decoding error of its body, reported
        in the request's turn."""
        run = self.run(user, model_id)
        served = self.models[run.base_model]
        worker = served.worker

        tokens = sum(datum.num_tokens for datum in data)

        def make(request_id: str) -> Queued:
            if problem is not None:
                return Rejected(request_id, Failure(problem))
            try:
                cap = self._settings.max_datums_per_request
                if len(data) > cap:
                    raise UserInputError(
                        f"{len(data)} datums in one request; at most {cap}"
                        " (--max-datums-per-request): send them in several requests"
                    )
                if loss_fn == "custom":
                    loss = self._custom(user, run, data, loss_fn_config, request_id)
                else:
                    loss = worker.check_forward_backward(data, loss_fn, dict(loss_fn_config))
                self._queue_tokens(run, tokens)
            except (UserInputError, NotFound) as exc:
                return Rejected(request_id, failure_of(exc))

            def build() -> Any:
                with self._tokens_lock:  # on the engine loop; counted on the event loop
                    run.queued_tokens -= tokens  # running now
                work = worker.work(run.built(), data, loss, forward_only)  # (may be gone)
                kind = "forward" if forward_only else "trained"
                self._usage.add(user, run.base_model, kind, tokens)
                return work

            done = None if forward_only else functools.partial(_add_to_step, run, data)
            return Packable(request_id, build, user, tokens, done)

        kind = "forward" if forward_only else "forward_backward"
        return served.loop.submit(user, model_id, seq_id, make, kind, tokens)

    def _custom(
        self,
        user: str,
        run: TrainingRun,
        data: Sequence[Datum],
        config: Mapping[str, float | str],
        request_id: str,
    ) -> _CustomLoss:
        """A custom loss of the model's session, checked against ``data``."""
        graph = self.custom_losses.get(user, run.session_id, config)
        self.models[run.base_model].worker.check_forward_backward(data, "custom", {})
        check_custom_data(graph, data)
        return _CustomLoss(CustomRun(graph))

    def _queue_tokens(self, run: TrainingRun, tokens: int) -> None:
        """Count ``tokens`` as queued for ``run``'s user, within the user's limit (what
        an unloaded model had queued no longer counts)."""
        with self._tokens_lock:
            queued = sum(r.queued_tokens for r in self._runs.values() if r.user == run.user)
        limit = self._settings.max_queued_tokens_per_user
        if queued + tokens > limit:
            raise UserInputError(
                f"queued training tokens per user: the limit is {limit}, you have {queued}"
                f" queued and this request adds {tokens}; wait for results before sending more"
            )
        with self._tokens_lock:
            run.queued_tokens += tokens

    def optim_step(
        self,
        user: str,
        model_id: str,
        seq_id: int | None,
        params: AdamParams,
        optimizer: str = "adamw",
        problem: str | None = None,
    ) -> str:
        """Queue an AdamW step; ``problem`` is a decoding error, reported in its turn."""
        run = self.run(user, model_id)
        served = self.models[run.base_model]

        def step() -> dict[str, Any]:
            metrics = served.worker.optim_step(run.built(), params)
            self._record_step(run)
            return {"type": "optim_step", "metrics": metrics}

        def make(request_id: str) -> Queued:
            bad = problem or (
                f"optimizer {optimizer!r} is not supported by treadle; use AdamParams"
                if optimizer != "adamw"
                else _check_adam(params)
            )
            if bad:
                return Rejected(request_id, Failure(bad))
            return Solo(request_id, step)

        request_id = served.loop.submit(user, model_id, seq_id, make, "optim_step")
        self._store.touch_training_run(model_id)
        return request_id

    def _record_step(self, run: TrainingRun) -> None:
        """The step that just ended goes into the run's loss curve (SQLite, so curves
        outlive the server); the next one starts from zero."""
        run.steps += 1
        self._store.add_training_step(
            TrainingStepRow(
                run.model_id, run.steps, run.step_loss, run.step_loss_tokens, run.step_datums
            )
        )
        run.step_loss, run.step_loss_tokens, run.step_datums = 0.0, 0.0, 0

    def last_training_steps(self, user: str) -> dict[str, TrainingStepRow]:
        """The last recorded step of each of ``user``'s runs, by run id."""
        return self._store.last_training_steps(user)

    def training_steps(self, user: str, run_id: str, limit: int) -> list[TrainingStepRow]:
        """The loss curve of one of ``user``'s runs (at most ``limit`` points)."""
        self.training_run(user, run_id)
        return self._store.training_steps(run_id, limit)

    def save_state(
        self,
        user: str,
        model_id: str,
        seq_id: int | None,
        name: str,
        overwrite: bool,
        ttl_seconds: int | None = None,
    ) -> str:
        """``save_state``: adapter + AdamW state, to resume training later."""
        run = self.run(user, model_id)
        worker = self.models[run.base_model].worker

        def save() -> dict[str, str]:
            path = CheckpointPath(model_id, "weights", name)
            expires_at = expiry(ttl_seconds)
            model = run.built()
            folder = self._writable(path, overwrite)
            self._check_disk_quota(user)
            self._saved(run, path, worker.save_model(folder, model), expires_at)
            return {"type": "save_weights", "path": path.tinker_path}

        return self._in_order(run, seq_id, save, "save_weights")

    def save_for_sampler(
        self,
        user: str,
        model_id: str,
        seq_id: int | None,
        name: str | None,
        sampling_seq: int | None,
        ttl_seconds: int | None = None,
    ) -> str:
        """Named: a PEFT checkpoint on disk (sampled from memory while the server runs).
        Unnamed: an ephemeral sampling session over a snapshot of the current weights."""
        run = self.run(user, model_id)
        worker = self.models[run.base_model].worker

        def save() -> dict[str, str]:
            if name is None and sampling_seq is None:
                raise UserInputError(
                    "save_weights_for_sampler needs a path (name) or a sampling_session_seq_id"
                )
            path = CheckpointPath(model_id, "sampler_weights", name) if name else None
            expires_at = expiry(ttl_seconds)
            snapshot: Adapter = worker.snapshot(run.built())
            if path is not None:
                folder = self._writable(path, overwrite=True)
                self._check_disk_quota(user)
                self._saved(run, path, worker.save_adapter(folder, snapshot), expires_at)
                self._sampling.remember_snapshot(path.tinker_path, snapshot)
                return {"type": "save_weights_for_sampler", "path": path.tinker_path}
            assert sampling_seq is not None
            sampler = sampler_id(run.session_id, sampling_seq)
            self._sampling.add_ephemeral(user, sampler, run.base_model, model_id, snapshot)
            return {"type": "save_weights_for_sampler", "sampling_session_id": sampler}

        return self._in_order(run, seq_id, save, "save_weights_for_sampler")

    def save_external(
        self,
        user: str,
        model_id: str,
        seq_id: int | None,
        name: str,
        ttl_seconds: int | None,
        age_recipients: list[str] | None,
    ) -> str:
        """``save_weights_external``: the adapter as a PEFT folder to download (see
        :mod:`treadle.service.exports`), encrypted to ``age_recipients`` if given. Saving
        again under a name replaces the export."""
        run = self.run(user, model_id)
        worker = self.models[run.base_model].worker

        def save() -> dict[str, Any]:
            path = CheckpointPath(model_id, exports.KIND, name)
            expires_at = expiry(ttl_seconds)
            recipients = exports.recipients_of(age_recipients)
            snapshot = worker.snapshot(run.built())
            self._check_disk_quota(user)
            folder = path.folder(self._data_dir)
            size = exports.write_export(
                folder, lambda to: worker.save_adapter(to, snapshot), recipients
            )
            self._saved(run, path, size, expires_at)
            return {"type": "save_weights_external", "path": path.tinker_path, "size_bytes": size}

        return self._in_order(run, seq_id, save, "save_weights_external")

    def _writable(self, path: CheckpointPath, overwrite: bool) -> Path:
        folder = path.folder(self._data_dir)
        if folder.exists() and not overwrite:
            raise UserInputError(
                f"{path.tinker_path} exists; save under another name or pass overwrite=True"
            )
        return folder

    def _check_disk_quota(self, user: str) -> None:
        used = sum(row.size_bytes for row in self._store.checkpoints_of(user))
        limit = self._settings.max_checkpoint_bytes_per_user
        if used >= limit:
            raise UserInputError(
                f"checkpoint bytes on disk per user: the limit is {limit} and your checkpoints"
                f" take {used}; delete some first"
            )

    def _saved(
        self, run: TrainingRun, path: CheckpointPath, size: int, expires_at: float | None = None
    ) -> None:
        self._store.add_checkpoint(
            CheckpointRow(
                path.tinker_path,
                run.model_id,
                path.kind,
                path.name,
                time.time(),
                size,
                expires_at=expires_at,
            )
        )
        audit.record(
            self._store,
            run.user,
            audit.CHECKPOINT_SAVE,
            run.user,
            model_id=run.model_id,
            tinker_path=path.tinker_path,
            size_bytes=size,
            expires_at=expires_at,
        )

    def load_state(
        self, user: str, model_id: str, seq_id: int | None, tinker_path: str, optimizer: bool
    ) -> str:
        """``load_state``: replace an existing model's weights (and AdamW state)."""
        run = self.run(user, model_id)
        worker = self.models[run.base_model].worker

        def load() -> dict[str, str]:
            folder = readable_checkpoint(self._store, self._data_dir, user, tinker_path)
            _, trained_on = read_spec(folder)
            if trained_on != run.base_model:
                raise UserInputError(
                    f"{tinker_path} was trained on {trained_on}, not {run.base_model}"
                )
            loaded = worker.load(folder, optimizer)
            spec = worker.spec_of(loaded)
            if spec != run.spec:
                raise UserInputError(
                    f"{tinker_path} is a rank-{spec.rank} adapter of other modules than model"
                    f" {model_id} (rank {run.spec.rank}); load it with"
                    " create_training_client_from_state instead"
                )
            run.model = loaded
            return {"type": "load_weights", "path": tinker_path, "model_id": model_id}

        return self._in_order(run, seq_id, load, "load_weights")

    def delete_checkpoint(self, user: str, path: CheckpointPath) -> None:
        own_checkpoint(self._store, user, path)
        self._store.delete_checkpoint(path.tinker_path)
        folder = path.folder(self._data_dir)
        if folder.is_dir():
            shutil.rmtree(folder)
        self._sampling.forget_snapshot(path.tinker_path)

    def publish(self, user: str, path: CheckpointPath, public: bool) -> None:
        """Publish (any user may then read, load and sample it) or unpublish."""
        own_checkpoint(self._store, user, path)
        self._store.set_public(path.tinker_path, public)

    def _in_order(
        self, run: TrainingRun, seq_id: int | None, fn: Callable[[], Any], kind: str
    ) -> str:
        """Queue ``fn`` (a request of ``kind``) in the model's seq_id order. Its checks run
        there too: a request the SDK numbered must take its turn even when it fails, or
        every later request of the model would wait for the gap."""
        loop = self.models[run.base_model].loop
        return loop.submit(
            run.user, run.model_id, seq_id, lambda request_id: Solo(request_id, fn), kind
        )

    def unload(self, user: str, model_id: str) -> str:
        run = self.run(user, model_id)
        loop = self.models[run.base_model].loop

        def drop() -> dict[str, str]:
            self._runs.pop(model_id, None)
            loop.forget(model_id)
            return {"model_id": model_id, "type": "unload_model"}

        return loop.submit(
            user, model_id, None, lambda request_id: Solo(request_id, drop), "unload_model"
        )

    def end_session(self, session_id: str) -> None:
        """Unload every model of a session that ended; requests still queued for them
        fail as unloaded."""
        self.custom_losses.end_session(session_id)
        for run in [r for r in self._runs.values() if r.session_id == session_id]:
            run.ended, run.model = True, None
            del self._runs[run.model_id]
            self.models[run.base_model].loop.forget(run.model_id)
            self._sampling.forget_run(run.model_id)

    def live_models(self) -> dict[str, int]:
        """Training models loaded now, by base model (for the metrics)."""
        return dict(collections.Counter(run.base_model for run in list(self._runs.values())))

    # -- what the REST API lists --------------------------------------------------------

    def runs_of(self, user: str, session_id: str) -> list[str]:
        self._sessions.check(session_id, user)
        return [run.model_id for run in self._runs.values() if run.session_id == session_id]

    def training_runs(self, user: str) -> list[TrainingRunRow]:
        return self._store.training_runs(user)

    def training_run(self, user: str, run_id: str) -> TrainingRunRow:
        row = self._store.training_run(run_id)
        owned(row.user if row else None, user, f"unknown training run {run_id!r}")
        assert row is not None
        return row

    def checkpoints(self, user: str, run_id: str) -> list[CheckpointRow]:
        """The checkpoints of one of ``user``'s runs that are whole on disk."""
        self.training_run(user, run_id)
        return self._on_disk(self._store.checkpoints(run_id))

    def all_checkpoints(self, user: str) -> list[CheckpointRow]:
        return self._on_disk(self._store.checkpoints_of(user))

    def _on_disk(self, rows: list[CheckpointRow]) -> list[CheckpointRow]:
        """Rows whose folder is whole: one deleted or damaged behind treadle's back is not
        listed (loading it is refused with a clear error anyway)."""
        return [
            row
            for row in rows
            if (exports.exported if row.kind == exports.KIND else complete)(
                CheckpointPath.parse(row.tinker_path).folder(self._data_dir)
            )
        ]

    def checkpoint_storage(self, user: str) -> list[tuple[str | None, int, int]]:
        """What ``user``'s checkpoints take on disk (the bytes the quota counts), by
        project: ``(project_id, count, bytes)``."""
        return self._store.checkpoint_storage(user)

    def weights_info(self, user: str, tinker_path: str) -> TrainingRunRow:
        """The run behind a checkpoint ``user`` may read (their own, or a published one)."""
        readable_checkpoint(self._store, self._data_dir, user, tinker_path)
        row = self._store.training_run(CheckpointPath.parse(tinker_path).model_id)
        assert row is not None
        return row


def _add_to_step(run: TrainingRun, data: Sequence[Datum], result: ForwardBackwardResult) -> None:
    """Add a forward_backward's result to its run's current step. A step's loss per token
    is its summed ``loss:sum`` over its loss tokens: the sum of the ``weights`` of datums
    that have them (cross-entropy's mean NLL), every target position of those that don't
    (the RL losses weigh positions by advantages, which are no count)."""
    run.step_loss += result.metrics.get("loss:sum", 0.0)
    run.step_loss_tokens += sum(
        float(datum.inputs["weights"].sum()) if "weights" in datum.inputs else datum.num_tokens
        for datum in data
    )
    run.step_datums += len(data)


@dataclass(frozen=True)
class _CustomLoss:
    """A checked custom loss in the shape of the worker's checked loss choice."""

    spec: CustomRun
    config: dict[str, float] = field(default_factory=dict)


def _check_adam(params: AdamParams) -> str | None:
    values = (params.learning_rate, params.beta1, params.beta2, params.eps, params.weight_decay)
    if not all(v == v and abs(v) != float("inf") for v in (*values, params.grad_clip_norm)):
        return "AdamParams must be finite numbers"
    if params.learning_rate < 0:
        return f"learning_rate must be >= 0, got {params.learning_rate}"
    if not (0 <= params.beta1 < 1 and 0 <= params.beta2 < 1):
        return f"beta1 and beta2 must be in [0, 1), got {params.beta1}, {params.beta2}"
    if params.eps < 0 or params.weight_decay < 0 or params.grad_clip_norm < 0:
        return "eps, weight_decay and grad_clip_norm must be >= 0"
    return None
