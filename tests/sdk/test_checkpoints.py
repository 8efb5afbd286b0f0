"""save_state / load_state / save_weights_for_sampler: PEFT folders that peft itself loads,
and training that resumes exactly where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from tests.conftest import API_KEY, LLAMA, QWEN
from tests.fixtures.server import Server

ADAM = types.AdamParams(learning_rate=0.02)
PROBE = [5, 6, 7, 8, 9, 10, 11]


def _datum(tokens: list[int]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
    )


DATA = [_datum([1, 2, 3, 4, 5, 6]), _datum([9, 40, 41, 42])]


def _probe(tc: tinker.TrainingClient) -> np.ndarray:
    out = tc.forward([_datum(PROBE)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def _train(tc: tinker.TrainingClient, steps: int) -> None:
    for _ in range(steps):
        tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(ADAM).result()


def _folder(server: Server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def test_saved_adapter_is_a_peft_adapter(service_client, server: Server, tiny_models):
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=6).result()
    _train(tc, 2)
    path = tc.save_state("step2").result().path
    assert path == f"tinker://{tc.model_id}/weights/step2"
    folder = _folder(server, path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == QWEN
    assert "lm_head" in config["target_modules"] and "q_proj" in config["target_modules"]
    base = AutoModelForCausalLM.from_pretrained(tiny_models[QWEN], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        logits = peft_model(torch.tensor([PROBE[:-1]])).logits[0].double()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(PROBE[1:])[:, None])[:, 0]
    np.testing.assert_allclose(_probe(tc), expected.numpy(), atol=2e-5)


def test_resume_with_optimizer_continues_exactly(service_client):
    original = service_client.create_lora_training_client(base_model=QWEN, rank=4, seed=2).result()
    _train(original, 2)
    path = original.save_state("mid").result().path
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    np.testing.assert_array_equal(_probe(resumed), _probe(original))
    _train(original, 2)
    _train(resumed, 2)
    np.testing.assert_allclose(_probe(resumed), _probe(original), atol=1e-6)
    # Without the optimizer state (fresh AdamW moments) the next steps differ.
    fresh = service_client.create_training_client_from_state(path).result()
    _train(fresh, 2)
    assert np.abs(_probe(fresh) - _probe(original)).max() > 1e-4


def test_load_state_into_an_existing_model(service_client):
    trained = service_client.create_lora_training_client(base_model=QWEN, rank=4).result()
    _train(trained, 1)
    path = trained.save_state("one").result().path
    other = service_client.create_lora_training_client(base_model=QWEN, rank=4).result()
    other.load_state(path).result()
    np.testing.assert_array_equal(_probe(other), _probe(trained))


def test_sampler_checkpoint_and_rest_listing(service_client, server: Server):
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=4).result()
    _train(tc, 1)
    sampler_path = tc.save_weights_for_sampler("for-sampling").result().path
    assert sampler_path.endswith("/sampler_weights/for-sampling")
    assert not (_folder(server, sampler_path) / "optimizer.pt").exists()
    state_path = tc.save_state("state").result().path
    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {sampler_path, state_path}
    assert listed[sampler_path].checkpoint_type == "sampler"
    assert listed[state_path].checkpoint_type == "training"
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == QWEN and run.lora_rank == 4
    rest.delete_checkpoint_from_tinker_path(state_path).result()
    assert not _folder(server, state_path).exists()
    remaining = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert remaining == [sampler_path]


def test_checkpoint_errors(service_client):
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=4).result()
    # Each failure takes its seq_id turn, so the requests after it still run.
    with pytest.raises(tinker.RequestFailedError, match="no checkpoint"):
        tc.load_state(f"tinker://{tc.model_id}/weights/never-saved").result()
    with pytest.raises(tinker.RequestFailedError, match="checkpoint name"):
        tc.save_state("bad name/with slash").result()
    llama = service_client.create_lora_training_client(base_model=LLAMA, rank=4).result()
    path = llama.save_state("llama-ckpt").result().path
    with pytest.raises(tinker.RequestFailedError, match="trained on meta-llama"):
        tc.load_state(path).result()
    sampler_only = llama.save_weights_for_sampler("no-optimizer").result().path
    with pytest.raises(tinker.RequestFailedError, match="has no optimizer state"):
        service_client.create_training_client_from_state_with_optimizer(sampler_only).result()
    tc.save_state("exists").result()
    with pytest.raises(tinker.RequestFailedError, match="exists"):
        tc.save_state("exists").result()
    assert tc.forward([DATA[0]], "cross_entropy").result().metrics["loss:sum"] > 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("not json {", "no readable adapter_config.json"),
        ('{"peft_type": "LORA"}', "no readable adapter_config.json"),
        ('{"peft_type": "IA3", "r": 4}', "not LoRA"),
    ],
)
def test_a_damaged_checkpoint_is_the_users_error_everywhere(
    service_client, server: Server, damage: str, message: str
):
    """load_state, create_training_client_from_state and sampling all answer a damaged
    adapter_config.json with a user failure naming it, and the model keeps working."""
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=4).result()
    path = tc.save_state("to-damage").result().path
    (_folder(server, path) / "adapter_config.json").write_text(damage)
    with pytest.raises(tinker.RequestFailedError, match=message) as info:
        tc.load_state(path).result()
    assert info.value.category == "user"
    with pytest.raises(tinker.RequestFailedError, match=message) as info:
        service_client.create_training_client_from_state(path).result()
    assert info.value.category == "user"
    assert tc.forward([DATA[0]], "cross_entropy").result().metrics["loss:sum"] > 0


def test_create_from_state_reports_bad_input_like_create_model(service_client):
    """Both creates answer bad input with a failed future of category user (not an HTTP
    error for one and a future for the other)."""
    bad_paths = {
        "tinker://sess-none:train:0/weights/nothing-here": "no checkpoint",
        "tinker://x/weights/../../etc": "must look like",
    }
    for path, message in bad_paths.items():
        with pytest.raises(tinker.RequestFailedError, match=message) as info:
            service_client.create_training_client_from_state(path).result()
        assert info.value.category == "user"
    with pytest.raises(tinker.RequestFailedError, match="rank must be between") as info:
        service_client.create_lora_training_client(base_model=QWEN, rank=0).result()
    assert info.value.category == "user"


def test_start_up_removes_what_interrupted_saves_left(tmp_path: Path, tiny_models):
    """A save writes a hidden staging folder and renames it when complete; one a crash
    left behind is removed (and logged) at start-up, and the checkpoints beside it stay."""
    data_dir = tmp_path / "treadle"
    first = Server({QWEN: tiny_models[QWEN]}, data_dir)
    client = tinker.ServiceClient(base_url=first.url, api_key=API_KEY)
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    path = tc.save_state("kept").result().path
    client.close("success")
    first.stop()
    kind_folder = data_dir / "checkpoints" / tc.model_id / "weights"
    leftover = kind_folder / ".half.k2j4h"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"\0" * 1000)

    second = Server({QWEN: tiny_models[QWEN]}, data_dir)
    try:
        assert not leftover.exists()
        assert "half.k2j4h" in second.log() and "interrupted" in second.log()
        client = tinker.ServiceClient(base_url=second.url, api_key=API_KEY)
        restored = client.create_training_client_from_state(path).result()
        assert restored.get_info().model_data.model_name == QWEN
        client.close("success")
    finally:
        second.stop()


def test_checkpoints_lost_or_damaged_on_disk_are_not_listed(server: Server):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    paths = {name: tc.save_state(name).result().path for name in ("whole", "lost", "torn")}
    folder = server.data_dir / "checkpoints" / tc.model_id / "weights"
    shutil.rmtree(folder / "lost")
    (folder / "torn" / "adapter_model.safetensors").unlink()
    rest = client.create_rest_client()
    listed = {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed == {paths["whole"]}
    mine = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    assert paths["whole"] in mine and not {paths["lost"], paths["torn"]} & mine
    for name in ("lost", "torn"):
        with pytest.raises(tinker.RequestFailedError) as info:
            client.create_training_client_from_state(paths[name]).result()
        assert info.value.category == "user"
    client.close("success")
