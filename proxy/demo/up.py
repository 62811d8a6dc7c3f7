"""`frugal up`: demo models + vLLM engines as child processes + the proxy, in one process.

Order: load the config (the embedded demo.yaml unless --config), prepare any `demo:` models,
make sure the vLLM venv exists, start every engine that has a `launch` section, then serve the
proxy in this process. Ctrl-C (or any error) stops the proxy, then the engines.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from proxy.cpu import cpu_flags, native_bfloat16
from proxy.demo.errors import DemoError
from proxy.demo.launcher import EngineSpec, RunningEngine, build_spec, engines_running
from proxy.demo.models import prepare_demo_models
from proxy.demo.vllm_env import ensure_vllm_python
from proxy.settings import ConfigError, EngineSettings, Settings, load_settings, parse_settings

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
DEMO_PREFIX = "demo:"


def load_up_settings(config: Path | None) -> Settings:
    """The given config file, or the embedded demo config.

    The demo config's relative paths (the policies folder) resolve against the working
    directory, so `frugal up` from the repo root picks up ./policies.
    """
    if config is not None:
        return load_settings(config)
    return parse_settings(DEMO_CONFIG.read_text(), source=str(DEMO_CONFIG), base_dir=Path.cwd())


def demo_models_needed(settings: Settings) -> list[str]:
    return [
        e.launch.model_dir.removeprefix(DEMO_PREFIX)
        for e in settings.engines
        if e.launch is not None and e.launch.model_dir.startswith(DEMO_PREFIX)
    ]


def engine_port(engine: EngineSettings) -> tuple[str, int]:
    """Host and port an engine is launched on: those of its first URL."""
    url = urlsplit(engine.urls[0])
    if url.hostname is None or url.port is None:
        raise DemoError(f"engine {engine.name!r}: {engine.urls[0]} needs an explicit host:port")
    return url.hostname, url.port


def resolve_model_dir(engine: EngineSettings, demo_dirs: Mapping[str, Path]) -> Path:
    assert engine.launch is not None
    where = engine.launch.model_dir
    if not where.startswith(DEMO_PREFIX):
        return Path(where).expanduser()
    name = where.removeprefix(DEMO_PREFIX)
    if name not in demo_dirs:
        known = ", ".join(sorted(demo_dirs)) or "none"
        raise DemoError(f"engine {engine.name!r}: unknown demo model {name!r} (known: {known})")
    return demo_dirs[name]


def launch_dtype(command: list[str]) -> str | None:
    """The ``--dtype`` a launch command passes, ``{cpu_dtype}`` filled in (None: not given)."""
    for i, part in enumerate(command):
        value = None
        if part == "--dtype" and i + 1 < len(command):
            value = command[i + 1]
        elif part.startswith("--dtype="):
            value = part.removeprefix("--dtype=")
        if value is not None:
            return value.replace("{cpu_dtype}", cpu_dtype(cpu_flags()))
    return None


def cpu_dtype(flags: frozenset[str]) -> str:
    """The ``--dtype`` for vLLM's CPU build on a CPU with these flags: bfloat16 where the CPU
    multiplies it natively, else float32. Without native support vLLM emulates bfloat16: on a
    2-core Zen 3 host the small demo model made 22 tokens/s over 16 streams in bfloat16 against
    76 in float32 (docs/benchmarks.md, section 2)."""
    return "bfloat16" if native_bfloat16(flags) else "float32"


def launch_specs(
    settings: Settings, *, python: Path, demo_dirs: Mapping[str, Path]
) -> list[EngineSpec]:
    """One EngineSpec per engine with a `launch` section, placeholders filled in. An engine's
    canary is launched the same way, on its own first URL under its own served model name."""
    specs = []
    for engine in settings.engines:
        if engine.launch is None:
            continue
        values = {
            "python": str(python),
            "model_dir": str(resolve_model_dir(engine, demo_dirs)),
            "cpu_dtype": cpu_dtype(cpu_flags()),
        }
        targets = [(engine.name, engine.model, engine, engine.launch.env)]
        if engine.canary is not None:
            canary = engine.model_copy(update={"urls": engine.canary.urls})
            env = {**engine.launch.env, **engine.canary.launch_env}
            served = engine.canary.model or engine.model
            targets.append((f"{engine.name}-canary", served, canary, env))
        for name, served_model, where, env in targets:
            host, port = engine_port(where)
            try:
                specs.append(
                    build_spec(
                        name=name,
                        served_model=served_model,
                        port=port,
                        host=host,
                        command=engine.launch.command,
                        env=env,
                        values=values,
                        startup_timeout_s=engine.launch.startup_timeout_s,
                    )
                )
            except ValueError as exc:
                raise DemoError(f"engine {name!r}: launch: {exc}") from exc
    return specs


def with_launch_results(
    settings: Settings, *, data_dir: Path, port: int, demo_dirs: Mapping[str, Path]
) -> Settings:
    """The settings the proxy runs with: our data dir and port, and each launched engine's
    model folder and dtype (so `version: auto` tells apart the weights and how they are
    multiplied: a float32 engine's greedy answers can differ from a bfloat16 one's)."""
    engines = []
    for e in settings.engines:
        if e.launch is not None:
            update: dict[str, object] = {}
            if e.model_dir is None:
                update["model_dir"] = resolve_model_dir(e, demo_dirs)
            dtype = launch_dtype(e.launch.command)
            if dtype is not None and e.version_extra is None:
                update["version_extra"] = f"dtype={dtype}"
            e = e.model_copy(update=update)
        engines.append(e)
    return settings.model_copy(
        update={
            "data_dir": data_dir,
            "engines": engines,
            "server": settings.server.model_copy(update={"port": port}),
        }
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe(running: list[RunningEngine], port: int, host: str) -> str:
    lines = [f"  {e.name:<8} {e.served_model:<22} {e.url}  (log: {e.log_path})" for e in running]
    return "\n".join(
        ["engines ready:", *lines, f"proxy: http://{host}:{port}/v1  (Ctrl-C stops everything)"]
    )


def run_proxy_in_process(settings: Settings) -> None:
    """The single call site of the proxy server; returns when it is stopped."""
    from proxy.server import run_proxy

    run_proxy(settings)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Make `kill PID` (a supervisor's stop) shut down like Ctrl-C: proxy, then engines."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_up(*, data_dir: Path, config: Path | None, port: int) -> int:
    with sigterm_as_interrupt():
        return _run_up(data_dir=data_dir, config=config, port=port)


def _run_up(*, data_dir: Path, config: Path | None, port: int) -> int:
    try:
        settings = load_up_settings(config)
    except ConfigError as exc:
        _say(str(exc))
        return 2
    try:
        demo_dirs: dict[str, Path] = {}
        if demo_models_needed(settings):
            _say(f"demo models in {data_dir} (the first run downloads and converts them: minutes)")
            demo_dirs = prepare_demo_models(data_dir)
        python = ensure_vllm_python(data_dir)
        specs = launch_specs(settings, python=python, demo_dirs=demo_dirs)
        settings = with_launch_results(settings, data_dir=data_dir, port=port, demo_dirs=demo_dirs)
        with engines_running(specs, data_dir) as running:
            _say(_describe(running, port, settings.server.host))
            run_proxy_in_process(settings)
    except DemoError as exc:
        _say(f"frugal up: {exc}")
        return 1
    except ConfigError as exc:  # the policy folder and open access, checked as the app is built
        _say(f"frugal up: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("frugal up: stopped")
        return 130
    return 0
