"""A base model on N rank processes: :class:`WorkerGroup`, the service's ``Worker``
(:mod:`treadle.service.served`) for ``treadle serve --workers N``.

Shape. The server process holds a *driver*, which is not itself a rank: it never sits in
a collective, so it can never hang on a dead one. Each rank
(:mod:`treadle.engine.rank`) is a process holding the base model and an ordinary
in-process :class:`~treadle.engine.worker.Worker`. treadle starts ``--local-workers`` of
them itself; the others join from other machines with ``treadle worker --join
HOST:PORT`` (:mod:`treadle.engine.join`). Ranks meet in a torch.distributed process
group (gloo on CPU, NCCL on CUDA) through a TCPStore the driver hosts, with every
collective's timeout set (``--collective-timeout-seconds``).

Data parallelism needs no DDP wrapper. treadle's adapters are plain tensors outside the
model's modules (:mod:`treadle.engine.lora`), so every rank holds every training model
(adapter + AdamW state), runs its share of a cycle's datums through the ordinary packed
passes, and lets the gradients accumulate locally. Only ``optim_step`` communicates: the
ranks ``all_reduce`` that adapter's gradients as a **sum** (Tinker's losses are sums;
one flattened buffer per step) and then run the identical AdamW step, so the adapters
stay equal everywhere without ever being broadcast. Since no collective runs inside the
passes, uneven splits need no padding: a rank with fewer datums (or none) just does less.

Splitting (``split="datums"``). Each built-in-loss request's datums are spread over the
ranks to balance tokens (largest first, to the least-loaded rank) and reassembled by
datum index: logprobs per datum in order, the loss summed. A custom-loss request
(:class:`~treadle.engine.custom_graph.CustomRun`) stays whole on one rank, because it must
fail as a whole. ``split="broadcast"`` (``--sharded``) is for a base model whose weights
are divided across the ranks (:mod:`treadle.engine.sharded`): every pass gathers each
layer from all ranks, so every rank must run every pass. Each command goes whole to every
rank, rank 0's results count, and ``optim_step`` reduces nothing (its ``reduce`` argument
is False): every rank computed the full gradient from the full batch.

Sampling: each sample goes to the rank with the fewest sequences decoding; frozen
adapters exist on every rank. A rank admits samples between commands and at the pauses
of its training passes, so decoding goes on while it trains, and sends each result back
when it is done; the driver's reader threads queue them and :meth:`WorkerGroup.sample_step`
answers them on the engine-loop thread. A sharded group samples in lockstep instead: a
rank that stepped its sampler on its own would run its gathers out of step with the
others (a hang, or wrong weights). The driver holds new samples (an unseeded one gets a
seed, so every rank draws the same tokens) until the engine loop's next
:meth:`WorkerGroup.sample_step`, which sends them with a ``sample_step`` command to every
rank: each admits them and takes the same sampler step, and rank 0 reports. Sampling
waits while a command runs (the ranks take no decode steps inside a training pass).

Checkpoints are the same PEFT folders as one process writes: rank 0 sends the adapter
(and AdamW state) tensors, the driver writes them with :mod:`treadle.engine.checkpoint`;
loading reads the folder on the driver and sends the tensors to every rank.

A rank that dies (its connection ends) fails every command and sample in flight with a
server error naming it, the group is torn down and started again from the base weights
(a new *generation*), and handles of the old generation fail clearly: load the last
checkpoint. A rank whose collective fails or times out exits, which does the same. The
current ranks (generation, rank, pid, host, bytes of base weights held) are written to a
status file in the data dir (``workers/<model>.txt``).

Protocol (pickled tuples over a ``multiprocessing.connection`` authenticated with the
data dir's worker secret; plain pickle, see :func:`treadle.engine.rank.send`):

- rank -> driver ``("hello", {"rank", "generation", "pid", "host"})``: a local child
  names the rank and generation it was started for; a joining rank names neither and
  gets the next free rank. The driver answers ``("start", Start)`` (rank, world size,
  store port, backend, timeout, sharded, model, settings) or ``("refused", reason)``. The
  rank loads the model and joins the process group (the store on the host it connected
  to) — a sharded group's rank joins first, then loads and shards the model — and
  answers ``("ready", {"info", "layers", "weights_bytes"})`` or ``("failed", message)``.
  A joining rank that connects while the group is complete waits, unanswered, for the
  next generation.
- driver -> rank ``("call", call_id, method, args)`` runs ``Rank.do_<method>(*args)`` in
  order on the rank's main thread; the answer is ``("reply", call_id, result)`` or
  ``("error", call_id, "user" | "server", message)``. ``call_id`` None: no answer
  (``drop``, ``release_memory``). Methods: ``new_model(id, spec, seed)``,
  ``forward_backward(parts)`` (``parts``: ``(model id, datums, loss, config,
  forward_only)`` per request), ``optim_step(id, params, reduce)``, ``snapshot(id,
  model id)``, ``state(id, with_optimizer)``, ``put_model(id, spec, pairs, state)``,
  ``put_adapter(id, spec, pairs)``, ``drop(ids)``, ``release_memory()``; in a sharded
  group ``sample_step(samples)`` (``samples``: ``(sample id, args)`` as in ``sample``
  below, to admit before the step).
- driver -> rank ``("sample", sample_id, (prompt, num_samples, params, adapter id,
  prompt_logprobs, topk, stream))``; answered when done by ``("sampled", sample_id,
  result)`` or ``("sample_error", sample_id, category, message)``. A ``stream`` sample is
  also reported after each step that advanced it, before its answer, by ``("progress",
  sample_id, [(sequence index, token, logprob), ...])``: one message per sample per step
  (a sharded group's rank 0 alone reports); the driver's reader thread hands it to the
  sample's progress callback at once.

Objects on the ranks are named by ids the driver hands out; the handles the service
holds (:class:`GroupModel`, :class:`GroupAdapter`) carry the id and generation, and
dropping one (``weakref.finalize``) sends a ``drop`` to every rank with the next command.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import gc
import itertools
import logging
import os
import pickle
import platform
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from treadle.engine.checkpoint import load_adapter, load_optimizer_state, save_adapter
from treadle.engine.custom_graph import CustomRun
from treadle.engine.datum import check_data
from treadle.engine.families import family_of
from treadle.engine.join import SECRET_ENV, is_loopback, parse_address
from treadle.engine.lora import Adapter, LoraLinear, LoraPair
from treadle.engine.losses import LossSpec
from treadle.engine.models import resolve_folder
from treadle.engine.process import compute_threads, tuned_environment
from treadle.engine.rank import Start, receive, send
from treadle.engine.train import ForwardBackwardOutcome, LoraModel
from treadle.engine.worker import Loss, chat_prompt_tokens
from treadle.errors import UserInputError
from treadle.sampling_params import SamplingParams
from treadle.settings import ModelEntry, Settings
from treadle.types import AdamParams, Datum, LoraSpec, ModelInfo, SampleResult

log = logging.getLogger(__name__)

Split = Literal["datums", "broadcast"]
SampleDone = Callable[[SampleResult | BaseException], None]
SampleProgress = Callable[[list[tuple[int, int, float]]], None]
Pairs = dict[str, tuple[Any, Any]]

# A connection that has not authenticated within this long is dropped; at most this
# many authenticate at once.
_HANDSHAKE_SECONDS = 10.0
_HANDSHAKES = 16
# How often a driver waiting on ranks offers the engine loop a pause (decode steps).
_PAUSE_SECONDS = 0.02
# sample_step waits this long for a result, so an engine loop with only remote sampling
# to do does not spin.
_SAMPLE_WAIT_SECONDS = 0.01
# While waiting for ranks to join, how often the driver says so in the log.
_WAITING_LOG_SECONDS = 30.0


class RankDied(RuntimeError):
    """A rank died, or the group restarted since a handle was made: the server's fault
    (the request reports category ``server``); the message names the rank."""


@dataclass(eq=False)
class GroupModel:
    """A training model on every rank: the service's opaque handle."""

    id: int
    generation: int
    spec: LoraSpec
    pending_datums: int = 0  # summed over ranks; optim_step without any is a user error


@dataclass(eq=False)
class GroupAdapter:
    """A frozen adapter (a sampler's) on every rank."""

    id: int
    generation: int
    spec: LoraSpec


@dataclass
class GroupWork:
    """One request's forward(/backward), before it is split over the ranks."""

    model: GroupModel
    data: Sequence[Datum]
    loss: LossSpec | CustomRun
    config: dict[str, float]
    forward_only: bool


@dataclass(eq=False)
class _Link:
    """One rank as the driver sees it."""

    rank: int
    conn: Connection
    pid: int
    host: str
    process: subprocess.Popen[bytes] | None  # a local child; None: joined from elsewhere
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    sequences: int = 0  # sample sequences decoding on it
    weights_bytes: int = 0  # of the base model, in its memory (its shards when sharded)

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


@dataclass(eq=False)
class _Call:
    """A command sent to some ranks, until all of them answered."""

    waiting: set[int]
    results: dict[int, Any] = field(default_factory=dict)
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Sample:
    link: _Link
    done: SampleDone
    sequences: int
    adapter: GroupAdapter | None  # held, so its drop waits until the sample ends
    progress: SampleProgress | None = None  # a streaming sample's


class _Acceptor:
    """The driver's listening socket: authenticates every connection (a handshake thread
    each, bounded by ``_HANDSHAKE_SECONDS``, so a silent client holds nothing up) and
    queues the authenticated ones."""

    def __init__(self, host: str, port: int, secret: bytes) -> None:
        self._secret = secret
        self._sock = socket.create_server((host, port), backlog=64)
        self.address: tuple[str, int] = (host, self._sock.getsockname()[1])
        self.accepted: collections.deque[Connection] = collections.deque()
        self.arrived = threading.Event()
        self._handshakes = threading.BoundedSemaphore(_HANDSHAKES)
        self._closed = False
        threading.Thread(target=self._accept, name="group-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            if not self._handshakes.acquire(blocking=False):
                sock.close()  # a flood of connections: turn them away
                continue
            threading.Thread(target=self._handshake, args=(sock,), daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        # A receive timeout (not a socket timeout, which would make the descriptor
        # non-blocking under the Connection) bounds each read of the handshake.
        seconds = int(_HANDSHAKE_SECONDS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, 0))
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, self._secret)
            answer_challenge(conn, self._secret)
        except (AuthenticationError, OSError, EOFError) as exc:
            log.warning("worker group: refused a connection that did not authenticate: %s", exc)
            conn.close()
            return
        finally:
            self._handshakes.release()
        fd = socket.socket(fileno=os.dup(conn.fileno()))
        fd.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        fd.close()
        self.accepted.append(conn)
        self.arrived.set()

    def take(self, timeout: float) -> Connection | None:
        if not self.accepted:
            self.arrived.wait(timeout)
            self.arrived.clear()
        return self.accepted.popleft() if self.accepted else None

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def worker_secret(data_dir: Path) -> bytes:
    """The data dir's worker secret (``worker-secret``, mode 0600), made on first use:
    ranks authenticate with it, and ``treadle worker --join --secret-file`` reads it."""
    path = data_dir / "worker-secret"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


class WorkerGroup:
    """The driver of N ranks, behind the service's ``Worker`` protocol. ``start`` blocks
    until every rank is ready."""

    def __init__(
        self,
        entry: ModelEntry,
        settings: Settings,
        *,
        workers: int,
        local_workers: int,
        listen: tuple[str, int],
        split: Split = "datums",
        status_file: Path | None = None,
    ) -> None:
        self._entry = entry
        self._settings = settings
        self.world = workers
        self._local = local_workers
        self.split: Split = split
        self._status_file = status_file
        self._backend = "nccl" if settings.device.startswith("cuda") else "gloo"
        self._timeout = settings.collective_timeout_seconds
        self._secret = worker_secret(settings.data_dir)
        self._acceptor = _Acceptor(*listen, self._secret)
        self.address = self._acceptor.address
        # The rendezvous store, on a socket bound like the listener (the store alone
        # would listen on every interface).
        self._store_sock = socket.create_server((listen[0], 0), backlog=64)
        self._store = dist.TCPStore(
            listen[0],
            self._store_sock.getsockname()[1],
            None,
            True,
            timedelta(seconds=self._timeout),
            wait_for_workers=False,
            master_listen_fd=self._store_sock.fileno(),
        )
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._generation = 0
        self._links: list[_Link] = []
        self._up = False
        self._closed = False
        self._lost: str | None = None  # why the last generation ended
        self._calls: dict[int, _Call] = {}
        self._samples: dict[int, _Sample] = {}
        self._finished: collections.deque[tuple[SampleDone, Any]] = collections.deque()
        # A sharded group's samples not yet sent: the next sample_step carries them.
        self._admitting: list[tuple[int, tuple[Any, ...]]] = []
        self._drops: collections.deque[int] = collections.deque()
        self.info: ModelInfo
        self._layers: dict[str, LoraLinear] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # Encoding may reconfigure the fast tokenizer: one thread at a time.
        self._text_lock = threading.Lock()
        atexit.register(self.close)

    # -- the group's life -------------------------------------------------------------

    def start(self) -> None:
        """Start the first generation (blocking: every rank loads the model)."""
        self._start_generation()

    def _start_generation(self) -> None:
        generation = self._generation + 1
        children = [self._spawn(rank, generation) for rank in range(self._local)]
        links: list[_Link] = []
        try:
            links = self._gather(generation, children)
            start = Start(
                rank=0,
                world=self.world,
                generation=generation,
                store_port=self._store.port,
                backend=self._backend,
                timeout_seconds=self._timeout,
                sharded=self.split == "broadcast",
                entry=self._entry,
                settings=self._settings,
            )
            for link in links:
                send(link.conn, ("start", replace(start, rank=link.rank)))
            ready = [self._ready(link) for link in links]
            for link, answer in zip(links, ready, strict=True):
                link.weights_bytes = int(answer["weights_bytes"])
        except BaseException:
            self._stop(links, children)
            raise
        info: ModelInfo = ready[0]["info"]
        # The service reads the tokenizer from this machine's copy of the model.
        folder = resolve_folder(self._entry.source, self._settings.data_dir)
        self.info = replace(info, tokenizer_dir=folder)
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._layers = {
            path: LoraLinear(_shape_only(n_in, n_out), path, group)
            for path, (group, n_in, n_out) in ready[0]["layers"].items()
        }
        self._write_status(generation, links)
        with self._cond:
            self._generation = generation
            self._links = links
            self._up = True
            self._cond.notify_all()
        for link in links:
            threading.Thread(
                target=self._read, args=(link, generation), name=f"rank{link.rank}", daemon=True
            ).start()
        log.info(
            "worker group of %s: generation %d, %d ranks (%s); ranks connect to %s:%d,"
            " their rendezvous store listens on port %d",
            self._entry.name,
            generation,
            self.world,
            ", ".join(link.describe() for link in links),
            *self.address,
            self._store.port,
        )

    def _spawn(self, rank: int, generation: int) -> subprocess.Popen[bytes]:
        """A local rank process, with its share of this machine's cores."""
        threads = max(1, compute_threads() // max(1, self._local))
        env = tuned_environment(threads)
        env[SECRET_ENV] = self._secret.hex()
        if is_loopback(self.address[0]) and platform.system() == "Linux":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        args = [sys.executable, "-m", "treadle.engine.rank"]
        args += ["--connect", f"{self.address[0]}:{self.address[1]}"]
        args += ["--rank", str(rank), "--generation", str(generation)]
        device = self._settings.device
        if device == "cuda":
            args += ["--device", f"cuda:{rank}"]
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        args += ["--log-level", level]
        return subprocess.Popen(args, env=env)

    def _gather(self, generation: int, children: list[subprocess.Popen[bytes]]) -> list[_Link]:
        """Take connections until every rank of ``generation`` said hello."""
        links: dict[int, _Link] = {}
        try:
            self._take_ranks(generation, children, links)
        except BaseException:
            self._stop(list(links.values()), [])
            raise
        return [links[rank] for rank in range(self.world)]

    def _take_ranks(
        self, generation: int, children: list[subprocess.Popen[bytes]], links: dict[int, _Link]
    ) -> None:
        next_remote = self._local
        said = time.monotonic()
        while len(links) < self.world:
            for rank, child in enumerate(children):
                if child.poll() is not None and rank not in links:
                    raise RuntimeError(f"rank {rank} exited while starting: {_exit(child)}")
            conn = self._acceptor.take(timeout=0.5)
            if conn is None:
                remote = next_remote < self.world
                if remote and time.monotonic() - said > _WAITING_LOG_SECONDS:
                    said = time.monotonic()
                    log.warning(
                        "worker group of %s: waiting for %d ranks to join: run `treadle worker"
                        " --join %s:%d` on the other machines",
                        self._entry.name,
                        self.world - next_remote,
                        *self.address,
                    )
                continue
            try:
                if not conn.poll(_HANDSHAKE_SECONDS):
                    raise EOFError("no hello")
                kind, hello = receive(conn)
            except (EOFError, OSError, pickle.UnpicklingError, ValueError):
                conn.close()
                continue
            hello = hello if kind == "hello" and isinstance(hello, dict) else {"rank": -1}
            asked = hello.get("rank")
            process: subprocess.Popen[bytes] | None = None
            if (
                isinstance(asked, int)
                and 0 <= asked < self._local
                and asked not in links
                and hello.get("generation") == generation
            ):
                rank, process = asked, children[asked]
            elif asked is None and next_remote < self.world:
                rank = next_remote
                next_remote += 1
            else:
                with contextlib.suppress(OSError):
                    send(conn, ("refused", f"the group of {self.world} ranks is complete"))
                conn.close()
                continue
            links[rank] = _Link(rank, conn, int(hello["pid"]), str(hello["host"]), process)

    def _ready(self, link: _Link) -> dict[str, Any]:
        while not link.conn.poll(0.5):
            if link.process is not None and link.process.poll() is not None:
                raise RuntimeError(f"{link.describe()} exited while loading: {_exit(link.process)}")
        kind, answer = receive(link.conn)
        if kind != "ready":
            raise RuntimeError(f"{link.describe()} could not start: {answer}")
        result: dict[str, Any] = answer
        return result

    def _write_status(self, generation: int, links: list[_Link]) -> None:
        """Who the ranks are (pids, hosts), for operators and tests (the data dir is the
        server's own, never served over HTTP); written before they take requests."""
        if self._status_file is None:
            return
        lines = [f"generation {generation}"]
        lines += [
            f"rank {k.rank} pid {k.pid} host {k.host} weights {k.weights_bytes} bytes"
            for k in links
        ]
        self._status_file.parent.mkdir(parents=True, exist_ok=True)
        self._status_file.write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        """Stop every rank and the listener (at exit, or by its owner)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._up = False
            links, self._links = self._links, []
            self._cond.notify_all()
        self._stop(links, [])
        self._acceptor.close()
        self._store_sock.close()

    @staticmethod
    def _stop(links: list[_Link], children: list[subprocess.Popen[bytes]]) -> None:
        processes = [link.process for link in links if link.process is not None] + children
        for link in links:
            link.conn.close()  # joined ranks exit when their connection ends
        for process in processes:
            if process.poll() is None:
                process.kill()  # they hold nothing worth saving: the driver keeps no state there
        for process in processes:
            process.wait()

    # -- rank death -------------------------------------------------------------------

    def _read(self, link: _Link, generation: int) -> None:
        """A rank's reader thread: answers to commands, finished samples; its end is the
        rank's death."""
        try:
            while True:
                message = receive(link.conn)
                if message[0] in ("reply", "error"):
                    self._answered(link, message)
                elif message[0] == "progress":
                    self._progressed(link, message)
                else:
                    self._sampled(link, message)
        except (EOFError, OSError, pickle.UnpicklingError):
            self._died(link, generation)

    def _died(self, link: _Link, generation: int) -> None:
        reason = f"{link.describe()} died"
        if link.process is not None:
            # Its connection ends as it exits: the exit status follows in a moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                link.process.wait(timeout=2)
            reason += f" ({_exit(link.process)})" if link.process.poll() is not None else ""
        with self._cond:
            if generation != self._generation or not self._up:
                return  # torn down on purpose, or another rank's death came first
            self._up = False
            self._lost = reason
            failure = RankDied(
                f"{reason} while this request ran; the worker group restarts from the base"
                " weights: load your last checkpoint and send it again"
            )
            for call in self._calls.values():
                call.error = call.error or failure
                call.done.set()
            self._calls.clear()
            for sample in self._samples.values():
                self._finished.append((sample.done, failure))
            self._samples.clear()
            self._admitting.clear()
            links, self._links = self._links, []
            self._cond.notify_all()
        log.error("worker group of %s: %s; restarting it", self._entry.name, reason)
        threading.Thread(
            target=self._restart, args=(links,), name="group-restart", daemon=True
        ).start()

    def _restart(self, links: list[_Link]) -> None:
        self._stop(links, [])
        delay = 1.0
        while not self._closed:
            try:
                self._start_generation()
                return
            except Exception:
                log.exception("worker group of %s: restart failed; trying again", self._entry.name)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def _current(self, generation: int | None = None) -> tuple[list[_Link], int]:
        """The live ranks and their generation, once the group is up (waiting through a
        restart for at most the collective timeout). A handle of an older generation
        fails: what it named died with that group."""
        with self._cond:
            deadline = time.monotonic() + self._timeout
            while not self._up:
                left = deadline - time.monotonic()
                if self._closed:
                    raise RankDied("the worker group is shut down")
                if left <= 0:
                    raise RankDied(f"the worker group is down after {self._lost}; try again later")
                self._cond.wait(left)
            if generation is not None and generation != self._generation:
                raise RankDied(
                    f"the worker group restarted after {self._lost}, and this model or sampler"
                    " was lost with it: load your last checkpoint"
                )
            return list(self._links), self._generation

    # -- commands ---------------------------------------------------------------------

    def _call(
        self,
        links: list[_Link],
        method: str,
        args: tuple[Any, ...] | dict[int, tuple[Any, ...]],
        pause: Callable[[], None] | None = None,
    ) -> dict[int, Any]:
        """Run ``method`` on ``links`` (``args`` for all, or per rank) and wait for every
        answer, offering ``pause`` meanwhile; returns the results by rank."""
        if not links:
            return {}
        self._flush_drops(links)
        call = _Call({link.rank for link in links})
        with self._cond:
            # Registered only while these ranks are the live ones: a death after this
            # fails the call; one before it must not leave the call waiting forever.
            if not self._up or any(link not in self._links for link in links):
                raise RankDied(f"the worker group restarts after {self._lost}; send it again")
            call_id = next(self._ids)
            self._calls[call_id] = call
        try:
            common = None if isinstance(args, dict) else _dumps(("call", call_id, method, args))
            for link in links:
                if isinstance(args, dict):
                    self._send(link, _dumps(("call", call_id, method, args[link.rank])))
                else:
                    assert common is not None
                    self._send(link, common)
            while not call.done.wait(_PAUSE_SECONDS if pause is not None else None):
                if pause is not None:
                    pause()
        finally:
            with self._cond:
                self._calls.pop(call_id, None)
        if call.error is not None:
            raise call.error
        return call.results

    def _send(self, link: _Link, data: bytes) -> None:
        try:
            with link.send_lock:
                link.conn.send_bytes(data)
        except OSError as exc:
            # Its reader thread notices the death and fails everything in flight.
            raise RankDied(f"{link.describe()} is gone: {exc}") from exc

    def _answered(self, link: _Link, message: tuple[Any, ...]) -> None:
        kind, call_id, *answer = message
        with self._cond:
            call = self._calls.get(call_id)
            if call is None:
                return
            if kind == "reply":
                call.results[link.rank] = answer[0]
            elif call.error is None:
                call.error = _error(link, *answer)
            call.waiting.discard(link.rank)
            if not call.waiting:
                call.done.set()

    def _flush_drops(self, links: list[_Link]) -> None:
        ids: list[int] = []
        while self._drops:
            ids.append(self._drops.popleft())
        if ids:
            message = _dumps(("call", None, "drop", (ids,)))
            for link in links:
                self._send(link, message)

    def _dropped(self, object_id: int, generation: int) -> None:
        # A finalizer: may run on any thread, even one holding self._cond, so it only
        # appends (atomic); the next command carries the drop.
        if generation == self._generation:
            self._drops.append(object_id)

    def _track(self, handle: GroupModel | GroupAdapter) -> None:
        weakref.finalize(handle, self._dropped, handle.id, handle.generation)

    @staticmethod
    def _first(results: dict[int, Any]) -> Any:
        return results[min(results)]

    # -- the Worker protocol: training ------------------------------------------------

    @staticmethod
    def claim_thread() -> None:
        """Nothing to claim: the driver computes nothing; the ranks own the cores."""

    def release_memory(self) -> None:
        """Collect dropped handles here, then have every rank free their objects and
        return memory to the OS."""
        gc.collect()
        with self._cond:
            links = list(self._links) if self._up else []
        try:
            self._flush_drops(links)
            message = _dumps(("call", None, "release_memory", ()))
            for link in links:
                self._send(link, message)
        except RankDied:
            pass  # the group restarts without them

    def check_forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float | str]
    ) -> Loss:
        loss = Loss(loss_fn, loss_fn_config)
        check_data(data, loss.spec, loss_fn, self.info.vocab_size, self.info.max_context)
        return loss

    def work(
        self, model: GroupModel, data: Sequence[Datum], loss: Any, forward_only: bool
    ) -> GroupWork:
        self._current(model.generation)  # a lost model fails this request alone
        return GroupWork(model, data, loss.spec, loss.config, forward_only)

    def forward_backward(
        self, works: list[GroupWork], pause: Callable[[], None]
    ) -> list[ForwardBackwardOutcome]:
        """One cycle, split over the ranks (see the module's docstring); ``pause`` is
        offered while they compute."""
        links, generation = self._current()
        for work in works:
            if work.model.generation != generation:
                self._current(work.model.generation)  # raises, naming the restart
        outcomes = [
            ForwardBackwardOutcome(logprobs=[np.empty(0, np.float32)] * len(w.data), loss=0.0)
            for w in works
        ]

        def parts(share: list[tuple[int, list[int]]]) -> tuple[Any, ...]:
            return (
                [
                    (
                        works[w].model.id,
                        [works[w].data[i] for i in indices],
                        works[w].loss,
                        works[w].config,
                        works[w].forward_only,
                    )
                    for w, indices in share
                ],
            )

        args: tuple[Any, ...] | dict[int, tuple[Any, ...]]
        if self.split == "broadcast":
            # Every rank runs the whole cycle: one message, pickled once.
            whole = [(w, list(range(len(work.data)))) for w, work in enumerate(works)]
            shares = [whole] * len(links)
            args, busy = parts(whole), links
        else:
            shares = split_datums(works, len(links))
            args = {link.rank: parts(shares[link.rank]) for link in links if shares[link.rank]}
            busy = [link for link in links if link.rank in args]
        results = self._call(busy, "forward_backward", args, pause)
        counted = [0] if self.split == "broadcast" else sorted(results)
        for rank in counted:
            for (w, indices), part in zip(shares[rank], results[rank], strict=True):
                merged = outcomes[w]
                for index, logprobs in zip(indices, part.logprobs, strict=True):
                    merged.logprobs[index] = logprobs
                merged.loss += part.loss
                for key, value in part.metrics.items():
                    merged.metrics[key] = merged.metrics.get(key, 0.0) + value
                merged.error = merged.error or part.error
        for work, outcome in zip(works, outcomes, strict=True):
            if not work.forward_only and outcome.error is None:
                work.model.pending_datums += len(work.data)
        return outcomes

    def new_model(self, spec: LoraSpec, seed: int | None) -> GroupModel:
        # One seed for every rank: their adapters start equal and stay equal.
        seed = seed if seed is not None else random.SystemRandom().randrange(2**62)
        links, generation = self._current()
        model = GroupModel(next(self._ids), generation, spec)
        self._call(links, "new_model", (model.id, spec, seed))
        self._track(model)
        return model

    def optim_step(self, model: GroupModel, params: AdamParams) -> dict[str, float]:
        links, _ = self._current(model.generation)
        if model.pending_datums == 0:
            raise UserInputError(
                "optim_step with no gradients: call forward_backward since the last"
                " optim_step first (forward() computes no gradients)"
            )
        reduce = self.split == "datums"
        metrics: dict[str, float] = self._first(
            self._call(links, "optim_step", (model.id, params, reduce))
        )
        model.pending_datums = 0
        return metrics

    @staticmethod
    def spec_of(model: GroupModel) -> LoraSpec:
        return model.spec

    def snapshot(self, model: GroupModel) -> GroupAdapter:
        links, generation = self._current(model.generation)
        adapter = GroupAdapter(next(self._ids), generation, model.spec)
        self._call(links, "snapshot", (adapter.id, model.id))
        self._track(adapter)
        return adapter

    # -- checkpoints ------------------------------------------------------------------

    def _state(
        self, handle: GroupModel | GroupAdapter, with_optimizer: bool
    ) -> tuple[Adapter, LoraModel | None]:
        """The handle's adapter (and AdamW state) as rank 0 holds it, here."""
        links, _ = self._current(handle.generation)
        spec, pairs, state = self._first(
            self._call(links[:1], "state", (handle.id, with_optimizer))
        )
        adapter = Adapter(spec, {path: LoraPair(a, b) for path, (a, b) in pairs.items()})
        if state is None:
            return adapter, None
        model = LoraModel.create(adapter)
        model.optimizer.load_state_dict(state)
        return adapter, model

    def save_model(self, folder: Path, model: GroupModel) -> int:
        adapter, replica = self._state(model, with_optimizer=True)
        optimizer = replica.optimizer if replica is not None else None
        family = family_of(self.info.arch)
        return save_adapter(adapter, folder, family, self.info.name, optimizer)

    def save_adapter(self, folder: Path, adapter: GroupAdapter) -> int:
        weights, _ = self._state(adapter, with_optimizer=False)
        return save_adapter(weights, folder, family_of(self.info.arch), self.info.name)

    def load(self, folder: Path, with_optimizer: bool) -> GroupModel:
        adapter = load_adapter(folder, self._layers)
        state = None
        if with_optimizer:
            state = load_optimizer_state(folder)
            if state is None:
                raise UserInputError(
                    f"{folder.name} has no optimizer state (a save_weights_for_sampler"
                    " checkpoint, or an imported adapter); load it without the optimizer"
                    " (create_training_client_from_state), or save one with save_state"
                )
            # Checked here, as one process would, before any rank holds it.
            LoraModel.create(adapter).optimizer.load_state_dict(state)
        links, generation = self._current()
        model = GroupModel(next(self._ids), generation, adapter.spec)
        self._call(links, "put_model", (model.id, adapter.spec, _pairs(adapter), state))
        self._track(model)
        return model

    def load_adapter(self, folder: Path) -> GroupAdapter:
        weights = load_adapter(folder, self._layers)
        links, generation = self._current()
        adapter = GroupAdapter(next(self._ids), generation, weights.spec)
        self._call(links, "put_adapter", (adapter.id, weights.spec, _pairs(weights)))
        self._track(adapter)
        return adapter

    # -- sampling ---------------------------------------------------------------------

    def add_sample(
        self,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        adapter: GroupAdapter | None,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        done: SampleDone,
        progress: SampleProgress | None = None,
    ) -> None:
        """Hand a sample to the rank with the fewest sequences decoding (a sharded group
        holds it for the next :meth:`sample_step`); ``done`` is called on the engine-loop
        thread (:meth:`sample_step`), ``progress`` on a reader thread as steps arrive
        (before the ``done`` of the same sample)."""
        try:
            links, generation = self._current(adapter.generation if adapter else None)
        except RankDied as exc:
            with self._cond:
                self._finished.append((done, exc))
            return
        with self._cond:
            if not self._up or generation != self._generation:
                self._finished.append((done, RankDied(f"the worker group restarted: {self._lost}")))
                return
            lockstep = self.split == "broadcast"
            link = links[0] if lockstep else min(links, key=lambda k: (k.sequences, k.rank))
            sample_id = next(self._ids)
            self._samples[sample_id] = _Sample(link, done, num_samples, adapter, progress)
            link.sequences += num_samples
            if lockstep and params.seed is None:
                # Every rank must draw the same tokens: one seed, chosen here.
                params = replace(params, seed=random.SystemRandom().randrange(2**63))
            adapter_id = adapter.id if adapter else None
            stream = progress is not None
            args = (
                prompt,
                num_samples,
                params,
                adapter_id,
                prompt_logprobs,
                topk_prompt_logprobs,
                stream,
            )
            if lockstep:
                self._admitting.append((sample_id, args))
                return
        try:
            self._flush_drops(links)
            self._send(link, _dumps(("sample", sample_id, args)))
        except RankDied:
            pass  # its reader thread fails every sample of the group, this one included

    def _sampled(self, link: _Link, message: tuple[Any, ...]) -> None:
        kind, sample_id, *answer = message
        outcome = answer[0] if kind == "sampled" else _error(link, *answer)
        with self._cond:
            sample = self._samples.get(sample_id)
            if sample is None or sample.link is not link:
                return
            del self._samples[sample_id]
            sample.link.sequences -= sample.sequences
            self._finished.append((sample.done, outcome))
            self._cond.notify_all()

    def _progressed(self, link: _Link, message: tuple[Any, ...]) -> None:
        """A streaming sample's step, handed on from this reader thread: its answer comes
        later on the same connection, so the callback sees every step before ``done``."""
        _, sample_id, tokens = message
        with self._cond:
            sample = self._samples.get(sample_id)
        if sample is None or sample.link is not link or sample.progress is None:
            return
        try:
            sample.progress(tokens)
        except Exception:
            log.exception("sampling progress-callback raised")

    def sampling(self) -> bool:
        """Whether samples wait to be sent, are out on the ranks, or have answers to hand
        back."""
        return bool(self._samples or self._finished)

    def sample_step(self) -> None:
        """Hand back the samples that finished (waiting briefly for one): the engine loop
        calls this while :meth:`sampling`; the ranks do the decoding (a sharded group's
        ranks one step each, in lockstep, now)."""
        if self.split == "broadcast":
            self._lockstep_step()
        with self._cond:
            if not self._finished and self.split == "datums":
                self._cond.wait(_SAMPLE_WAIT_SECONDS)
            finished = list(self._finished)
            self._finished.clear()
        for done, outcome in finished:
            try:
                done(outcome)
            except Exception:
                log.exception("sampling done-callback raised")

    def _lockstep_step(self) -> None:
        """A sharded group's sampler step: the new samples and one step, on every rank.
        Skipped while another command runs (the engine loop's pause during a training
        cycle): the ranks are busy with it, and would only queue the step behind it."""
        with self._cond:
            if self._calls or not self._up or not self._samples:
                return
            links = list(self._links)
            admitting, self._admitting = self._admitting, []
        try:
            self._call(links, "sample_step", (admitting,))
        except RankDied:
            pass  # the group failed every sample in flight, these too
        except Exception as exc:
            # A step that failed on a rank (logged there; that rank then leaves and the
            # group restarts, see Rank._run): every sample in flight fails as the server's.
            with self._cond:
                for sample_id in list(self._samples):
                    sample = self._samples.pop(sample_id)
                    sample.link.sequences -= sample.sequences
                    self._finished.append((sample.done, exc))

    # -- text (any thread), from this machine's copy of the tokenizer -------------------

    def _text(self) -> PreTrainedTokenizerBase:
        assert self._tokenizer is not None, "started groups have a tokenizer"
        return self._tokenizer

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids, with the special tokens the tokenizer adds by default."""
        with self._text_lock:
            return list(self._text().encode(text))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self._text().decode(list(tokens)))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens of ``messages`` in the model's chat template, ending with the
        assistant's turn opened."""
        tokenizer = self._text()
        with self._text_lock:
            return chat_prompt_tokens(tokenizer, self.info.name, messages)


def split_datums(works: Sequence[GroupWork], world: int) -> list[list[tuple[int, list[int]]]]:
    """Each rank's share of a cycle: ``(work index, datum indices)`` in work order. Datums
    go largest first to the rank with the fewest tokens so far; a custom-loss work goes
    whole (it fails as a whole)."""
    units: list[tuple[int, int, list[int]]] = []
    for w, work in enumerate(works):
        if isinstance(work.loss, CustomRun):
            units.append((sum(d.num_tokens for d in work.data), w, list(range(len(work.data)))))
        else:
            units += [(d.num_tokens, w, [i]) for i, d in enumerate(work.data)]
    units.sort(key=lambda unit: -unit[0])
    loads = [0] * world
    chosen: dict[tuple[int, int], list[int]] = {}
    for tokens, w, indices in units:
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += tokens
        chosen.setdefault((rank, w), []).extend(indices)
    return [
        [(w, sorted(chosen[rank, w])) for w in range(len(works)) if (rank, w) in chosen]
        for rank in range(world)
    ]


def _shape_only(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer of a rank's shape that holds no memory (its weight is one zero,
    expanded): the driver checks checkpoints against these without the model."""
    linear = nn.Linear(1, 1, bias=False, device="meta")
    linear.in_features, linear.out_features = n_in, n_out
    linear.weight = nn.Parameter(torch.zeros(()).expand(n_out, n_in), requires_grad=False)
    return linear


def _pairs(adapter: Adapter) -> Pairs:
    return {path: (p.a.detach(), p.b.detach()) for path, p in adapter.pairs.items()}


def _dumps(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _error(link: _Link, category: str, message: str) -> Exception:
    if category == "user":
        return UserInputError(message)
    return RuntimeError(f"{link.describe()}: {message}")


def _exit(process: subprocess.Popen[bytes]) -> str:
    code = process.returncode
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def load_group(entry: ModelEntry, settings: Settings) -> WorkerGroup:
    """``load_worker`` for ``--workers N`` (N > 1): start the group and wait until every
    rank holds the model."""
    local = settings.workers if settings.local_workers is None else settings.local_workers
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.name)
    host, port = parse_address(settings.worker_listen)
    # Several served models: one group each, on consecutive ports when one is given.
    listen = (host, port + settings.models.index(entry) if port else 0)
    group = WorkerGroup(
        entry,
        settings,
        workers=settings.workers,
        local_workers=local,
        listen=listen,
        split="broadcast" if settings.sharded else "datums",
        status_file=settings.data_dir / "workers" / f"{slug}.txt",
    )
    group.start()
    return group
