"""Real vLLM engines for the e2e tests: both demo engines, started once per test session.

Fixtures:
    e2e_engines   (session)  {"small": RunningEngine, "large": RunningEngine}, serving on free ports
    e2e_settings  (function) proxy Settings pointing at those engines, with a fresh data dir

The demo models and the vLLM venv are prepared on first use under $FRUGAL_DATA_DIR (default
~/.local/share/frugal), so a rerun reuses them; scripts/test prepares them up front. The engines
are launched from the embedded demo config (proxy/demo/demo.yaml), ports swapped for free ones,
so these tests exercise the same command line `frugal up` uses. Engine logs:
<data dir>/logs/e2e-<name>.log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo.launcher import RunningEngine, engines_running, free_port
from proxy.demo.models import prepare_demo_models
from proxy.demo.up import launch_specs, load_up_settings
from proxy.demo.vllm_env import ensure_vllm_python
from proxy.settings import Settings, default_data_dir

E2E_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is an e2e test, marked or not."""
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def _demo_settings_on_free_ports() -> Settings:
    settings = load_up_settings(None)
    engines = []
    for engine in settings.engines:
        url = f"http://127.0.0.1:{free_port()}"
        engines.append(engine.model_copy(update={"urls": [url]}))
    return settings.model_copy(update={"engines": engines})


@pytest.fixture(scope="session")
def e2e_engines() -> Iterator[dict[str, RunningEngine]]:
    data_dir = default_data_dir()
    python = ensure_vllm_python(data_dir)
    demo_dirs = prepare_demo_models(data_dir)
    settings = _demo_settings_on_free_ports()
    specs = launch_specs(settings, python=python, demo_dirs=demo_dirs)
    # Separate log names, so a developer's own `frugal up` logs are not appended to.
    specs = [dataclasses.replace(spec, name=f"e2e-{spec.name}") for spec in specs]
    with engines_running(specs, data_dir) as running:
        yield {engine.name.removeprefix("e2e-"): engine for engine in running}


@pytest.fixture
def e2e_settings(e2e_engines: dict[str, RunningEngine], tmp_path: Path) -> Settings:
    """Proxy settings for the running engines: no launch sections, a throwaway data dir."""
    demo = load_up_settings(None)
    engines = []
    for engine in demo.engines:
        running = e2e_engines[engine.name]
        engines.append(engine.model_copy(update={"urls": [running.url], "launch": None}))
    return demo.model_copy(
        update={
            "engines": engines,
            "data_dir": tmp_path / "frugal-data",
            "server": demo.server.model_copy(update={"port": 0}),
        }
    )
