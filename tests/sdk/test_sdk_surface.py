"""The SDK's async methods and the REST client's less used calls, through the official
SDK: each async variant gives what its sync twin gives on the same model, and each REST
call answers with the objects the previous steps made."""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server

ADAM = types.AdamParams(learning_rate=0.05)
PROBE = [5, 6, 7, 8, 9, 10]


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


DATA = [_datum([1, 2, 3, 4, 5, 6]), _datum([9, 40, 41, 42])]


def _logprobs(out: types.ForwardBackwardOutput) -> np.ndarray:
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


async def _result(value):
    """An async method's answer: some return the value, others an APIFuture to await."""
    value = await value
    return await value if hasattr(value, "result") and hasattr(value, "__await__") else value


def _ce(data: list[types.Datum], logprobs: list[torch.Tensor]):
    loss = sum(
        -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
        for d, lp in zip(data, logprobs, strict=True)
    )
    return loss, {"ce": float(loss.detach())}


def test_async_training_and_sampling_equal_their_sync_twins(server: Server):
    """Two models from one seed: one driven by the sync methods, one by the async ones,
    step for step; every number agrees."""
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    sync_tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=3).result()

    async def drive() -> dict:
        tc = await _result(
            client.create_lora_training_client_async(base_model=QWEN, rank=4, seed=3)
        )
        got: dict = {"info": (await _result(tc.get_info_async())).model_data.model_name}
        got["forward"] = _logprobs(
            await _result(tc.forward_async([_datum(PROBE)], "cross_entropy"))
        )
        got["fb"] = (await _result(tc.forward_backward_async(DATA, "cross_entropy"))).metrics
        got["optim"] = (await _result(tc.optim_step_async(ADAM))).metrics
        got["custom"] = (await _result(tc.forward_backward_custom_async(DATA, _ce))).metrics
        await _result(tc.optim_step_async(ADAM))
        state = (await _result(tc.save_state_async("async-state"))).path
        sampler_path = (await _result(tc.save_weights_for_sampler_async("async-w"))).path
        got["paths"] = (state, sampler_path)
        params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=4, stop=[])
        prompt = types.ModelInput.from_ints(PROBE)
        sampler = await _result(tc.save_weights_and_get_sampling_client_async())
        got["sample"] = (await _result(sampler.sample_async(prompt, 1, params))).sequences[0]
        got["prompt_logprobs"] = await _result(sampler.compute_logprobs_async(prompt))
        got["base_model"] = await _result(sampler.get_base_model_async())
        named = await _result(tc.create_sampling_client_async(sampler_path))
        got["named_sample"] = (await _result(named.sample_async(prompt, 1, params))).sequences[0]
        from_state = await _result(client.create_training_client_from_state_async(state))
        got["from_state"] = _logprobs(
            await _result(from_state.forward_async([_datum(PROBE)], "cross_entropy"))
        )
        with_opt = await _result(
            client.create_training_client_from_state_with_optimizer_async(state)
        )
        await _result(with_opt.forward_backward_async(DATA, "cross_entropy"))
        got["resumed_optim"] = (await _result(with_opt.optim_step_async(ADAM))).metrics
        await _result(tc.load_state_async(state))
        await _result(tc.load_state_with_optimizer_async(state))
        got["loaded"] = _logprobs(await _result(tc.forward_async([_datum(PROBE)], "cross_entropy")))
        base = await _result(client.create_sampling_client_async(base_model=QWEN))
        got["base_sample"] = (await _result(base.sample_async(prompt, 1, params))).sequences[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            caps = await client.get_server_capabilities_async()
        got["models"] = [m.model_name for m in caps.supported_models]
        return got

    got = asyncio.run(drive())

    assert got["info"] == QWEN and got["base_model"] == QWEN and QWEN in got["models"]
    np.testing.assert_array_equal(
        got["forward"], _logprobs(sync_tc.forward([_datum(PROBE)], "cross_entropy").result())
    )
    fb = sync_tc.forward_backward(DATA, "cross_entropy").result().metrics
    assert got["fb"]["loss:sum"] == pytest.approx(fb["loss:sum"], rel=1e-6)
    optim = sync_tc.optim_step(ADAM).result().metrics
    assert got["optim"]["grad_norm:mean"] == pytest.approx(optim["grad_norm:mean"], rel=1e-5)
    custom = sync_tc.forward_backward_custom(DATA, _ce).result().metrics
    assert got["custom"]["ce"] == pytest.approx(custom["ce"], rel=1e-5)
    sync_tc.optim_step(ADAM).result()
    state, sampler_path = got["paths"]
    assert state.endswith("/weights/async-state") and sampler_path.endswith(
        "/sampler_weights/async-w"
    )

    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=4, stop=[])
    prompt = types.ModelInput.from_ints(PROBE)
    sampler = sync_tc.save_weights_and_get_sampling_client().result()
    sample = sampler.sample(prompt, 1, params).result().sequences[0]
    assert got["sample"].tokens == sample.tokens == got["named_sample"].tokens
    np.testing.assert_allclose(got["sample"].logprobs, sample.logprobs, atol=1e-6)
    prompt_logprobs = sampler.compute_logprobs(prompt).result()
    assert got["prompt_logprobs"][0] is None
    np.testing.assert_allclose(got["prompt_logprobs"][1:], prompt_logprobs[1:], atol=1e-6)
    after_two_steps = _logprobs(sync_tc.forward([_datum(PROBE)], "cross_entropy").result())
    np.testing.assert_allclose(got["from_state"], after_two_steps, atol=1e-6)
    np.testing.assert_allclose(got["loaded"], after_two_steps, atol=1e-6)
    assert got["resumed_optim"]["grad_norm:mean"] > 0
    base = client.create_sampling_client(base_model=QWEN).result()
    assert base.sample(prompt, 1, params).result().sequences[0].tokens == got["base_sample"].tokens
    client.close("success")


def test_rest_calls_answer_with_what_was_made(server: Server):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    rest = client.create_rest_client()
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    tc.forward_backward(DATA, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    state = tc.save_state("rest-a").result().path
    doomed = tc.save_state("rest-b").result().path
    tc.save_weights_and_get_sampling_client().result()
    session_id = tc.model_id.split(":train:")[0]

    runs = rest.list_training_runs(limit=100).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    by_path = rest.get_training_run_by_tinker_path(state).result()
    assert by_path.training_run_id == tc.model_id and by_path.lora_rank == 4
    session = rest.get_session(session_id).result()
    assert session.training_run_ids == [tc.model_id] and len(session.sampler_ids) == 1
    sampler_id = session.sampler_ids[0]
    sessions = rest.list_sessions(limit=100).result().sessions
    assert session_id in sessions
    info = rest.get_sampler(sampler_id).result()
    assert info.sampler_id == sampler_id and info.base_model == QWEN

    rest.delete_checkpoint(tc.model_id, "weights/rest-b").result()
    names = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert state in names and doomed not in names

    async def drive() -> dict:
        got: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got["runs"] = await rest.list_training_runs_async(limit=100)
            got["run"] = await rest.get_training_run_async(tc.model_id)
            got["by_path"] = await rest.get_training_run_by_tinker_path_async(state)
            got["session"] = await rest.get_session_async(session_id)
            got["sessions"] = await rest.list_sessions_async(limit=100)
            got["sampler"] = await rest.get_sampler_async(sampler_id)
            got["checkpoints"] = await rest.list_checkpoints_async(tc.model_id)
            got["mine"] = await rest.list_user_checkpoints_async(limit=100)
            await rest.publish_checkpoint_from_tinker_path_async(state)
            got["published"] = await rest.list_checkpoints_async(tc.model_id)
            await rest.unpublish_checkpoint_from_tinker_path_async(state)
            got["usage"] = await rest.get_current_checkpoint_storage_usage_async()
            await rest.delete_checkpoint_async(tc.model_id, "weights/rest-a")
            got["after_delete"] = await rest.list_checkpoints_async(tc.model_id)
        return got

    got = asyncio.run(drive())
    assert tc.model_id in [r.training_run_id for r in got["runs"].training_runs]
    assert got["run"].training_run_id == got["by_path"].training_run_id == tc.model_id
    assert got["session"].training_run_ids == [tc.model_id]
    assert session_id in got["sessions"].sessions
    assert got["sampler"].sampler_id == sampler_id
    assert state in [c.tinker_path for c in got["checkpoints"].checkpoints]
    assert state in [c.tinker_path for c in got["mine"].checkpoints]
    assert [c.public for c in got["published"].checkpoints if c.tinker_path == state] == [True]
    assert got["usage"].data[0].checkpoint_count >= 1
    assert state not in [c.tinker_path for c in got["after_delete"].checkpoints]
    client.close("success")


def test_async_variants_of_the_lifecycle_calls(server: Server, tmp_path):
    """The async (deprecated) twins of the checkpoint-lifecycle, export, audit, usage and
    trace calls send the same requests as the sync ones tested beside their features."""
    import urllib.request

    from tests.sdk.test_usage import _window

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY, project_id="proj-a")
    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    admin = tinker.AdminClient(base_url=server.url, api_key=API_KEY)
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    tc.forward_backward(DATA, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    state = tc.save_state("lifecycle").result().path
    session_id = tc.model_id.split(":train:")[0]

    async def drive() -> dict:
        got: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            export = await _result(tc.save_weights_external_async("async-export"))
            got["export"] = export.path
            got["urls"] = await rest.get_external_weights_urls_async(export.path)
            await rest.set_checkpoint_ttl_from_tinker_path_async(state, 7200)
            got["ttl"] = await rest.list_checkpoints_async(tc.model_id)
            got["copy"] = await rest.copy_weights_async(state, "proj-b")
            await rest.assign_session_project_async(session_id, "proj-c")
            got["session"] = await rest.get_session_async(session_id)
            got["trace"] = await rest.export_session_trace_async(session_id)
            got["audit"] = await admin.get_audit_log_async("checkpoints")
            got["audit_rest"] = await rest.get_audit_log_async("all")
            window = _window()
            got["usage"] = await admin.get_billing_usage_async(*window)
            got["usage_rest"] = await rest.get_billing_usage_async(*window)
            got["storage"] = await admin.get_current_checkpoint_storage_usage_async()
            await rest.delete_checkpoint_from_tinker_path_async(got["copy"])
            got["copies_left"] = await rest.list_user_checkpoints_async(limit=100)
        return got

    got = asyncio.run(drive())
    assert got["export"] == f"tinker://{tc.model_id}/external_weights/async-export"
    target = tmp_path / "adapter_model.safetensors"
    urllib.request.urlretrieve(got["urls"].urls["adapter_model.safetensors"], target)
    assert target.stat().st_size > 0
    ttls = {c.tinker_path: c.expires_at for c in got["ttl"].checkpoints}
    assert ttls[state] is not None
    assert got["copy"].startswith("tinker://") and got["copy"].endswith("/weights/lifecycle")
    assert got["copy"] != state
    with urllib.request.urlopen(got["trace"]) as answer:
        assert b"forward_backward" in answer.read()
    events = [e.event for e in got["audit"].entries]
    assert "checkpoint_ttl_set" in events and "checkpoint_copy" in events
    assert len(got["audit_rest"].entries) >= len(got["audit"].entries)
    trained = [e for e in got["usage"].data if e.event_info.type == "training"]
    assert trained and got["usage"].data == got["usage_rest"].data
    assert got["storage"].data[0].checkpoint_count >= 2
    assert got["copy"] not in [c.tinker_path for c in got["copies_left"].checkpoints]
    client.close("success")


def test_create_custom_loss_runs_client_side_and_equals_the_builtin(server: Server):
    """treadle's client config leaves ``custom_loss_server_side`` off, so the SDK traces
    and validates the loss, then runs it client-side through forward_backward_custom: the
    same loss and gradients as the built-in cross_entropy."""
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    custom = client.create_lora_training_client(base_model=QWEN, rank=4, seed=8).result()
    builtin = client.create_lora_training_client(base_model=QWEN, rank=4, seed=8).result()

    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    handle = client.create_custom_loss(neg_ll, input_ranks={"logprobs": 1, "weights": 1}).result()
    got = custom.forward_backward_custom(DATA, handle).result().metrics
    want = builtin.forward_backward(DATA, "cross_entropy").result().metrics
    assert got["custom/neg_ll:sum"] == pytest.approx(want["loss:sum"], rel=1e-5)
    norm = custom.optim_step(ADAM).result().metrics["grad_norm:mean"]
    assert norm == pytest.approx(
        builtin.optim_step(ADAM).result().metrics["grad_norm:mean"], rel=1e-4
    )
    np.testing.assert_allclose(
        _logprobs(custom.forward([_datum(PROBE)], "cross_entropy").result()),
        _logprobs(builtin.forward([_datum(PROBE)], "cross_entropy").result()),
        atol=1e-5,
    )
    client.close("success")
