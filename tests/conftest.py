"""Shared fixtures: tiny real-architecture models, and live servers driven by the SDK."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.fixtures.server import Server
from tests.fixtures.tiny_models import make_tiny_model

QWEN = "Qwen/Qwen3-0.6B"
LLAMA = "meta-llama/Llama-3.2-1B"
API_KEY = "tml-test"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Served names -> folders of tiny random models (real Qwen3 and Llama code paths)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        QWEN: make_tiny_model(root / "qwen3", "qwen3", seed=0),
        LLAMA: make_tiny_model(root / "llama", "llama", seed=1),
    }


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[Server]:
    """One treadle process serving both tiny models for the whole session."""
    # A short long-poll, so every future in the suite also goes through try_again re-polls.
    # Custom losses run client-side here: the reference the server-side ones must equal.
    args = ["--long-poll-seconds", "2", "--no-custom-loss-server-side"]
    srv = Server(tiny_models, tmp_path_factory.mktemp("data") / "treadle", args)
    yield srv
    srv.stop()


@pytest.fixture()
def service_client(server: Server) -> Iterator[object]:
    import tinker

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success")


@pytest.fixture(scope="session")
def embedded_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the converted built-in model (converted once per session)."""
    from treadle.engine.embedded import embedded_model_folder

    data_dir = tmp_path_factory.mktemp("embedded") / "treadle"
    embedded_model_folder(data_dir)
    return data_dir
