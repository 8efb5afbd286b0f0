"""The layers point one way: the HTTP and service layers, the settings and the command
line's help never import torch (only the engine does)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import treadle.server
import treadle.service


def _modules(package: object) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]  # type: ignore[attr-defined]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_server_and_service_import_no_torch():
    modules = _modules(treadle.server) + _modules(treadle.service)
    assert "treadle.server.routes.training" in modules and "treadle.service.engine_loop" in modules
    imports = "; ".join(f"import {m}" for m in [*modules, "treadle.settings", "treadle.cli"])
    done = _run(f"import sys; {imports}; print(sorted(m for m in sys.modules if m == 'torch'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_service_reaches_the_engine_only_through_torch_free_modules():
    """What the service imports of the engine: the adapter config reader, the families
    table and the custom-loss graph checker, all torch-free; the worker is handed in at
    start-up."""
    done = _run(
        "import sys, treadle.service.service, treadle.server.app;"
        "print(sorted(m for m in sys.modules if m.startswith('treadle.engine.')))"
    )
    assert done.returncode == 0, done.stderr
    torch_free = ["adapter_config", "custom_graph", "families"]
    assert done.stdout.strip() == str([f"treadle.engine.{m}" for m in torch_free])


def test_help_imports_no_torch():
    for argv in ([], ["serve"], ["demo"], ["keys"], ["keys", "create"], ["usage"]):
        code = (
            "import sys; from treadle.cli import main\n"
            f"try:\n    main({[*argv, '--help']!r})\nexcept SystemExit as exit:\n"
            "    assert exit.code == 0\n"
            "print('torch' in sys.modules)"
        )
        done = _run(code)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("False"), (argv, done.stdout)
