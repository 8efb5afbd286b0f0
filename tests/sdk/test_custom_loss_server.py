"""Server-side custom losses (``create_custom_loss`` with ``--custom-loss-server-side``):
the same numbers as the SDK's client path, only allow-listed operations, failures that
are the user's and change nothing, and losses that belong to their session and user.

Two servers serve the same tiny model: ``on`` runs uploaded losses itself (with small
passes, so a request's datums also span several passes), the suite's shared ``server``
has the flag off, so the SDK runs the very same traced losses client-side (a forward,
then a cross_entropy forward_backward with ``weights = -dC/dlogprobs``). The client path
is the reference: every number here is compared with it, never with a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import TensorData, types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

# A large eps: Adam moves a parameter whose gradient is float noise by up to the whole
# learning rate, in the noise's direction. Some losses have such parameters (reverse_kl is
# invariant to shifting a position's K logprobs, so every unembedding row but the targets'
# gets a gradient that is zero up to rounding), and packing the same datums into other
# passes changes the rounding. Real gradients here are far above 1e-4.
ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-4)
PROBE = [10, 20, 30, 40, 50, 60, 70]
PASS_TOKENS = 64


@pytest.fixture(scope="module")
def on(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]):
    """A server running custom losses itself (the default); alice and bob are two users of
    it."""
    data_dir = tmp_path_factory.mktemp("custom-loss-on") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    args = ["--long-poll-seconds", "2"]
    args += ["--max-tokens-per-pass", str(PASS_TOKENS), "--max-custom-losses-per-session", "12"]
    args += ["--max-custom-loss-nodes", "64"]
    srv = Server({QWEN: tiny_models[QWEN]}, data_dir, args)
    yield srv, alice, bob
    srv.stop()


@pytest.fixture()
def on_client(on):
    """A new session of alice's per test (the SDK creates one loss per graph per session)."""
    srv, alice, _ = on
    client = tinker.ServiceClient(base_url=srv.url, api_key=alice)
    yield client
    client.close("success")


def _model(client: Any, seed: int) -> tinker.TrainingClient:
    return client.create_lora_training_client(base_model=QWEN, rank=8, seed=seed).result()


def _probe(tc: tinker.TrainingClient) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROBE[:-1]),
        loss_fn_inputs={"target_tokens": PROBE[1:]},
    )
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def _f32(values: Any) -> TensorData:
    return TensorData.from_numpy(np.asarray(values, dtype=np.float32))


# -- per-datum losses, as a researcher writes them ------------------------------------


def logprob_squared(logprobs):
    loss = (logprobs**2).sum()
    return loss, {"custom/logprob_sq:sum": loss}


def importance_sampling(logprobs, logprobs_old, advantages):
    ratio = torch.exp(logprobs - logprobs_old)
    loss = -(ratio * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean()}


def ppo_clip(logprobs, logprobs_old, advantages):
    ratio = torch.exp(logprobs - logprobs_old)
    clipped = torch.clamp(ratio, 1 - 0.2, 1 + 0.2)
    loss = -torch.min(ratio * advantages, clipped * advantages).sum()
    clipfrac = ((ratio - 1).abs() > 0.2).float().mean()
    return loss, {"custom/clipfrac:mean": clipfrac}


def kl_policy_gradient(logprobs, logprobs_old, ref_logprobs, advantages, beta):
    ratio = torch.exp(logprobs - logprobs_old)
    log_r = ref_logprobs - logprobs
    kl = (torch.exp(log_r) - log_r - 1).sum()
    loss = -(ratio * advantages).sum() + beta * kl
    return loss, {"custom/kl:mean": kl.detach(), "custom/pg:sum": -(ratio * advantages).sum()}


def entropy_bonus(logprobs, advantages):
    p = logprobs.exp()
    entropy = -(p * logprobs).sum()
    loss = -(logprobs * advantages).sum() - 0.01 * entropy
    return loss, {"custom/entropy:mean": entropy}


def reverse_kl(logprobs, weights):
    slot_mask = weights > 0
    position_mask = slot_mask.any(dim=-1).float()
    safe_weights = weights.clamp(min=1e-30)
    teacher_log = torch.where(slot_mask, torch.log(safe_weights), torch.zeros_like(weights))
    neg_inf = torch.full_like(logprobs, float("-inf"))
    masked_logp = torch.where(slot_mask, logprobs, neg_inf)
    log_p = torch.log_softmax(masked_logp, dim=-1)
    log_p = torch.nan_to_num(log_p, nan=0.0, neginf=0.0)
    p = log_p.exp()
    adv = (log_p - teacher_log).detach()
    per_pos = (p * adv * slot_mask.float()).sum(dim=-1)
    loss = (per_pos * position_mask).sum()
    return loss, {
        "custom/reverse_kl:sum": loss.detach(),
        "custom/positions:sum": position_mask.sum(),
    }


def weighted_nll(logprobs, weights, scale):
    loss = -(logprobs * weights).sum() * scale / math.sqrt(2.0)
    return loss, {"custom/tokens:sum": weights.sum()}


def _rl_datum(rng: np.random.Generator, length: int) -> types.Datum:
    tokens = rng.integers(0, 256, length + 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": tokens[1:].tolist(),
            "logprobs_old": _f32(-rng.uniform(4.5, 6.5, length)),
            "ref_logprobs": _f32(-rng.uniform(4.5, 6.5, length)),
            "advantages": _f32(rng.normal(0, 1, length)),
            "weights": _f32(rng.uniform(0, 1, length)),
            "beta": TensorData.from_numpy(np.array(0.3, dtype=np.float32)),
            "scale": TensorData.from_numpy(np.array(1.7, dtype=np.float32)),
        },
    )


def _topk_datum(rng: np.random.Generator, length: int, k: int = 4) -> types.Datum:
    tokens = rng.integers(0, 256, length + 1)
    targets = rng.integers(0, 256, (length, k))
    weights = rng.dirichlet(np.ones(k), length)
    weights[:, -1] = 0.0  # a padded slot
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(targets.astype(np.int64)),
            "weights": _f32(weights),
        },
    )


LOSSES: list[tuple[Callable[..., Any], dict[str, int]]] = [
    (logprob_squared, {"logprobs": 1}),
    (importance_sampling, {"logprobs": 1, "logprobs_old": 1, "advantages": 1}),
    (ppo_clip, {"logprobs": 1, "logprobs_old": 1, "advantages": 1}),
    (
        kl_policy_gradient,
        {"logprobs": 1, "logprobs_old": 1, "ref_logprobs": 1, "advantages": 1, "beta": 0},
    ),
    (entropy_bonus, {"logprobs": 1, "advantages": 1}),
    (reverse_kl, {"logprobs": 2, "weights": 2}),
    (weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0}),
]


def _data(fn: Callable[..., Any], seed: int, count: int = 4) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    make = _topk_datum if fn is reverse_kl else _rl_datum
    return [make(rng, int(n)) for n in rng.integers(5, 40, count)]


def _compare(server_side: Any, client_side: Any) -> None:
    """Two ForwardBackwardOutputs of the same loss: loss, custom metrics, logprobs."""
    got, want = server_side.metrics, client_side.metrics
    assert got["loss:sum"] == pytest.approx(want["loss:sum"], rel=1e-4, abs=1e-4)
    custom = {k for k in want if k.startswith("custom/")}
    assert custom and custom == {k for k in got if k.startswith("custom/")}
    for key in custom:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    assert len(server_side.loss_fn_outputs) == len(client_side.loss_fn_outputs)
    for a, b in zip(server_side.loss_fn_outputs, client_side.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize(("fn", "ranks"), LOSSES, ids=[fn.__name__ for fn, _ in LOSSES])
def test_same_numbers_as_the_client_path(on_client, service_client, fn, ranks):
    seed = 100 + LOSSES.index((fn, ranks))
    mine, theirs = _model(on_client, seed), _model(service_client, seed)
    uploaded = on_client.create_custom_loss(fn, ranks).result()
    local = service_client.create_custom_loss(fn, ranks).result()
    assert uploaded.loss_id is not None and local.loss_id is None
    data = _data(fn, seed)
    first = mine.forward_backward_custom(data, uploaded).result()
    _compare(first, theirs.forward_backward_custom(data, local).result())
    assert "surrogate_loss:sum" not in first.metrics
    mine.optim_step(ADAM).result()
    theirs.optim_step(ADAM).result()
    moved = _probe(mine)
    np.testing.assert_allclose(moved, _probe(theirs), atol=1e-5)
    # After a step both sides see new logprobs; a second round still agrees.
    again = _data(fn, seed + 50)
    second = mine.forward_backward_custom(again, uploaded).result()
    _compare(second, theirs.forward_backward_custom(again, local).result())
    # forward with the custom loss computes the same loss and nothing else.
    forward = mine.forward(again, "custom", {"loss_id": uploaded.loss_id}).result()
    assert forward.metrics["loss:sum"] == pytest.approx(second.metrics["loss:sum"], rel=1e-5)
    mine.optim_step(ADAM).result()
    theirs.optim_step(ADAM).result()
    np.testing.assert_allclose(_probe(mine), _probe(theirs), atol=1e-5)


def test_chunked_requests_merge_to_the_same_numbers(on_client, service_client):
    """1100 datums: the SDK sends two chunks of custom loss; merged :sum and :mean metrics
    and the update equal the client path's."""
    mine, theirs = _model(on_client, 31), _model(service_client, 31)
    ranks = {"logprobs": 1, "logprobs_old": 1, "advantages": 1}
    uploaded = on_client.create_custom_loss(importance_sampling, ranks).result()
    local = service_client.create_custom_loss(importance_sampling, ranks).result()
    rng = np.random.default_rng(5)
    data = [_rl_datum(rng, int(n)) for n in rng.integers(1, 4, 1100)]
    result = mine.forward_backward_custom(data, uploaded).result()
    assert len(result.loss_fn_outputs) == 1100
    _compare(result, theirs.forward_backward_custom(data, local).result())
    mine.optim_step(ADAM).result()
    theirs.optim_step(ADAM).result()
    np.testing.assert_allclose(_probe(mine), _probe(theirs), atol=1e-5)


def test_requests_longer_than_a_pass_and_packed_with_others(on_client, service_client):
    """One request of 6 x 50 tokens spans several passes; another model's cross_entropy
    request shares the cycle. Both train as they do alone."""
    mine, theirs = _model(on_client, 41), _model(service_client, 41)
    other_on, other_off = _model(on_client, 42), _model(service_client, 42)
    ranks = {"logprobs": 1, "advantages": 1}
    uploaded = on_client.create_custom_loss(entropy_bonus, ranks).result()
    local = service_client.create_custom_loss(entropy_bonus, ranks).result()
    rng = np.random.default_rng(9)
    data = [_rl_datum(rng, 50) for _ in range(6)]
    ce = [_ce_datum(rng, 20) for _ in range(2)]
    first = mine.forward_backward_custom(data, uploaded)
    side = other_on.forward_backward(ce, "cross_entropy")
    _compare(first.result(), theirs.forward_backward_custom(data, local).result())
    assert side.result().metrics["loss:sum"] == pytest.approx(
        other_off.forward_backward(ce, "cross_entropy").result().metrics["loss:sum"], rel=1e-5
    )
    for tc in (mine, theirs, other_on, other_off):
        tc.optim_step(ADAM).result()
    np.testing.assert_allclose(_probe(mine), _probe(theirs), atol=1e-5)
    np.testing.assert_allclose(_probe(other_on), _probe(other_off), atol=1e-5)


def _ce_datum(rng: np.random.Generator, length: int) -> types.Datum:
    tokens = rng.integers(0, 256, length + 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].tolist(), "weights": [1.0] * length},
    )


def test_client_config_flag_follows_the_setting(on, server, service_client):
    srv, alice, _ = on
    for url, key, expected in ((srv.url, alice, True), (server.url, "tml-test", False)):
        config = httpx.post(
            f"{url}/api/v1/client/config", json={}, headers={"X-API-Key": key}
        ).json()
        assert config["custom_loss_server_side"] is expected
    # With the flag off the server takes no graph, even from a client that skips the SDK.
    session = _model(service_client, 1).model_id.split(":train:")[0]
    refused = Raw(server.url, "tml-test").create(session, 0, _graph(_sum_of("logprobs")))
    assert refused.get("category") == "user" and "client-side" in refused["error"]


# -- run-time failures: the user's, and nothing accumulates ---------------------------


def no_logprobs(logprobs, advantages):
    loss = advantages.sum()
    return loss, {}


def not_finite(logprobs):
    loss = torch.log(logprobs).sum()  # logprobs < 0: NaN
    return loss, {}


def shape_error(logprobs, weights):
    loss = (logprobs * weights).sum()
    return loss, {}


def gather_index(logprobs, index):
    loss = torch.gather(logprobs, 0, index.long()).sum()
    return loss, {}


def _bad_datums(rng: np.random.Generator, which: str, length: int) -> list[types.Datum]:
    data = [_rl_datum(rng, length) for _ in range(3)]
    for i, datum in enumerate(data):
        inputs = dict(datum.loss_fn_inputs)
        n = length + 1 if which == "shape" and i == 2 else length
        inputs["weights"] = _f32(np.ones(n))
        index = np.arange(length) + (1000 if which == "index" and i == 2 else 0)
        inputs["index"] = _f32(index)
        data[i] = types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs)
    return data


FAILURES = [
    (no_logprobs, {"logprobs": 1, "advantages": 1}, "does not depend on logprobs"),
    (not_finite, {"logprobs": 1}, "not finite|non-finite"),
    (shape_error, {"logprobs": 1, "weights": 1}, "shape_error.*failed at node 'mul'"),
    (gather_index, {"logprobs": 1, "index": 1}, "failed at node 'gather'.*index"),
]


@pytest.mark.parametrize("length", [8, 40], ids=["one-pass", "several-passes"])
@pytest.mark.parametrize(
    ("fn", "ranks", "message"), FAILURES, ids=[f[0].__name__ for f in FAILURES]
)
def test_runtime_failures_are_the_users_and_accumulate_nothing(
    on_client, fn, ranks, message, length
):
    """A request whose loss fails on any datum is a failed future of category user, and
    adds no gradient for any of its datums: after a good request and the failed one, the
    step equals that of the good request alone."""
    failing, clean = _model(on_client, 61), _model(on_client, 61)
    rng = np.random.default_rng(3)
    good = [_ce_datum(rng, 12)]
    for tc in (failing, clean):
        tc.forward_backward(good, "cross_entropy").result()
    handle = on_client.create_custom_loss(fn, ranks).result()
    which = {"shape_error": "shape", "gather_index": "index"}.get(fn.__name__, "")
    bad = failing.forward_backward_custom(_bad_datums(rng, which, length), handle)
    more = [_ce_datum(rng, 30)]  # right behind it: this one's gradient must stay
    behind = failing.forward_backward(more, "cross_entropy")
    clean.forward_backward(more, "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match=message) as info:
        bad.result()
    assert info.value.category == types.RequestErrorCategory.User
    behind.result()
    for tc in (failing, clean):
        tc.optim_step(ADAM).result()
    np.testing.assert_allclose(_probe(failing), _probe(clean), atol=1e-6)
    # Alone, a failed request leaves no gradient to step on.
    with pytest.raises(tinker.RequestFailedError, match=message):
        failing.forward_backward_custom(_bad_datums(rng, which, length), handle).result()
    with pytest.raises(tinker.RequestFailedError, match="no gradients"):
        failing.optim_step(ADAM).result()


# -- raw HTTP: hostile graphs, missing inputs, ownership -------------------------------


class Raw:
    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": key}, timeout=60)

    def result(self, request_id: str) -> dict[str, Any]:
        while True:
            response = self.http.post("/retrieve_future", json={"request_id": request_id})
            response.raise_for_status()
            answer = response.json()
            if answer.get("type") != "try_again":
                return answer

    def create(self, session_id: str, seq: int, graph: Any, inputs: Any = None) -> dict:
        body = {
            "session_id": session_id,
            "custom_loss_seq_id": seq,
            "name": "hostile",
            "inputs": inputs if inputs is not None else [{"name": "logprobs", "rank": 1}],
            "graph": graph,
            "type": "create_custom_loss",
        }
        response = self.http.post("/create_custom_loss", json=body)
        assert response.status_code == 200, response.text
        return self.result(response.json()["request_id"])


def _ph(name: str = "logprobs") -> dict:
    return {"op": "placeholder", "name": name, "target": name, "args": [], "kwargs": {}}


def _call(name: str, target: str, *args: Any, op: str = "call_function", **kwargs: Any) -> dict:
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


def _out(loss: str, metrics: dict | None = None) -> dict:
    m = {k: {"ref": v} for k, v in (metrics or {}).items()}
    return _call("output", "output", {"tuple": [{"ref": loss}, {"dict": m}]}, op="output")


def _graph(*nodes: dict, loss: str = "s", metrics: dict | None = None) -> dict:
    return {"format": 1, "nodes": [_ph(), *nodes, _out(loss, metrics)]}


def _sum_of(ref: str) -> dict:
    return _call("s", "sum", {"ref": ref}, op="call_method")


def _nest(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


LP = {"ref": "logprobs"}
HOSTILE = {
    "torch.load": (
        _graph(_call("x", "torch.load", "/etc/passwd"), _sum_of("logprobs")),
        "'torch.load'",
    ),
    "torch.save": (
        _graph(_call("x", "torch.save", LP, "/tmp/x"), _sum_of("logprobs")),
        "'torch.save'",
    ),
    "torch.ops": (
        _graph(_call("x", "torch.ops.aten.sum.default", LP), _sum_of("x")),
        "torch.ops.aten",
    ),
    "os.system": (
        _graph(_call("x", "os.system", "touch /tmp/pwned"), _sum_of("logprobs")),
        "'os.system'",
    ),
    "builtins.eval": (
        _graph(_call("x", "builtins.eval", "1"), _sum_of("logprobs")),
        "'builtins.eval'",
    ),
    "getattr __class__": (
        _graph(_call("x", "getattr", LP, "__class__"), _sum_of("logprobs")),
        "__class__",
    ),
    "getattr __globals__": (
        _graph(_call("x", "getattr", LP, "__globals__"), _sum_of("logprobs")),
        "__globals__",
    ),
    "in-place add_": (
        _graph(_call("x", "add_", LP, 1.0, op="call_method"), _sum_of("x")),
        "'add_'",
    ),
    "in-place copy_": (
        _graph(_call("x", "copy_", LP, LP, op="call_method"), _sum_of("x")),
        "'copy_'",
    ),
    "method __reduce_ex__": (
        _graph(_call("x", "__reduce_ex__", LP, 2, op="call_method"), _sum_of("logprobs")),
        "__reduce_ex__",
    ),
    "out=": (_graph(_call("x", "torch.exp", LP, out=LP), _sum_of("x")), "out="),
    "get_attr": (_graph(_call("x", "weight", op="get_attr"), _sum_of("logprobs")), "'get_attr'"),
    "call_module": (
        _graph(_call("x", "lm_head", LP, op="call_module"), _sum_of("x")),
        "'call_module'",
    ),
    "later node": (
        _graph(_call("x", "torch.exp", {"ref": "s"}), _sum_of("x")),
        "'s', which is not an earlier",
    ),
    "unknown node": (_graph(_call("x", "torch.exp", {"ref": "nope"}), _sum_of("x")), "'nope'"),
    "pickle argument": (
        _graph(_call("x", "torch.exp", {"pickle": "gASV"}), _sum_of("x")),
        "pickle",
    ),
    "bad metric key": (_graph(_sum_of("logprobs"), metrics={"loss:sum": "s"}), "loss:sum"),
    "huge constant": (
        _graph(_call("x", "operator.mul", LP, list(range(10_000))), _sum_of("x")),
        "constants",
    ),
    "deep nesting": (
        _graph(_call("x", "operator.add", LP, _nest(40)), _sum_of("x")),
        "deeper than",
    ),
    "huge graph": (
        {
            "format": 1,
            "nodes": [
                _ph(),
                *[_call(f"n{i}", "torch.exp", LP) for i in range(100)],
                _sum_of("logprobs"),
                _out("s"),
            ],
        },
        "at most 64",
    ),
    "output not last": (
        {"format": 1, "nodes": [_ph(), _out("logprobs"), _sum_of("logprobs")]},
        "must be the last",
    ),
}


@pytest.fixture(scope="module")
def alice_session(on):
    srv, alice, _ = on
    client = tinker.ServiceClient(base_url=srv.url, api_key=alice)
    yield _model(client, 1).model_id.split(":train:")[0]
    client.close("success")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_graphs_are_refused_at_create_time(on, alice_session, case):
    srv, alice, _ = on
    graph, message = HOSTILE[case]
    answer = Raw(srv.url, alice).create(alice_session, 1000 + list(HOSTILE).index(case), graph)
    assert answer.get("category") == "user", answer
    assert message in answer["error"], answer["error"]
    if "not allow" in answer["error"]:  # names the node and the allowed set
        assert "node 'x'" in answer["error"] and "torch.exp" in answer["error"]


BAD_INPUTS = {
    "placeholder not declared": (
        _graph(_sum_of("logprobs")),
        [{"name": "logprobs", "rank": 1}, {"name": "advantages", "rank": 1}],
        "placeholders",
    ),
    "logprobs not first": (
        _graph(_sum_of("logprobs")),
        [{"name": "advantages", "rank": 1}],
        "inputs must be logprobs",
    ),
    "logprobs rank 0": (_graph(_sum_of("logprobs")), [{"name": "logprobs", "rank": 0}], "rank"),
    "rank 3": (
        _graph(_sum_of("logprobs")),
        [{"name": "logprobs", "rank": 1}, {"name": "w", "rank": 3}],
        "rank 3",
    ),
    "format 2": ({"format": 2, "nodes": []}, None, "format must be 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_inputs_that_do_not_match_are_refused(on, alice_session, case):
    srv, alice, _ = on
    graph, inputs, message = BAD_INPUTS[case]
    answer = Raw(srv.url, alice).create(
        alice_session, 2000 + list(BAD_INPUTS).index(case), graph, inputs
    )
    assert answer.get("category") == "user" and message in answer["error"], answer


def test_create_is_idempotent_and_losses_belong_to_their_session_and_user(on, on_client):
    srv, alice, bob = on
    tc = _model(on_client, 71)
    session = tc.model_id.split(":train:")[0]
    raw = Raw(srv.url, alice)
    graph = _graph(_call("sq", "operator.pow", LP, 2), _sum_of("sq"))
    first = raw.create(session, 500, graph)
    assert first == raw.create(session, 500, graph)  # the SDK's retry
    other = raw.create(session, 500, _graph(_sum_of("logprobs")))
    assert other.get("category") == "user" and "another graph" in other["error"]
    loss_id = first["loss_id"]

    data = [_ce_datum(np.random.default_rng(1), 6)]
    forward = tc.forward(data, "custom", {"loss_id": loss_id}).result()
    lp = forward.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert forward.metrics["loss:sum"] == pytest.approx(
        float((lp.astype(np.float64) ** 2).sum()), rel=1e-5
    )

    # Another session of the same user: not found.
    with tinker.ServiceClient(base_url=srv.url, api_key=alice) as second:
        elsewhere = _model(second, 71)
        with pytest.raises(tinker.RequestFailedError, match="not found"):
            elsewhere.forward(data, "custom", {"loss_id": loss_id}).result()
    # Another user, even naming alice's session: not found.
    bob_raw = Raw(srv.url, bob)
    refused = bob_raw.create(session, 501, graph)
    assert refused.get("category") == "user" and "unknown session" in refused["error"]
    with tinker.ServiceClient(base_url=srv.url, api_key=bob) as bobs:
        bob_tc = _model(bobs, 71)
        with pytest.raises(tinker.RequestFailedError, match="not found"):
            bob_tc.forward_backward(data, "custom", {"loss_id": loss_id}).result()
    with pytest.raises(tinker.RequestFailedError, match="loss_id"):
        tc.forward(data, "custom", {"loss": 1.0}).result()


def test_missing_and_misranked_inputs_are_refused_before_running(on_client):
    tc = _model(on_client, 81)
    handle = on_client.create_custom_loss(
        importance_sampling, {"logprobs": 1, "logprobs_old": 1, "advantages": 1}
    ).result()
    rng = np.random.default_rng(2)
    full = _rl_datum(rng, 6)
    # The SDK checks inputs itself; a raw request does not: drop advantages behind its back.
    missing = types.Datum(
        model_input=full.model_input,
        loss_fn_inputs={k: v for k, v in full.loss_fn_inputs.items() if k != "advantages"},
    )
    with pytest.raises(tinker.RequestFailedError, match=r"no loss_fn_inputs\['advantages'\]"):
        tc.forward_backward([full, missing], "custom", {"loss_id": handle.loss_id}).result()
    two_d = types.Datum(
        model_input=full.model_input,
        loss_fn_inputs={**full.loss_fn_inputs, "advantages": _f32(np.ones((6, 2)))},
    )
    with pytest.raises(tinker.RequestFailedError, match="declared it with rank 1"):
        tc.forward_backward([two_d], "custom", {"loss_id": handle.loss_id}).result()
    with pytest.raises(tinker.RequestFailedError, match="no gradients"):
        tc.optim_step(ADAM).result()


def test_losses_per_session_are_bounded(on):
    srv, alice, _ = on
    with tinker.ServiceClient(base_url=srv.url, api_key=alice) as client:
        session = _model(client, 91).model_id.split(":train:")[0]
        raw = Raw(srv.url, alice)
        for seq in range(12):
            graph = _graph(_call("sq", "operator.mul", LP, float(seq)), _sum_of("sq"))
            assert "loss_id" in raw.create(session, seq, graph)
        refused = raw.create(session, 12, _graph(_sum_of("logprobs")))
        assert refused.get("category") == "user"
        assert "--max-custom-losses-per-session" in refused["error"]
