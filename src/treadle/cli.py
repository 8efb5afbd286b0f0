"""``treadle serve | demo | worker | models | keys | usage | adapters`` — the one entry
point. ``--help`` imports no torch: commands import what they need when they run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from treadle.logs import FORMATS
from treadle.logs import setup as setup_logging
from treadle.settings import EMBEDDED_DEFAULT, ModelEntry, Settings, default_data_dir


def _model_entry(text: str) -> ModelEntry:
    if text == "embedded":
        return EMBEDDED_DEFAULT
    try:
        return ModelEntry.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share: give a number in (0, 1]")
    return value


def _ranks(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 1 (this process) or more ranks")
    return value


def _address(text: str) -> str:
    from treadle.engine.join import parse_address

    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


# Limits and tunables: (flag, Settings field, type, help). Each is a Settings field.
_LIMITS: list[tuple[str, str, Callable[[str], Any], str]] = [
    (
        "--max-tokens-per-pass",
        "max_tokens_per_pass",
        int,
        "tokens per packed forward/backward pass; bounds activation memory",
    ),
    (
        "--cycle-tokens",
        "cycle_tokens",
        int,
        "forward/backward tokens one training cycle takes, one request per user in turn",
    ),
    (
        "--decode-share",
        "decode_share",
        _share,
        "share of the engine's time decoding gets while training waits too (in (0, 1]; 1:"
        " sampling first); training pauses between layers for it",
    ),
    ("--max-body-bytes", "max_body_bytes", int, "bytes of one request body, as sent"),
    (
        "--max-decompressed-bytes",
        "max_decompressed_bytes",
        int,
        "bytes a compressed request body may expand to",
    ),
    (
        "--max-tensor-elements",
        "max_tensor_elements",
        int,
        "elements a sparse loss_fn_inputs tensor may expand to (N x K)",
    ),
    ("--max-lora-rank", "max_lora_rank", int, "largest LoRA rank create_model accepts"),
    (
        "--sampler-max-batch",
        "sampler_max_batch",
        int,
        "sequences decoded together in one decode pass",
    ),
    (
        "--sampler-max-prefill-tokens",
        "sampler_max_prefill_tokens",
        int,
        "prompt tokens prefilled in one pass (a longer prompt runs alone)",
    ),
    ("--max-num-samples", "max_num_samples", int, "num_samples one sample request may ask for"),
    (
        "--max-sample-tokens",
        "max_sample_tokens",
        int,
        "num_samples x (prompt + max_tokens) of one sample request (bounds its KV cache)",
    ),
    ("--max-stop-strings", "max_stop_strings", int, "stop strings one sample request may give"),
    ("--max-stop-string-chars", "max_stop_string_chars", int, "characters of one stop string"),
    (
        "--max-datums-per-request",
        "max_datums_per_request",
        int,
        "datums in one forward_backward request",
    ),
    (
        "--max-metadata-bytes",
        "max_metadata_bytes",
        int,
        "JSON bytes of a training run's user_metadata",
    ),
    ("--max-list-limit", "max_list_limit", int, "largest page a list route returns"),
    (
        "--max-name-chars",
        "max_name_chars",
        int,
        "characters of a session's tags, project id and display name",
    ),
    (
        "--max-topk-prompt-logprobs",
        "max_topk_prompt_logprobs",
        int,
        "largest topk_prompt_logprobs a sample request may ask for",
    ),
    (
        "--ephemeral-samplers-per-model",
        "ephemeral_samplers_per_model",
        int,
        "unnamed samplers (save_weights_and_get_sampling_client) kept per training model;"
        " older ones are dropped",
    ),
    (
        "--oai-cached-checkpoints",
        "oai_cached_checkpoints",
        int,
        "checkpoint adapters the OpenAI-compatible endpoint keeps loaded (most recently used)",
    ),
    (
        "--retry-window",
        "retry_window",
        int,
        "recent seq_ids per model (and sample submits overall) remembered, so a"
        " retried submit runs once",
    ),
    (
        "--session-timeout-seconds",
        "session_timeout_seconds",
        float,
        "a session without heartbeats for this long ends; its models and samplers are unloaded",
    ),
    ("--max-models-per-user", "max_models_per_user", int, "live training models per user"),
    ("--max-samplers-per-user", "max_samplers_per_user", int, "sampling sessions per user"),
    (
        "--max-queued-tokens-per-user",
        "max_queued_tokens_per_user",
        int,
        "forward/backward tokens a user may have queued (not yet running)",
    ),
    (
        "--max-checkpoint-bytes-per-user",
        "max_checkpoint_bytes_per_user",
        int,
        "bytes of checkpoints a user may keep on disk",
    ),
    (
        "--long-poll-seconds",
        "long_poll_seconds",
        float,
        "how long retrieve_future holds a poll before answering try_again; keep it under"
        " the SDK's 45 s read timeout",
    ),
    (
        "--shutdown-seconds",
        "shutdown_seconds",
        float,
        "on SIGTERM/SIGINT, how long running and queued work may take to finish before it"
        " is failed",
    ),
    (
        "--future-retention-seconds",
        "future_retention_seconds",
        float,
        "how long a finished request's result can still be fetched",
    ),
    (
        "--export-url-seconds",
        "export_url_seconds",
        float,
        "how long a signed download URL of external weights (save_weights_external) stays valid",
    ),
    (
        "--trace-spans-per-session",
        "trace_spans_per_session",
        int,
        "spans (queue waits, passes, steps, samples) kept per session for"
        " export_session_trace; the newest are kept",
    ),
    (
        "--trace-sessions",
        "trace_sessions",
        int,
        "sessions whose traces are kept (the most recently active)",
    ),
    (
        "--workers",
        "workers",
        _ranks,
        "rank processes per base model: 1 computes in the server process; N > 1 trains data"
        " parallel and spreads sampling over N ranks, each holding the model (gloo on CPU,"
        " NCCL on CUDA)",
    ),
    (
        "--worker-listen",
        "worker_listen",
        _address,
        "HOST:PORT where ranks connect (port 0: any free one; model i of several uses"
        " PORT + i); give an address other machines reach for `treadle worker --join`",
    ),
    (
        "--collective-timeout-seconds",
        "collective_timeout_seconds",
        float,
        "timeout of every collective and of the ranks' rendezvous; a rank stuck longer exits"
        " and its group restarts; requests wait this long for a restarting group",
    ),
    (
        "--max-custom-losses-per-session",
        "max_custom_losses_per_session",
        int,
        "custom losses one session may create (create_custom_loss)",
    ),
    (
        "--max-custom-loss-nodes",
        "max_custom_loss_nodes",
        int,
        "nodes in one custom loss graph",
    ),
]

# SDK features turned on through the client config: (flag, Settings field, help).
_SWITCHES: list[tuple[str, str, str]] = [
    (
        "--sample-cancel",
        "sample_cancel",
        "abandoned sample futures send cancel_future; a sample still queued then never runs",
    ),
    (
        "--sample-retrieve-futures",
        "sample_retrieve_futures",
        "sampling clients wait on one retrieve_futures long-poll per sampling session instead"
        " of one retrieve_future per sample",
    ),
    (
        "--custom-loss-server-side",
        "custom_loss_server_side",
        "create_custom_loss uploads per-datum losses and forward_backward_custom runs them on"
        " the server in one pass; off: they run client-side (a forward plus a"
        " forward_backward)",
    ),
]


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument(
        "--host", default=defaults.host, help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="port (default %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="where the database, converted models and checkpoints live"
        " (default $TREADLE_DATA_DIR or ~/.treadle)",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model_entry,
        metavar="NAME=SOURCE",
        help="serve a base model under NAME; SOURCE is a Hugging Face model folder or a hub id"
        " already in the local HF cache. Repeatable. 'embedded' alone is the built-in"
        f" {EMBEDDED_DEFAULT.name}, which is served when no --model is given",
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="torch device, e.g. cpu or cuda (default %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=defaults.dtype,
        help="base model weights' dtype (default float32 on CPU, bfloat16 on GPUs)",
    )
    parser.add_argument(
        "--thin-matmul",
        action=argparse.BooleanOptionalAction,
        default=defaults.thin_matmul,
        help="decode matmuls through the AVX2 kernel on x86 CPUs, else torch.mm"
        " (default on, unless TREADLE_THIN_MATMUL=0)",
    )
    parser.add_argument(
        "--local-workers",
        type=int,
        default=defaults.local_workers,
        metavar="M",
        help="how many of the --workers ranks this server starts itself (default: all); the"
        " others join with `treadle worker --join HOST:PORT` on other machines",
    )
    parser.add_argument(
        "--sharded",
        action="store_true",
        help="the base model's weights divided across the --workers N ranks with FSDP2, for a"
        " model larger than one device; compute is not divided and sampling does not scale"
        ' (see README, "Beyond one process")',
    )
    for flag, name, kind, text in _LIMITS:
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=getattr(defaults, name),
            help=f"{text} (default %(default)s)",
        )
    for flag, name, text in _SWITCHES:
        parser.add_argument(
            flag,
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=getattr(defaults, name),
            help=f"{text} (default {'on' if getattr(defaults, name) else 'off'})",
        )
    parser.add_argument(
        "--log-level", default="info", help="debug, info, warning (default %(default)s)"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=defaults.log_format,
        help="text, or json: one JSON object per line on stderr, with one line per finished"
        " request (id, user, model, kind, tokens, queue wait, run time, outcome)"
        " (default %(default)s)",
    )


def settings_of(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` that ``serve`` or ``demo`` arguments ask for."""
    return Settings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        models=tuple(args.models) if args.models else (EMBEDDED_DEFAULT,),
        device=args.device,
        dtype=args.dtype,
        thin_matmul=args.thin_matmul,
        log_format=args.log_format,
        local_workers=args.local_workers,
        sharded=args.sharded,
        **{name: getattr(args, name) for _, name, _, _ in _LIMITS},
        **{name: getattr(args, name) for _, name, _ in _SWITCHES},
    )


def serve(args: argparse.Namespace) -> int:
    problem = _workers_problem(settings_of(args))  # before the imports below: seconds
    if problem:
        print(f"treadle serve: {problem}", file=sys.stderr)
        return 2
    if args.log_format == "json":
        # Progress bars (loading weights) would print text among the JSON lines; read
        # when the Hugging Face libraries are imported, just below.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from treadle.engine.embedded import EmbeddedModelMissing
    from treadle.engine.models import ModelSourceError, resolve_folder
    from treadle.engine.worker import load_worker
    from treadle.server.app import create_app
    from treadle.server.serving import run

    settings = settings_of(args)
    setup_logging(args.log_level, settings.log_format)
    if _refuses_to_open(settings):
        return 2
    try:
        # Check every model source first: a typo fails here with one line, not after
        # the server has started loading the others.
        for entry in settings.models:
            resolve_folder(entry.source, settings.data_dir)
    except (ModelSourceError, EmbeddedModelMissing) as exc:
        print(f"treadle serve: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from treadle.engine.group import load_group

        app = create_app(settings, load_group)
    else:
        app = create_app(settings, load_worker)
    run(
        app,
        settings.host,
        settings.port,
        args.log_level.lower(),
        settings.shutdown_seconds,
        settings.log_format,
    )
    return 0


def serve_argv(settings: Settings) -> list[str]:
    """The ``treadle serve`` arguments that reproduce ``settings``."""
    argv = ["--host", settings.host, "--port", str(settings.port)]
    argv += ["--data-dir", str(settings.data_dir), "--device", settings.device]
    if settings.dtype:
        argv += ["--dtype", settings.dtype]
    argv.append("--thin-matmul" if settings.thin_matmul else "--no-thin-matmul")
    argv += ["--log-format", settings.log_format]
    for flag, name, _, _ in _LIMITS:
        argv += [flag, str(getattr(settings, name))]
    if settings.local_workers is not None:
        argv += ["--local-workers", str(settings.local_workers)]
    if settings.sharded:
        argv.append("--sharded")
    for entry in settings.models:
        argv += [
            "--model",
            "embedded" if entry == EMBEDDED_DEFAULT else f"{entry.name}={entry.source}",
        ]
    return argv


def _workers_problem(settings: Settings) -> str | None:
    """What is wrong with the worker-group flags together, if anything (each alone is
    checked as it is parsed)."""
    local = settings.local_workers
    if local is not None and not 0 <= local <= settings.workers:
        return f"--local-workers {local}: give 0 to --workers ({settings.workers})"
    if settings.sharded and settings.workers < 2:
        return "--sharded divides the model across ranks: give --workers N with N > 1"
    return None


def _refuses_to_open(settings: Settings) -> bool:
    from treadle.service.auth import open_to_network_without_keys
    from treadle.service.store import Store

    store = Store(settings.db_path)
    try:
        if not open_to_network_without_keys(settings.host, store):
            return False
    finally:
        store.close()
    print(
        f"treadle serve: refusing to serve {settings.host} without API keys: anyone who can"
        " reach it could use it. Create one first with `treadle keys create --user NAME"
        f" --data-dir {settings.data_dir}`, or bind to 127.0.0.1",
        file=sys.stderr,
    )
    return True


def keys(args: argparse.Namespace) -> int:
    """``treadle keys create | list | revoke``: the data dir's API keys."""
    from treadle.service.auth import create_key, list_keys, revoke_key
    from treadle.service.store import Store

    store = Store(Settings(data_dir=args.data_dir).db_path)
    try:
        if args.action == "create":
            try:
                key = create_key(store, args.user)
            except ValueError as exc:
                print(f"treadle keys: {exc}", file=sys.stderr)
                return 2
            print(f"a key for {args.user} (shown once; only its hash is stored):")
            print(key)
            return 0
        if args.action == "list":
            for row in list_keys(store):
                state = "revoked" if row.revoked_at is not None else "active"
                print(f"{row.prefix}…\t{row.user}\t{state}")
            return 0
        revoked = revoke_key(store, args.key)
        if not revoked:
            print(f"treadle keys: no active key {args.key!r}", file=sys.stderr)
            return 1
        for row in revoked:
            print(f"revoked {row.prefix}… of {row.user}")
        return 0
    finally:
        store.close()


def usage(args: argparse.Namespace) -> int:
    """``treadle usage``: tokens spent per user, base model and kind, from the data dir
    (a running server writes its counts every few seconds)."""
    from treadle.service.store import Store

    store = Store(Settings(data_dir=args.data_dir).db_path)
    try:
        totals: dict[tuple[str, str, str], int] = {}
        for row in store.usage(args.user):
            key = (row.user, row.base_model, row.kind)
            totals[key] = totals.get(key, 0) + row.tokens
    finally:
        store.close()
    print("user\tbase model\tkind\ttokens")
    for (user, base_model, kind), tokens in sorted(totals.items()):
        print(f"{user}\t{base_model}\t{kind}\t{tokens}")
    return 0


def adapters(args: argparse.Namespace) -> int:
    """``treadle adapters import``: a PEFT LoRA folder becomes a checkpoint of a new
    training run; its ``tinker://`` path is the last line printed."""
    from treadle.engine.adapter_fit import check_fits
    from treadle.engine.embedded import EmbeddedModelMissing
    from treadle.engine.models import resolve_folder
    from treadle.errors import StorageFull, UserInputError
    from treadle.service.adapters import base_model_entry, import_adapter
    from treadle.service.store import Store

    def refuse(message: str) -> int:
        print(f"treadle adapters import: {message}", file=sys.stderr)
        return 2

    db_path = Settings(data_dir=args.data_dir).db_path
    if not db_path.is_file():
        return refuse(
            f"{args.data_dir} is no treadle data dir; give the server's --data-dir (or run"
            " `treadle serve` on it once)"
        )
    store = Store(db_path)
    try:
        try:
            base = base_model_entry(store, args.base_model)
            model_folder = resolve_folder(base.source, args.data_dir)
        except (ValueError, EmbeddedModelMissing) as exc:
            served = ", ".join(store.served_models()) or "none yet"
            return refuse(
                f"--base-model {args.base_model!r}: {exc}. Give a name a server on this data"
                f" dir served ({served}), or NAME=SOURCE as `treadle serve --model` takes it"
            )
        try:
            path = import_adapter(
                store,
                args.data_dir,
                args.folder,
                base,
                model_folder,
                check_fits,
                name=args.name,
                user=args.user,
                allow_other_base=args.allow_other_base,
            )
        except UserInputError as exc:
            return refuse(str(exc))
        except StorageFull as exc:
            print(f"treadle adapters import: {exc}", file=sys.stderr)
            return 1
    finally:
        store.close()
    print(f"imported {args.folder} for user {args.user} on base model {base.name}:")
    print(path.tinker_path)
    return 0


def demo(args: argparse.Namespace) -> int:
    from treadle.demo import run_demo

    settings = settings_of(args)
    return run_demo(settings, serve_argv(settings))


def worker(args: argparse.Namespace) -> int:
    """``treadle worker --join HOST:PORT``: one rank of a server's worker group, on this
    machine, kept running across the group's restarts."""
    from treadle.engine.join import join, parse_address, read_secret

    try:
        address = parse_address(args.join)
    except ValueError as exc:
        print(f"treadle worker: --join: {exc}", file=sys.stderr)
        return 2
    try:
        secret = read_secret(args.secret_file, args.data_dir)
    except (OSError, ValueError) as exc:
        print(
            f"treadle worker: no worker secret ({exc}); copy the server's"
            " DATA_DIR/worker-secret here and pass it with --secret-file, or set"
            " $TREADLE_WORKER_SECRET",
            file=sys.stderr,
        )
        return 2
    try:
        return join(address, secret, args.data_dir, args.device, args.log_level)
    except KeyboardInterrupt:
        return 0


def models(args: argparse.Namespace) -> int:
    """Prepare (convert) the embedded model and print where it lives."""
    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    print(f"{EMBEDDED_DEFAULT.name}\t{folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treadle", description="A self-hosted server for the Tinker training API."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p_serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Serve the Tinker API. Point the SDK at it with"
        " TINKER_BASE_URL=http://HOST:PORT and TINKER_API_KEY=<a key from `treadle keys"
        " create`>; with no keys at all, a server on 127.0.0.1 takes any tml- key.",
    )
    _add_server_args(p_serve)
    p_serve.set_defaults(func=serve)
    p_demo = commands.add_parser(
        "demo",
        help="start a server, run the demo through the official SDK, print where to watch"
        " and use its models; then stop (at a terminal: serve until Ctrl-C)",
    )
    _add_server_args(p_demo)
    p_demo.set_defaults(func=demo)
    p_worker = commands.add_parser(
        "worker",
        help="run ranks of a server's worker group on this machine (serve --workers N"
        " --local-workers M)",
        description="Join the worker group of a `treadle serve --workers N --local-workers M`"
        " server on another machine as one of its N - M other ranks, and stay joined"
        " across the group's restarts. The rank loads the served model from the same"
        " source the server names (the same folder path, a hub id in this machine's HF"
        " cache, or embedded) and uses this machine's torch device. Ranks and the server"
        " talk over unencrypted TCP (commands authenticated with the secret; the"
        " torch.distributed traffic not at all): use a trusted network.",
    )
    p_worker.add_argument(
        "--join",
        required=True,
        metavar="HOST:PORT",
        help="the server's --worker-listen address (its log says it at start-up)",
    )
    p_worker.add_argument(
        "--secret-file",
        type=Path,
        help="a copy of the server's DATA_DIR/worker-secret (default: $TREADLE_WORKER_SECRET,"
        " else this --data-dir's worker-secret)",
    )
    p_worker.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="where this machine keeps converted models (default $TREADLE_DATA_DIR or ~/.treadle)",
    )
    p_worker.add_argument(
        "--device", help="this rank's torch device, e.g. cuda:1 (default: the server's)"
    )
    p_worker.add_argument(
        "--log-level", default="warning", help="debug, info, warning (default %(default)s)"
    )
    p_worker.set_defaults(func=worker)
    p_models = commands.add_parser(
        "models", help="convert the embedded default model once and print its folder"
    )
    p_models.add_argument("--data-dir", type=Path, default=default_data_dir())
    p_models.set_defaults(func=models)
    p_keys = commands.add_parser(
        "keys",
        help="create, list or revoke API keys",
        description="API keys of the server's users. As soon as one exists, every request"
        " needs one; keys created or revoked here take effect on a running server within a"
        " second.",
    )
    actions = p_keys.add_subparsers(dest="action", required=True)
    p_create = actions.add_parser("create", help="print a new key for a user (its last line)")
    p_create.add_argument("--user", required=True, help="the user the key acts as")
    p_list = actions.add_parser("list", help="users and key prefixes (never whole keys)")
    p_revoke = actions.add_parser("revoke", help="revoke a key, given whole or by its prefix")
    p_revoke.add_argument("key", metavar="KEY_OR_PREFIX")
    for sub in (p_create, p_list, p_revoke):
        sub.add_argument("--data-dir", type=Path, default=default_data_dir())
    p_keys.set_defaults(func=keys)
    p_usage = commands.add_parser(
        "usage",
        help="tokens spent per user, base model and kind (prefill, sampled, trained, forward)",
    )
    p_usage.add_argument("--user", help="only this user")
    p_usage.add_argument("--data-dir", type=Path, default=default_data_dir())
    p_usage.set_defaults(func=usage)
    p_adapters = commands.add_parser("adapters", help="bring LoRA adapters made elsewhere in")
    adapter_actions = p_adapters.add_subparsers(dest="action", required=True)
    p_import = adapter_actions.add_parser(
        "import",
        help="register a PEFT LoRA folder as a training checkpoint (its tinker:// path is"
        " the last line printed)",
        description="Copy a PEFT LoRA adapter folder (adapter_config.json +"
        " adapter_model.safetensors, as peft's save_pretrained writes it) into the data dir"
        " as the `weights` checkpoint of a new training run of USER. Everything is checked"
        " first; on any problem nothing is written and the exit code is 2. Works while the"
        " server runs. create_training_client_from_state(PATH) continues training it (it"
        " has no optimizer state, so the _with_optimizer variant refuses it);"
        " create_sampling_client(model_path=PATH) samples it.",
    )
    p_import.add_argument("folder", type=Path, metavar="FOLDER", help="the PEFT adapter folder")
    p_import.add_argument(
        "--base-model",
        required=True,
        metavar="NAME",
        help="the served base model it was trained on: a name a server on this data dir"
        " served, or NAME=SOURCE as `treadle serve --model` takes it",
    )
    p_import.add_argument(
        "--name", help="the checkpoint's name (default: FOLDER's name); one per user's imports"
    )
    p_import.add_argument(
        "--user",
        default="local",
        help="who owns it: a user with an API key, or local (the default) on a data dir"
        " without keys",
    )
    p_import.add_argument(
        "--allow-other-base",
        action="store_true",
        help="accept an adapter whose adapter_config.json names another base model (the same"
        " weights under another name or folder); its shapes must still fit",
    )
    p_import.add_argument("--data-dir", type=Path, default=default_data_dir())
    p_adapters.set_defaults(func=adapters)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from treadle.engine.process import ensure_tuned_process

        ensure_tuned_process(list(argv) if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
