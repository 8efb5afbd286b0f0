"""Checkpoints leave treadle: save_weights_external, signed download URLs that treadle
serves itself, `tinker checkpoint download`, and age-encrypted exports."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pyrage
import pytest
import tinker
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tinker import types
from transformers import AutoModelForCausalLM

from tests.conftest import API_KEY, LLAMA, QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

ADAM = types.AdamParams(learning_rate=0.05)
PROBE = [5, 6, 7, 8, 9, 10, 11]
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _trained(service_client, base_model: str) -> tinker.TrainingClient:
    tc = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=3)
    tc = tc.result() if hasattr(tc, "result") else tc
    for _ in range(2):
        tc.forward_backward([_datum([1, 2, 3, 4, 5, 6]), _datum([9, 40, 41, 42])], "cross_entropy")
        tc.optim_step(ADAM).result()
    return tc


def _probe(tc: tinker.TrainingClient) -> np.ndarray:
    out = tc.forward([_datum(PROBE)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def _peft_logprobs(base_folder: Path, adapter_folder: Path) -> np.ndarray:
    """The probe's logprobs from peft itself, on the tiny base model, in float32."""
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROBE[:-1]])).logits[0].double()
    chosen = torch.log_softmax(logits, -1).gather(-1, torch.tensor(PROBE[1:])[:, None])[:, 0]
    return chosen.numpy()


def _fetch(url: str) -> bytes:
    # As the SDK's CLI does: plain urllib, no API key.
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _folder(server: Server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def _rest(server: Server, key: str = API_KEY) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=key)


def _cli(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TINKER_BASE_URL=server.url, TINKER_API_KEY=key, HF_HUB_OFFLINE="1")
    tinker_cli = Path(sys.executable).with_name("tinker")
    return subprocess.run(
        [str(tinker_cli), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_export_downloads_through_signed_urls_and_loads_in_peft(
    service_client, server: Server, tiny_models, tmp_path: Path
):
    tc = _trained(service_client, QWEN)
    saved_at = time.time()
    path = tc.save_weights_external("final", ttl_seconds=7200).result().path
    assert path == f"tinker://{tc.model_id}/external_weights/final"

    rest = _rest(server)
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external"
    assert listed[path].checkpoint_id == "external_weights/final"
    with sqlite3.connect(server.data_dir / "treadle.sqlite3") as db:
        (expires_at,) = db.execute(
            "SELECT expires_at FROM checkpoints WHERE tinker_path = ?", (path,)
        ).fetchone()
    assert saved_at + 7200 <= expires_at <= time.time() + 7200

    answer = rest.get_external_weights_urls(path).result()
    assert sorted(answer.urls) == PEFT_FILES
    assert answer.expires.timestamp() > time.time() + 3000  # default URL life: an hour
    download = tmp_path / "final"
    download.mkdir()
    for name, url in answer.urls.items():
        assert url.startswith(server.url)
        body = _fetch(url)
        assert body == (_folder(server, path) / name).read_bytes()
        (download / name).write_bytes(body)
    np.testing.assert_allclose(
        _probe(tc), _peft_logprobs(tiny_models[QWEN], download), rtol=0, atol=1e-5
    )

    secret = server.data_dir / "export_url_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32


def test_tinker_checkpoint_download_of_a_training_checkpoint(
    service_client, server: Server, tiny_models, tmp_path: Path
):
    tc = _trained(service_client, LLAMA)
    state = tc.save_state("for-download").result().path
    done = _cli(server, API_KEY, "checkpoint", "download", state, "-o", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / state.removeprefix("tinker://").replace("/", "_")
    assert sorted(p.name for p in folder.iterdir()) == PEFT_FILES
    np.testing.assert_allclose(
        _probe(tc), _peft_logprobs(tiny_models[LLAMA], folder), rtol=0, atol=1e-5
    )
    # The CLI's temporary export (in a run of its own) was deleted after the download.
    rest = _rest(server)
    exports = [
        c.tinker_path
        for c in rest.list_user_checkpoints(limit=1000).result().checkpoints
        if c.checkpoint_type == "external"
    ]
    assert not [p for p in exports if p.endswith("/external_weights/download")]

    # An export downloads by its own path too, with no training session.
    export = tc.save_weights_external("direct").result().path
    done = _cli(server, API_KEY, "checkpoint", "download", export, "-o", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    direct = tmp_path / export.removeprefix("tinker://").replace("/", "_")
    for name in PEFT_FILES:
        assert (direct / name).read_bytes() == (folder / name).read_bytes()


def test_encrypted_export_is_age_to_the_recipients_only(service_client, server: Server):
    tc = _trained(service_client, QWEN)
    identity = pyrage.x25519.Identity.generate()
    other = pyrage.x25519.Identity.generate()
    recipients = [str(identity.to_public()), str(other.to_public())]
    secret = tc.save_weights_external("sealed", age_encryption_recipients=recipients)
    secret_path = secret.result().path
    plain_path = tc.save_weights_external("open").result().path

    on_disk = _folder(server, secret_path)
    assert sorted(p.name for p in on_disk.iterdir()) == [f"{n}.age" for n in PEFT_FILES]
    assert not list(on_disk.parent.parent.rglob(".*"))  # no staging (plaintext) left over
    rest = _rest(server)
    urls = rest.get_external_weights_urls(secret_path).result().urls
    assert sorted(urls) == [f"{n}.age" for n in PEFT_FILES]
    plain = _folder(server, plain_path)
    for name in PEFT_FILES:
        sealed = _fetch(urls[f"{name}.age"])
        assert sealed.startswith(b"age-encryption.org/v1\n")
        assert (plain / name).read_bytes() not in sealed
        for who in (identity, other):
            opened = pyrage.decrypt(sealed, [who])
            if name.endswith(".json"):
                assert json.loads(opened) == json.loads((plain / name).read_text())
            else:
                (on_disk.parent / "check.safetensors").write_bytes(opened)
                got = load_file(on_disk.parent / "check.safetensors")
                want = load_file(plain / name)
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in want)
                (on_disk.parent / "check.safetensors").unlink()
        with pytest.raises(pyrage.DecryptError):
            pyrage.decrypt(sealed, [pyrage.x25519.Identity.generate()])


def test_bad_exports_are_the_users_error(service_client, server: Server):
    tc = _trained(service_client, QWEN)
    cases = [
        ({"age_encryption_recipients": ["age1notakey"]}, "not an age1"),
        ({"age_encryption_recipients": ["ssh-rsa AAAA"]}, "not an age1"),
        (
            {
                "age_encryption_recipients": [str(pyrage.x25519.Identity.generate().to_public())]
                * 11
            },
            "at most 10",
        ),
        ({"ttl_seconds": 60}, "ttl_seconds must be between 3600"),
    ]
    for kwargs, message in cases:
        with pytest.raises(tinker.RequestFailedError, match=message) as info:
            tc.save_weights_external("bad", **kwargs).result()
        assert info.value.category == "user"
    with pytest.raises(tinker.RequestFailedError, match="checkpoint name"):
        tc.save_weights_external("../escape").result()
    assert not (server.data_dir / "escape").exists()
    # Nothing was saved, and the model takes its next requests as before.
    rest = _rest(server)
    kinds = {c.checkpoint_type for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert "external" not in kinds
    assert tc.save_weights_external("good").result().path.endswith("/external_weights/good")


def test_signed_urls_open_one_file_until_they_expire(service_client, server: Server):
    tc = _trained(service_client, QWEN)
    rest = _rest(server)
    path = tc.save_weights_external("guarded").result().path
    urls = rest.get_external_weights_urls(path).result().urls
    good = urls["adapter_config.json"]
    assert httpx.get(good).status_code == 200

    parts = urlsplit(good)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}"
    sig, expires = query["signature"], int(query["expires"])
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    forbidden = [
        # Another file of the same export, under this file's signature.
        (f"{base}/adapter_model.safetensors", {"expires": expires, "signature": sig}),
        (f"{base}/adapter_config.json", {"expires": expires, "signature": flipped}),
        (f"{base}/adapter_config.json", {"expires": expires + 3600, "signature": sig}),
        (f"{base}/adapter_config.json", {"expires": expires, "signature": "é" + sig[1:]}),
    ]
    for url, params in forbidden:
        answer = httpx.get(url, params=params)
        assert answer.status_code == 403, answer.text
        assert "signature does not match" in answer.json()["detail"]
    missing = httpx.get(good, params={"signature": sig})  # httpx replaces the query
    assert missing.status_code == 422 and "expires" in missing.text

    # Nothing outside the export is served, signed or not.
    db = (server.data_dir / "treadle.sqlite3").read_bytes()[:16]
    secret = (server.data_dir / "export_url_secret").read_bytes()
    for file in ("..%2F..%2F..%2F..%2Ftreadle.sqlite3", "..", "%2E%2E%2Fexport_url_secret"):
        answer = httpx.get(f"{base}/{file}", params={"expires": expires, "signature": sig})
        assert 400 <= answer.status_code < 500
        assert db not in answer.content and secret not in answer.content

    # An unknown export, and one deleted since its URLs were signed: not found.
    unknown = good.replace("/guarded/", "/nothing-here/")
    assert httpx.get(unknown).status_code == 404
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(path.replace("guarded", "nothing-here")).result()
    rest.delete_checkpoint_from_tinker_path(path).result()
    gone = httpx.get(good)
    assert gone.status_code == 404 and "no external weights" in gone.json()["detail"]
    # Saved again under the same name: the old URLs do not open the new export.
    tc.save_weights_external("guarded").result()
    assert httpx.get(good).status_code == 403


def test_only_external_weights_have_urls(service_client, server: Server, tmp_path: Path):
    tc = _trained(service_client, QWEN)
    rest = _rest(server)
    sampler = tc.save_weights_for_sampler("sampled").result().path
    state = tc.save_state("state").result().path
    for path in (sampler, state):
        # The SDK refuses these itself; the server answers a raw request clearly too.
        with pytest.raises(ValueError, match="only accepts external weights"):
            rest.get_external_weights_urls(path).result()
        run, kind, name = path.removeprefix("tinker://").split("/")
        answer = httpx.get(
            f"{server.url}/api/v1/training_runs/{run}/checkpoints/{kind}/{name}"
            "/external_weights_urls",
            headers={"X-API-Key": API_KEY},
        )
        assert answer.status_code == 400
        assert "only checkpoints saved with save_weights_external" in answer.json()["detail"]
    # The SDK's CLI refuses sampler checkpoints before asking the server.
    done = _cli(server, API_KEY, "checkpoint", "download", sampler, "-o", str(tmp_path))
    assert done.returncode != 0 and "Sampler checkpoints cannot be downloaded" in done.stderr


@pytest.fixture(scope="module")
def expired_urls_server(tmp_path_factory, tiny_models):
    """Two users; signed URLs expire as they are made (``--export-url-seconds 0``)."""
    data_dir = tmp_path_factory.mktemp("download-users") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    args = ["--long-poll-seconds", "2", "--export-url-seconds", "0"]
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, args)
    yield server, alice, bob
    server.stop()


def test_another_users_checkpoints_cannot_be_downloaded(expired_urls_server, tmp_path: Path):
    server, alice_key, bob_key = expired_urls_server
    alice = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    bob = tinker.ServiceClient(base_url=server.url, api_key=bob_key)
    try:
        tc = _trained(alice, QWEN)
        export = tc.save_weights_external("mine").result().path
        state = tc.save_state("mine").result().path
        with pytest.raises(tinker.NotFoundError):
            _rest(server, bob_key).get_external_weights_urls(export).result()
        done = _cli(server, bob_key, "checkpoint", "download", state, "-o", str(tmp_path))
        assert done.returncode != 0 and "no checkpoint" in done.stdout + done.stderr
        assert not list(tmp_path.iterdir())  # the CLI removed its empty target
        # Not bob's either: saving an export of alice's model.
        stolen = httpx.post(
            f"{server.url}/api/v1/save_weights_external",
            json={"model_id": tc.model_id, "path": "stolen", "seq_id": 99},
            headers={"X-API-Key": bob_key},
        )
        assert stolen.status_code == 404 and "unknown model_id" in stolen.text

        # Alice's own URLs, expired the moment they were signed.
        urls = _rest(server, alice_key).get_external_weights_urls(export).result().urls
        answer = httpx.get(urls["adapter_config.json"])
        assert answer.status_code == 403 and "expired" in answer.json()["detail"]
    finally:
        alice.close("success")
        bob.close("success")


@pytest.mark.parametrize("base_model", [QWEN, LLAMA])
def test_cookbook_downloads_decrypts_and_builds_models(
    base_model: str, service_client, server: Server, tiny_models, tmp_path: Path, monkeypatch
):
    """tinker_cookbook.weights: ``download`` exports a training checkpoint encrypted to a
    key it makes (it refuses files without ``.age``) and decrypts it; ``build_lora_adapter``
    and ``build_hf_model`` turn it into a PEFT adapter and a merged model. (The cookbook
    pins a transformers outside treadle's range, so scripts/setup.sh installs it with
    --no-deps.)"""
    from tinker_cookbook import weights

    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    # No unembed LoRA: the tiny models tie their embeddings, and the cookbook cannot merge
    # an lm_head adapter into a model without a separate lm_head.
    tc = service_client.create_lora_training_client(
        base_model=base_model, rank=4, seed=5, train_unembed=False
    )
    for _ in range(2):
        tc.forward_backward([_datum([1, 2, 3, 4, 5, 6]), _datum([9, 40, 41, 42])], "cross_entropy")
        tc.optim_step(ADAM).result()
    expected = _probe(tc)
    state = tc.save_state("for-cookbook").result().path

    downloaded = tmp_path / "downloaded"
    weights.download(tinker_path=state, output_dir=str(downloaded), base_url=server.url)
    assert sorted(p.name for p in downloaded.iterdir()) == PEFT_FILES
    base = tiny_models[base_model]
    np.testing.assert_allclose(_peft_logprobs(base, downloaded), expected, rtol=0, atol=1e-5)

    adapter = tmp_path / "adapter"
    weights.build_lora_adapter(
        base_model=str(base), adapter_path=str(downloaded), output_path=str(adapter)
    )
    np.testing.assert_allclose(_peft_logprobs(base, adapter), expected, rtol=0, atol=1e-5)

    merged = tmp_path / "merged"
    weights.build_hf_model(
        base_model=str(base), adapter_path=str(downloaded), output_path=str(merged)
    )
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROBE[:-1]])).logits[0].double()
    chosen = torch.log_softmax(logits, -1).gather(-1, torch.tensor(PROBE[1:])[:, None])[:, 0]
    np.testing.assert_allclose(chosen.numpy(), expected, rtol=0, atol=1e-5)
