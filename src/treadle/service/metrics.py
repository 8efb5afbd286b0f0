"""What an operator watches: Prometheus metrics and the request log.

``GET /metrics`` serves :attr:`Metrics.registry` in the Prometheus text format. Names
follow Prometheus's conventions (base units: seconds and bytes; ``_total`` for counters)
with a ``treadle_`` prefix where vLLM uses ``vllm:``, and vLLM's vocabulary where the
concept is the same (time to first token, end-to-end latency, prompt and generated
tokens). Labels are bounded: a served base model's name, a request kind, an outcome, an
HTTP route template, method and status; never a user, a key, an id or a raw path, so
what a user sends can't grow the number of series.

Three kinds of instruments:

- counters and histograms the service records into as work happens (engine loop: cycle
  and decode-step times, time to first token; HTTP: requests by route and status);
- everything known about a request once it finishes (:class:`Finished`, recorded in one
  place, where futures resolve): tokens, queue wait, run time, outcome, and one log line
  on the ``treadle.requests`` logger;
- live gauges (queues, loaded models, samplers, sessions) read from the service at
  scrape time, so they cost nothing between scrapes and are never stale; and the
  process's own (resident memory, CPU seconds, open files) from prometheus-client's
  process collector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

request_log = logging.getLogger("treadle.requests")

# Request kinds whose tokens are training tokens (forward_backward or forward only).
TRAINING_KINDS = ("forward_backward", "forward")
SAMPLE_KIND = "sample"

# Bucket upper bounds in seconds. A decode step is milliseconds on a GPU and tens of
# milliseconds on a CPU; queue waits, cycles and whole requests reach minutes under load.
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


@dataclass(frozen=True, slots=True)
class Finished:
    """A request that got its answer. ``base_model`` is a served model's name (empty when
    the request was refused before one was known: a label must never carry what a user
    typed); ``model_id`` is its training model or sampling session. ``tokens`` are the
    datum tokens of a forward(_backward) or a sample's prompt tokens; ``sampled_tokens``
    the tokens a sample generated. ``outcome``: ``ok``, ``user_error`` or
    ``server_error``."""

    request_id: str
    user: str
    base_model: str
    model_id: str
    kind: str
    tokens: int
    sampled_tokens: int
    queue_seconds: float
    run_seconds: float
    outcome: str


LiveRead = Callable[[], Mapping[tuple[str, ...], float]]


class _Live(Collector):
    """A gauge whose values ``read`` returns at scrape time (label values -> value)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], read: LiveRead):
        self._name, self._documentation, self._labels, self._read = (
            name,
            documentation,
            labels,
            read,
        )

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self._name, self._documentation, labels=list(self._labels))

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, value in self._read().items():
            family.add_metric(list(values), value)
        return [family]


class Metrics:
    """One server's instruments, in a registry of its own (so apps and tests never share
    series). Recording is thread-safe: engine threads and the event loop both record."""

    def __init__(self) -> None:
        # No ``*_created`` series (a creation timestamp per counter and histogram, which
        # would double the scrape; Prometheus ignores them by default). Process-wide: the
        # server is this library's only user in its process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds, … (Linux).
        ProcessCollector(registry=self.registry)
        r = self.registry
        self._http = Counter(
            "treadle_http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self._requests = Counter(
            "treadle_requests_total",
            "Requests (futures) finished, by base model, kind and outcome.",
            ["model", "kind", "outcome"],
            registry=r,
        )
        self._queue_seconds = Histogram(
            "treadle_request_queue_seconds",
            "Seconds a finished request waited before it started running.",
            ["model", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._run_seconds = Histogram(
            "treadle_request_run_seconds",
            "Seconds a finished request ran (from its start to its answer).",
            ["model", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._training_tokens = Counter(
            "treadle_training_tokens_total",
            "Datum tokens of successful forward_backward and forward requests.",
            ["model", "kind"],
            registry=r,
        )
        self._prompt_tokens = Counter(
            "treadle_prompt_tokens_total",
            "Prompt tokens of successful samples.",
            ["model"],
            registry=r,
        )
        self._sampled_tokens = Counter(
            "treadle_sampled_tokens_total",
            "Tokens generated by successful samples (all their sequences).",
            ["model"],
            registry=r,
        )
        self._e2e = Histogram(
            "treadle_e2e_sample_latency_seconds",
            "Seconds from a sample's arrival to its answer (successful samples).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "treadle_time_to_first_token_seconds",
            "Seconds from a sample's arrival to the end of the decode step that prefilled"
            " its prompt and chose its first tokens.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._cycle = Histogram(
            "treadle_cycle_seconds",
            "Seconds of a training cycle's packed forward/backward passes (decode steps run"
            " between its layers are included).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._decode_step = Histogram(
            "treadle_decode_step_seconds",
            "Seconds of one sampler step: prefill of newly admitted prompts, if any, and"
            " one token for every running sequence.",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )

    def live(self, name: str, documentation: str, labels: tuple[str, ...], read: LiveRead) -> None:
        """A gauge read from the service at each scrape."""
        self.registry.register(_Live(name, documentation, labels, read))

    def http_request(self, route: str, method: str, status: int) -> None:
        self._http.labels(route, method, str(status)).inc()

    def cycle(self, model: str, seconds: float) -> None:
        self._cycle.labels(model).observe(seconds)

    def decode_step(self, model: str, seconds: float) -> None:
        self._decode_step.labels(model).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self._ttft.labels(model).observe(seconds)

    def finished(self, done: Finished) -> None:
        """Count a finished request and write its log line."""
        model, kind = done.base_model, done.kind
        self._requests.labels(model, kind, done.outcome).inc()
        self._queue_seconds.labels(model, kind).observe(done.queue_seconds)
        self._run_seconds.labels(model, kind).observe(done.run_seconds)
        if done.outcome == "ok":
            if kind in TRAINING_KINDS:
                self._training_tokens.labels(model, kind).inc(done.tokens)
            elif kind == SAMPLE_KIND:
                self._prompt_tokens.labels(model).inc(done.tokens)
                self._sampled_tokens.labels(model).inc(done.sampled_tokens)
                self._e2e.labels(model).observe(done.queue_seconds + done.run_seconds)
        if not request_log.isEnabledFor(logging.INFO):
            return
        # The message reads on its own in text logs; JSON logs carry the fields as well.
        request_log.info(
            "%s %s user=%s model=%s tokens=%d sampled_tokens=%d queue=%.3fs run=%.3fs %s",
            kind,
            done.request_id,
            done.user,
            done.model_id or done.base_model or "-",
            done.tokens,
            done.sampled_tokens,
            done.queue_seconds,
            done.run_seconds,
            done.outcome,
            extra=asdict(done),
        )
