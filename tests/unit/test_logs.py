"""The JSON log format, and what recording one finished request writes and counts."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from treadle.logs import JsonFormatter
from treadle.service.metrics import Finished, Metrics


def _record(**extra: object) -> logging.LogRecord:
    logger = logging.getLogger("treadle.test")
    record = logger.makeRecord("treadle.test", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_holds_the_message_and_every_extra_field():
    line = JsonFormatter().format(_record(user="alice", tokens=12, path=object()))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "a b" and entry["level"] == "WARNING"
    assert entry["logger"] == "treadle.test" and entry["time"].endswith("+00:00")
    assert entry["user"] == "alice" and entry["tokens"] == 12
    assert entry["path"].startswith("<object object")  # kept as text, not dropped
    assert not {"msg", "args", "levelno", "pathname", "color_message"} & set(entry)


def test_a_json_line_carries_the_traceback_on_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = _record()
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: bad\nvalue" in json.loads(line)["exception"]


def test_a_finished_request_is_counted_and_logged(caplog: pytest.LogCaptureFixture):
    metrics = Metrics()
    done = Finished("req-1", "alice", "m", "s:sample:0", "sample", 7, 11, 0.25, 1.5, "ok")
    failed = Finished(
        "req-2", "bob", "m", "s:train:0", "forward_backward", 5, 0, 0.0, 0.0, "user_error"
    )
    with caplog.at_level(logging.INFO, logger="treadle.requests"):
        metrics.finished(done)
        metrics.finished(failed)
    value = metrics.registry.get_sample_value
    assert value("treadle_prompt_tokens_total", {"model": "m"}) == 7
    assert value("treadle_sampled_tokens_total", {"model": "m"}) == 11
    assert value("treadle_e2e_sample_latency_seconds_sum", {"model": "m"}) == 1.75
    # A refused forward_backward trained nothing.
    assert value("treadle_training_tokens_total", {"model": "m", "kind": "forward_backward"}) in (
        None,
        0.0,
    )
    labels = {"model": "m", "kind": "forward_backward", "outcome": "user_error"}
    assert value("treadle_requests_total", labels) == 1
    first, second = caplog.records
    assert first.getMessage() == (
        "sample req-1 user=alice model=s:sample:0 tokens=7 sampled_tokens=11"
        " queue=0.250s run=1.500s ok"
    )
    assert [getattr(second, f) for f in ("user", "outcome", "tokens")] == ["bob", "user_error", 5]
