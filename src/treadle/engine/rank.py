"""One rank of a worker group (:mod:`treadle.engine.group`): a process that holds the
base model, joins the group's torch.distributed process group and runs the driver's
commands on an ordinary in-process :class:`~treadle.engine.worker.Worker`.

``python -m treadle.engine.rank --connect HOST:PORT`` connects to the driver (the
secret is in ``$TREADLE_WORKER_SECRET``); the driver starts its local ranks this way and
``treadle worker --join`` starts one on another machine (:mod:`treadle.engine.join`).
The message protocol is described in :mod:`treadle.engine.group`.

Two threads: a reader that only receives (commands and samples go into two inboxes; a
lost driver ends the process at once, even while the main thread is stuck in a
collective), and the main thread, which runs commands in order and all the compute.
Samples are admitted between commands and at the pauses of training passes, where the
rank takes decode steps in the same share of its time as the in-process engine loop
(``--decode-share``), so a rank samples while it trains. A rank of a sharded group
(``--sharded``) joins the process group before it loads the model, shards it
(:mod:`treadle.engine.sharded`) and only then builds its worker; its sampler steps only
on the driver's ``sample_step`` command, never on its own or inside a training pass.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from treadle.engine.join import AUTH_REFUSED_EXIT, SECRET_ENV, parse_address
from treadle.engine.lora import Adapter, LoraPair
from treadle.engine.models import load_base_model
from treadle.engine.sample import Progress
from treadle.engine.sharded import shard
from treadle.engine.train import ForwardBackwardOutcome, ForwardBackwardWork, LoraModel
from treadle.engine.train import optim_step as adamw_step
from treadle.engine.worker import Worker, load_worker, worker_for
from treadle.errors import NotFound, UserInputError
from treadle.settings import ModelEntry, Settings
from treadle.types import AdamParams, LoraSpec, SampleResult

log = logging.getLogger(__name__)

# Exit code of a rank whose process group broke (a collective failed or timed out): it
# cannot take part in collectives again, so the driver restarts the whole group.
BROKEN_GROUP_EXIT = 3
# Commands whose passes run collectives in a sharded group.
_PASSES = ("forward_backward", "sample_step")
# A joining rank tries to reach a server that is not up at most this often.
_RETRY_SECONDS = 5.0

# ---------------------------------------------------------------------------------------
# The wire: pickled tuples over an authenticated multiprocessing connection. Plain
# pickle, not the connection's own ForkingPickler: with torch imported that one moves
# tensors into shared memory, which a rank on another machine cannot open.


def send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> tuple[Any, ...]:
    message: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
    return message


def error_of(exc: BaseException) -> tuple[str, str]:
    """``(category, message)`` of a failed command or sample, as the driver re-raises it:
    a user's error keeps its message; anything else is logged here with its traceback."""
    if isinstance(exc, UserInputError | NotFound):
        return "user", str(exc.args[0]) if exc.args else str(exc)
    log.error("rank command failed\n%s", "".join(traceback.format_exception(exc)))
    return "server", f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
    """What the driver tells a rank once it is in the group."""

    rank: int
    world: int
    generation: int
    store_port: int  # the driver's TCPStore (the rendezvous), on the host ranks connect to
    backend: str  # gloo or nccl
    timeout_seconds: float  # every collective's, and the rendezvous's
    # The base model's weights divided across the ranks (treadle.engine.sharded): every
    # command, sampler steps included, comes to every rank, and rank 0 answers.
    sharded: bool
    entry: ModelEntry
    settings: Settings


class Rank:
    """A rank's state: the in-process worker and the objects the driver made on it, by
    id (training models and frozen adapters)."""

    def __init__(self, conn: Connection, start: Start, worker: Worker) -> None:
        self._conn = conn
        self._start = start
        self._worker = worker
        self._objects: dict[int, LoraModel | Adapter] = {}
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._samples: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Event()
        share = start.settings.decode_share
        self._training_per_decode = (1.0 - share) / share
        self._decode_due = 0.0
        device = worker.base.device
        self._collective_device = device if start.backend == "nccl" else torch.device("cpu")
        # A sharded model's passes are collectives: its sampler steps only when the
        # driver says so (do_sample_step), the same step on every rank.
        self._lockstep = start.sharded

    # -- threads ----------------------------------------------------------------------

    def read(self) -> None:
        """The reader thread: inboxes only. A lost driver ends the process: nothing a
        rank holds outlives its group, and the main thread may be in a collective."""
        try:
            while True:
                message = receive(self._conn)
                (self._samples if message[0] == "sample" else self._commands).append(message)
                self._wake.set()
        except (EOFError, OSError):
            os._exit(0)

    def serve(self) -> None:
        """The main thread: commands in order; samples decode whenever no command runs."""
        while True:
            self._admit()
            if self._commands:
                self._run(self._commands.popleft())
            elif not self._lockstep and self._worker.sampling():
                self._worker.sample_step()
            else:
                self._wake.wait()
                self._wake.clear()

    def _run(self, message: tuple[Any, ...]) -> None:
        _, call_id, method, args = message
        try:
            result = getattr(self, f"do_{method}")(*args)
        except Exception as exc:
            category, text = error_of(exc)
            if call_id is not None:
                send(self._conn, ("error", call_id, category, text))
            if self._lockstep and method in _PASSES and category == "server":
                # A sharded pass that failed part-way may have left this rank's gathers
                # out of step with the others' (a timeout, memory on one rank): the group
                # must restart rather than pair the wrong collectives.
                log.error("rank %d: a sharded pass failed; leaving the group", self._start.rank)
                os._exit(BROKEN_GROUP_EXIT)
            return
        if call_id is not None:
            send(self._conn, ("reply", call_id, result))

    # -- sampling ---------------------------------------------------------------------

    def _admit(self) -> None:
        while self._samples:
            _, sample_id, args = self._samples.popleft()
            prompt, num_samples, params, adapter_id, prompt_logprobs, topk, stream = args
            done = self._sample_done(sample_id)
            progress = self._sample_progress(sample_id) if stream else None
            adapter = self._adapter(adapter_id) if adapter_id is not None else None
            self._worker.add_sample(
                prompt, num_samples, params, adapter, prompt_logprobs, topk, done, progress
            )

    def _sample_done(self, sample_id: int) -> Callable[[SampleResult | BaseException], None]:
        def done(outcome: SampleResult | BaseException) -> None:
            if isinstance(outcome, BaseException):
                send(self._conn, ("sample_error", sample_id, *error_of(outcome)))
            else:
                send(self._conn, ("sampled", sample_id, outcome))

        return done

    def _sample_progress(self, sample_id: int) -> Progress:
        def progress(tokens: list[tuple[int, int, float]]) -> None:
            send(self._conn, ("progress", sample_id, tokens))

        return progress

    def do_sample_step(self, samples: list[tuple[int, tuple[Any, ...]]]) -> None:
        """Admit ``samples`` and take one sampler step: a sharded group's sampling, sent to
        every rank in the same order, so their samplers hold the same batch and run the
        same passes (collectives). Rank 0 alone reports finished samples, before this
        command's answer."""
        for sample_id, args in samples:
            prompt, num_samples, params, adapter_id, prompt_logprobs, topk, stream = args
            reports = self._start.rank == 0
            done = self._sample_done(sample_id) if reports else _ignore
            progress = self._sample_progress(sample_id) if stream and reports else None
            adapter = self._adapter(adapter_id) if adapter_id is not None else None
            self._worker.add_sample(
                prompt, num_samples, params, adapter, prompt_logprobs, topk, done, progress
            )
        if self._worker.sampling():
            self._worker.sample_step()

    def _pause(self) -> None:
        """Offered by training passes between layers: admit samples, and take a decode
        step when decoding's share of the time is due (as the engine loop does)."""
        self._admit()
        if self._worker.sampling() and time.monotonic() >= self._decode_due:
            started = time.monotonic()
            self._worker.sample_step()
            ended = time.monotonic()
            self._decode_due = ended + (ended - started) * self._training_per_decode

    # -- objects ----------------------------------------------------------------------

    def _model(self, object_id: int) -> LoraModel:
        found = self._objects.get(object_id)
        if not isinstance(found, LoraModel):
            raise RuntimeError(f"rank {self._start.rank} holds no training model {object_id}")
        return found

    def _adapter(self, object_id: int) -> Adapter:
        found = self._objects.get(object_id)
        if not isinstance(found, Adapter):
            raise RuntimeError(f"rank {self._start.rank} holds no adapter {object_id}")
        return found

    # -- commands (do_<method>, called with the message's args) ------------------------

    def do_new_model(self, object_id: int, spec: LoraSpec, seed: int) -> None:
        self._objects[object_id] = self._worker.new_model(spec, seed)

    def do_forward_backward(
        self, parts: list[tuple[int, list[Any], Any, dict[str, float], bool]]
    ) -> list[ForwardBackwardOutcome]:
        works = [
            ForwardBackwardWork(self._model(object_id), data, loss, config, forward_only)
            for object_id, data, loss, config, forward_only in parts
        ]
        return self._worker.forward_backward(works, self._pause)

    def do_optim_step(self, object_id: int, params: AdamParams, reduce: bool) -> dict[str, float]:
        """AdamW on the gradients summed over every rank (``reduce``): one flattened
        buffer, and a flag per tensor, so a tensor no rank has a gradient for stays
        without one, exactly as in one process."""
        model = self._model(object_id)
        if reduce:
            tensors = model.adapter.parameters()
            parts = [
                (t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1) for t in tensors
            ]
            flags = torch.tensor([float(t.grad is not None) for t in tensors])
            flat = torch.cat([*parts, flags]).to(self._collective_device)
            try:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            except Exception as exc:
                # A peer died or the timeout passed: this process group can never run a
                # collective again, so the rank ends and the driver restarts the group.
                log.error("rank %d: the gradient all_reduce failed: %s", self._start.rank, exc)
                os._exit(BROKEN_GROUP_EXIT)
            flat = flat.cpu()
            offset = 0
            summed_flags = flat[-len(tensors) :]
            for index, tensor in enumerate(tensors):
                n = tensor.numel()
                has = bool(summed_flags[index] > 0)
                grad = flat[offset : offset + n].view_as(tensor).to(tensor.device)
                tensor.grad = grad.clone() if has else None
                offset += n
        return adamw_step(model, params)

    def do_snapshot(self, object_id: int, model_id: int) -> None:
        self._objects[object_id] = self._worker.snapshot(self._model(model_id))

    def do_state(
        self, object_id: int, with_optimizer: bool
    ) -> tuple[LoraSpec, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any] | None]:
        """An object's adapter tensors (and AdamW state), on the CPU, for the driver to
        write as a checkpoint."""
        found = self._objects.get(object_id)
        if found is None:
            raise RuntimeError(f"rank {self._start.rank} holds no object {object_id}")
        adapter = found.adapter if isinstance(found, LoraModel) else found
        pairs = {
            path: (pair.a.detach().cpu().clone(), pair.b.detach().cpu().clone())
            for path, pair in adapter.pairs.items()
        }
        state = None
        if with_optimizer and isinstance(found, LoraModel):
            state = _cpu(found.optimizer.state_dict())
        return adapter.spec, pairs, state

    def do_put_model(
        self,
        object_id: int,
        spec: LoraSpec,
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        state: dict[str, Any] | None,
    ) -> None:
        model = LoraModel.create(_adapter_of(spec, pairs))
        if state is not None:
            model.optimizer.load_state_dict(state)
        self._objects[object_id] = model

    def do_put_adapter(
        self, object_id: int, spec: LoraSpec, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self._objects[object_id] = _adapter_of(spec, pairs).detached()

    def do_drop(self, object_ids: list[int]) -> None:
        for object_id in object_ids:
            self._objects.pop(object_id, None)

    def do_release_memory(self) -> None:
        self._worker.release_memory()


def _ignore(outcome: SampleResult | BaseException) -> None:
    """A sharded group's rank other than 0 computes every sample too; rank 0 reports."""


def _adapter_of(spec: LoraSpec, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Adapter:
    adapter = Adapter(spec)
    for path, (a, b) in pairs.items():
        adapter.pairs[path] = LoraPair(a.float().requires_grad_(), b.float().requires_grad_())
    return adapter


def _cpu(value: Any) -> Any:
    """``value`` (an optimizer state dict) with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(item) for item in value)
    return value


def layer_table(worker: Worker) -> dict[str, tuple[str, int, int]]:
    """Every LoRA-able linear: path -> (group, in_features, out_features), so the driver
    can check checkpoints' shapes without holding the model."""
    return {
        path: (layer.group, layer.base.in_features, layer.base.out_features)
        for path, layer in worker.base.layers.items()
    }


def weights_bytes(worker: Worker) -> int:
    """Bytes of the base model's weights this rank holds: its shards, when sharded."""
    total = 0
    for parameter in worker.base.model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        total += local.numel() * local.element_size()
    return total


def _connect(address: tuple[str, int], secret: bytes, retry: bool) -> Connection | None:
    """The driver's connection (None: it refused the secret). A joining rank (``retry``)
    waits for a server that is not up yet, having imported torch only once; a local
    child whose driver is gone must not linger."""
    delay, said = 1.0, False
    while True:
        try:
            return Client(address, authkey=secret)
        except AuthenticationError:
            return None
        except OSError as exc:
            if not retry:
                raise
            if not said:
                print(
                    f"treadle rank: waiting for the server at {address[0]}:{address[1]}: {exc}",
                    file=sys.stderr,
                )
                said = True
            time.sleep(delay)
            delay = min(2 * delay, _RETRY_SECONDS)


def _join_process_group(host: str, start: Start) -> None:
    """Join the group's process group through the driver's store on ``host``."""
    timeout = timedelta(seconds=start.timeout_seconds)
    store = dist.TCPStore(host, start.store_port, None, False, timeout)
    dist.init_process_group(
        start.backend,
        store=dist.PrefixStore(f"treadle/{start.generation}", store),
        rank=start.rank,
        world_size=start.world,
        timeout=timeout,
    )
    dist.barrier()


def _load_sharded(entry: ModelEntry, settings: Settings) -> Worker:
    """The served model loaded on the CPU and divided across the ranks onto this rank's
    device (:func:`treadle.engine.sharded.shard`), so the device never holds it whole."""
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    if dtype is None and device.type != "cpu":
        dtype = torch.bfloat16  # what the device would have loaded; the shards keep it
    base = load_base_model(entry.name, entry.source, settings.data_dir, "cpu", dtype)
    shard(base, device)
    return worker_for(base, settings)


def run_rank(
    address: tuple[str, int],
    secret: bytes,
    rank: int | None,
    generation: int | None,
    data_dir: Path | None,
    device: str | None,
) -> int:
    """Connect, load the model, join the process group, serve until the driver goes."""
    conn = _connect(address, secret, retry=rank is None)
    if conn is None:
        return AUTH_REFUSED_EXIT
    send(
        conn,
        (
            "hello",
            {
                "rank": rank,
                "generation": generation,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            },
        ),
    )
    message = receive(conn)
    if message[0] != "start":
        print(f"treadle rank: the driver refused this rank: {message[1]}", file=sys.stderr)
        return 1
    start: Start = message[1]
    settings = start.settings
    if data_dir is not None:
        settings = dataclasses.replace(settings, data_dir=data_dir)
    if device is not None:
        settings = dataclasses.replace(settings, device=device)
    try:
        if settings.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(settings.device))
        Worker.claim_thread()
        if start.sharded:
            # Sharding is a collective, and the sampler must be built on the sharded model.
            _join_process_group(address[0], start)
            worker = _load_sharded(start.entry, settings)
        else:
            worker = load_worker(start.entry, settings)
            _join_process_group(address[0], start)
    except Exception as exc:
        send(conn, ("failed", f"rank {start.rank}: {type(exc).__name__}: {exc}"))
        raise
    info = worker.info
    held = weights_bytes(worker)
    send(conn, ("ready", {"info": info, "layers": layer_table(worker), "weights_bytes": held}))
    state = Rank(conn, start, worker)
    threading.Thread(target=state.read, name="rank-reader", daemon=True).start()
    state.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treadle.engine.rank")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--rank", type=int, help="the rank a local child is (the driver's)")
    parser.add_argument("--generation", type=int, help="the group generation it belongs to")
    parser.add_argument("--data-dir", type=Path, help="this machine's data dir")
    parser.add_argument("--device", help="this rank's torch device")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s rank: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    secret = bytes.fromhex(os.environ.get(SECRET_ENV, ""))
    if not secret:
        print(f"treadle rank: ${SECRET_ENV} holds no secret", file=sys.stderr)
        return 2
    return run_rank(
        parse_address(args.connect), secret, args.rank, args.generation, args.data_dir, args.device
    )


if __name__ == "__main__":
    sys.exit(main())
