"""Training models: ``create_model``, ``forward_backward``, ``optim_step`` and friends.

Requests are checked here, before they are queued, so a bad one becomes a failed future
(category ``user``) that never touches model state; good ones go to the base model's
:class:`~treadle.service.scheduler.Scheduler` and run on its engine thread.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from treadle.engine.checkpoint import (
    CheckpointError,
    load_adapter,
    load_optimizer_state,
    read_spec,
    save_adapter,
)
from treadle.engine.datum import (
    Datum,
    UserInputError,
    check_data,
    loss_spec,
    resolve_config,
)
from treadle.engine.lora import Adapter, LoraSpec, new_adapter
from treadle.engine.models import BaseModel
from treadle.engine.train import (
    AdamParams,
    ForwardBackwardOutcome,
    ForwardBackwardWork,
    LoraModel,
    forward_backward,
    optim_step,
)
from treadle.service.checkpoints import CheckpointPath, check_name
from treadle.service.engines import Engine, find_engine
from treadle.service.errors import NotFound
from treadle.service.futures import Failure, FutureStore
from treadle.service.sampling import Sampling
from treadle.service.scheduler import Op, PackedRunner
from treadle.service.store import CheckpointRow, Store, TrainingRunRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardBackwardResult:
    """What ``forward``/``forward_backward`` return: per-datum target logprobs and metrics
    (``name:reduction`` keys, as the SDK requires)."""

    logprobs: list[Any]  # numpy float32 arrays, one per datum
    metrics: dict[str, float]


@dataclass
class TrainingRun:
    model_id: str
    session_id: str
    base_model: str
    spec: LoraSpec
    model: LoraModel | None = None  # set on the engine thread by create_model
    created_at: float = field(default_factory=time.time)


class Training:
    def __init__(
        self,
        engines: Mapping[str, Engine],
        futures: FutureStore,
        store: Store,
        sampling: Sampling,
        data_dir: Path,
        max_lora_rank: int,
    ) -> None:
        self.engines = engines
        self._futures = futures
        self._store = store
        self._sampling = sampling
        self._data_dir = data_dir
        self._max_rank = max_lora_rank
        self._runs: dict[str, TrainingRun] = {}
        self._creates: dict[str, str] = {}  # model_id -> request id of its create_model

    def engine(self, base_model: str) -> Engine:
        return find_engine(self.engines, base_model)

    def run(self, model_id: str) -> TrainingRun:
        run = self._runs.get(model_id)
        if run is not None:
            return run
        if self._store.training_run(model_id) is not None:
            raise NotFound(
                f"model {model_id} was lost when the server restarted (adapters live in"
                " memory until saved); create a new one, or load it from a checkpoint"
            )
        raise NotFound(f"unknown model_id {model_id!r}; create it with create_model first")

    def create_model(
        self,
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
        """Returns ``(request_id, model_id)``; the adapter is built on the engine thread."""
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self._creates:
            return self._creates[model_id], model_id
        try:
            engine = self._check_create(session_id, base_model, rank, optimizer)
            if not (train_attn or train_mlp or train_unembed):
                raise UserInputError("set at least one of train_attn, train_mlp, train_unembed")
        except UserInputError as exc:
            request_id = self._futures.create("create_model")
            self._futures.resolve(request_id, Failure(str(exc)))
            return request_id, model_id
        spec = LoraSpec(
            rank, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
        )
        run = TrainingRun(model_id, session_id, base_model, spec)
        self._runs[model_id] = run
        self._record(run, seed, user_metadata)

        def build() -> dict[str, str]:
            adapter = new_adapter(spec, engine.base.layers, seed)
            run.model = LoraModel.create(adapter)
            return {"model_id": model_id, "type": "create_model"}

        request_id = engine.scheduler.submit(
            model_id, None, "create_model", lambda rid: Op(rid, call=build)
        )
        engine.scheduler.start_order(model_id, 1)
        self._creates[model_id] = request_id
        return request_id, model_id

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
            )
        )

    def _check_create(self, session_id: str, base_model: str, rank: int, optimizer: str) -> Engine:
        if not self._store.has_session(session_id):
            raise UserInputError(f"unknown session {session_id!r}; call create_session first")
        engine = self.engine(base_model)
        if not 1 <= rank <= self._max_rank:
            raise UserInputError(f"LoRA rank must be between 1 and {self._max_rank}, got {rank}")
        if optimizer != "adamw":
            raise UserInputError(
                f"optimizer {optimizer!r} is not supported by treadle; use AdamW (the default)"
            )
        return engine

    def get_info(self, model_id: str) -> dict[str, Any]:
        run = self.run(model_id)
        base = self.engines[run.base_model].base
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {
                "arch": base.arch,
                "model_name": run.base_model,
                # A local folder: the client loads the tokenizer offline from it.
                "tokenizer_id": str(base.tokenizer_dir),
            },
            "is_lora": True,
            "lora_rank": run.spec.rank,
            "model_name": run.base_model,
            "optimizer_config": {"type": "adamw"},
        }

    def forward_backward(
        self,
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
        run = self.run(model_id)
        engine = self.engines[run.base_model]
        kind = "forward" if forward_only else "forward_backward"

        def make_op(request_id: str) -> Op:
            if problem is not None:
                return Op(request_id, failure=Failure(problem))
            try:
                spec = loss_spec(loss_fn)
                config = resolve_config(spec, loss_fn, loss_fn_config)
                check_data(data, spec, loss_fn, engine.base.vocab_size, engine.base.max_context)
            except UserInputError as exc:
                return Op(request_id, failure=Failure(str(exc)))
            return Op(
                request_id,
                work=lambda: ForwardBackwardWork(_built(run), data, spec, config, forward_only),
            )

        return engine.scheduler.submit(model_id, seq_id, kind, make_op)

    def optim_step(
        self,
        model_id: str,
        seq_id: int | None,
        params: AdamParams,
        optimizer: str = "adamw",
        problem: str | None = None,
    ) -> str:
        """Queue an AdamW step; ``problem`` is a decoding error, reported in its turn."""
        run = self.run(model_id)
        engine = self.engines[run.base_model]

        def step() -> dict[str, Any]:
            model = _built(run)
            if model.pending_datums == 0:
                raise UserInputError(
                    "optim_step with no gradients: call forward_backward since the last"
                    " optim_step first (forward() computes no gradients)"
                )
            metrics = optim_step(model, params)
            return {"type": "optim_step", "metrics": metrics}

        def make_op(request_id: str) -> Op:
            bad = problem or (
                f"optimizer {optimizer!r} is not supported by treadle; use AdamParams"
                if optimizer != "adamw"
                else _check_adam(params)
            )
            if bad:
                return Op(request_id, failure=Failure(bad))
            return Op(request_id, call=step)

        request_id = engine.scheduler.submit(model_id, seq_id, "optim_step", make_op)
        self._store.touch_training_run(model_id)
        return request_id

    def save_state(self, model_id: str, seq_id: int | None, name: str, overwrite: bool) -> str:
        """``save_state``: adapter + AdamW state, to resume training later."""
        run = self.run(model_id)

        def save() -> dict[str, str]:
            path = CheckpointPath(model_id, "weights", check_name(name))
            model = _built(run)
            self._write(run, path, model.adapter, model.optimizer, overwrite)
            return {"type": "save_weights", "path": path.tinker_path}

        return self._in_order(run, seq_id, "save_weights", save)

    def save_for_sampler(
        self, model_id: str, seq_id: int | None, name: str | None, sampling_seq: int | None
    ) -> str:
        """Named: a PEFT checkpoint on disk (sampled from memory while the server runs).
        Unnamed: an ephemeral sampling session over a snapshot of the current weights."""
        run = self.run(model_id)

        def save() -> dict[str, str]:
            if name is None and sampling_seq is None:
                raise UserInputError(
                    "save_weights_for_sampler needs a path (name) or a sampling_session_seq_id"
                )
            path = CheckpointPath(model_id, "sampler_weights", check_name(name)) if name else None
            snapshot = _built(run).adapter.detached()
            if path is not None:
                self._write(run, path, snapshot, None, overwrite=True)
                self._sampling.remember_snapshot(path.tinker_path, snapshot)
                return {"type": "save_weights_for_sampler", "path": path.tinker_path}
            sampler_id = f"{run.session_id}:sample:{sampling_seq}"
            self._sampling.add_ephemeral(sampler_id, run.base_model, model_id, snapshot)
            return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

        return self._in_order(run, seq_id, "save_weights_for_sampler", save)

    def _write(
        self,
        run: TrainingRun,
        path: CheckpointPath,
        adapter: Adapter,
        optimizer: torch.optim.Optimizer | None,
        overwrite: bool,
    ) -> None:
        folder = path.folder(self._data_dir)
        if folder.exists() and not overwrite:
            raise UserInputError(
                f"{path.tinker_path} exists; save under another name or pass overwrite=True"
            )
        size = save_adapter(adapter, folder, run.base_model, optimizer)
        self._store.add_checkpoint(
            CheckpointRow(path.tinker_path, run.model_id, path.kind, path.name, time.time(), size)
        )

    def load_state(
        self, model_id: str, seq_id: int | None, tinker_path: str, optimizer: bool
    ) -> str:
        """``load_state``: replace an existing model's weights (and AdamW state)."""
        run = self.run(model_id)
        engine = self.engines[run.base_model]

        def load() -> dict[str, str]:
            folder = self._checkpoint_folder(tinker_path, run.base_model)
            loaded = _load(folder, engine, optimizer)
            if loaded.adapter.spec != run.spec:
                raise UserInputError(
                    f"{tinker_path} is a rank-{loaded.adapter.spec.rank} adapter of other"
                    f" modules than model {model_id} (rank {run.spec.rank}); load it with"
                    " create_training_client_from_state instead"
                )
            run.model = loaded
            return {"type": "load_weights", "path": tinker_path, "model_id": model_id}

        return self._in_order(run, seq_id, "load_weights", load)

    def create_from_state(
        self, session_id: str, model_seq_id: int, tinker_path: str, optimizer: bool
    ) -> tuple[str, str]:
        """``create_training_client_from_state``: a new model whose request 0 is this load."""
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self._creates:
            return self._creates[model_id], model_id
        if not self._store.has_session(session_id):
            raise UserInputError(f"unknown session {session_id!r}; call create_session first")
        folder = self._checkpoint_folder(tinker_path, None)
        try:
            spec, base_model = read_spec(folder)
        except CheckpointError as exc:
            raise UserInputError(str(exc)) from exc
        engine = self.engine(base_model or "")
        run = TrainingRun(model_id, session_id, engine.base.name, spec)
        self._runs[model_id] = run
        self._record(run, None)

        def load() -> dict[str, str]:
            run.model = _load(folder, engine, optimizer)
            return {"type": "load_weights", "path": tinker_path, "model_id": model_id}

        request_id = engine.scheduler.call(model_id, load, "load_weights")
        engine.scheduler.start_order(model_id, 1)
        self._creates[model_id] = request_id
        return request_id, model_id

    def _checkpoint_folder(self, tinker_path: str, base_model: str | None) -> Path:
        path = CheckpointPath.parse(tinker_path)
        folder = path.folder(self._data_dir)
        if not folder.is_dir():
            raise NotFound(f"no checkpoint at {tinker_path}")
        if base_model is not None:
            _, trained_on = read_spec(folder)
            if trained_on != base_model:
                raise UserInputError(f"{tinker_path} was trained on {trained_on}, not {base_model}")
        return folder

    def delete_checkpoint(self, path: CheckpointPath) -> bool:
        folder = path.folder(self._data_dir)
        found = self._store.delete_checkpoint(path.tinker_path)
        if folder.is_dir():
            shutil.rmtree(folder)
            found = True
        self._sampling.forget_snapshot(path.tinker_path)
        return found

    def _in_order(self, run: TrainingRun, seq_id: int | None, kind: str, fn: Any) -> str:
        """Queue ``fn`` in the model's seq_id order. Its checks run there too: a request
        the SDK numbered must take its turn even when it fails, or every later request of
        the model would wait for the gap."""
        engine = self.engines[run.base_model]
        return engine.scheduler.submit(run.model_id, seq_id, kind, lambda r: Op(r, call=fn))

    def unload(self, model_id: str) -> str:
        run = self.run(model_id)
        engine = self.engines[run.base_model]

        def drop() -> dict[str, str]:
            self._runs.pop(model_id, None)
            engine.scheduler.forget(model_id)
            return {"model_id": model_id, "type": "unload_model"}

        return engine.scheduler.submit(model_id, None, "unload_model", lambda r: Op(r, call=drop))

    def runs_of(self, session_id: str) -> list[str]:
        return [run.model_id for run in self._runs.values() if run.session_id == session_id]


def _load(folder: Path, engine: Engine, with_optimizer: bool) -> LoraModel:
    """A model from a checkpoint folder, with its AdamW state when asked for and saved."""
    try:
        model = LoraModel.create(load_adapter(folder, engine.base.layers))
    except CheckpointError as exc:
        raise UserInputError(str(exc)) from exc
    if with_optimizer:
        state = load_optimizer_state(folder)
        if state is None:
            raise UserInputError(
                f"{folder.name} was saved without optimizer state (save_weights_for_sampler);"
                " load it without the optimizer, or save it with save_state"
            )
        model.optimizer.load_state_dict(state)
    return model


def _built(run: TrainingRun) -> LoraModel:
    if run.model is None:
        raise UserInputError(f"model {run.model_id} failed to be created")
    return run.model


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


def packed_runner(base: BaseModel, max_tokens_per_pass: int) -> PackedRunner:
    """The scheduler's hook into the engine: run a cycle's packed forward/backward."""

    def run(works: list[ForwardBackwardWork], cycle: int) -> list[ForwardBackwardOutcome]:
        return forward_backward(base, works, max_tokens_per_pass)

    return run


def result_of(outcome: ForwardBackwardOutcome, cycle: int) -> ForwardBackwardResult:
    return ForwardBackwardResult(
        logprobs=outcome.logprobs,
        metrics={"loss:sum": outcome.loss, "clock_cycle:unique": float(cycle)},
    )
