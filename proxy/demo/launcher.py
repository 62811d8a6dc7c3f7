"""Start vLLM engines as child processes, wait until they serve, and always stop them.

    async with launch_engines(specs, data_dir) as running:   # in an event loop
        ...
    with engines_running(specs, data_dir) as running:        # from plain synchronous code
        ...

Each engine runs in its own process group with its output in `<data_dir>/logs/<name>.log`.
All engines start at once; an engine counts as ready when `GET /health` answers 200 and
`GET /v1/models` lists its served model name. Leaving the block in any way (normal exit, error,
Ctrl-C) sends SIGTERM to every group, then SIGKILL to whatever is left after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.demo.errors import EngineStartError
from proxy.demo.progress import make_bar, read_log_tail, refresh_seconds

DEFAULT_GRACE_S = 20.0
_POLL_INTERVAL_S = 1.0
_PROBE_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class EngineSpec:
    """One engine to start: a fully substituted command line and its extra environment."""

    name: str
    served_model: str
    port: int
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    startup_timeout_s: float = 900.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class RunningEngine:
    name: str
    served_model: str
    url: str
    pid: int
    log_path: Path


# --- pure command building -------------------------------------------------------------------


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Fill `{name}` placeholders from `values`; `{{` and `}}` stand for literal braces.

    Unknown names, and anything beyond a bare name (`{a.b}`, `{a!r}`, `{a:>5}`), are errors,
    so a typo in a config fails at start-up instead of reaching the engine's command line.
    """
    out: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r}: {exc}") from exc
    for literal, name, spec, conversion in parsed:
        out.append(literal)
        if name is None:
            continue
        if spec or conversion or name not in values:
            known = ", ".join("{" + k + "}" for k in sorted(values))
            raise ValueError(f"{template!r}: unknown placeholder {{{name}}} (known: {known})")
        out.append(values[name])
    return "".join(out)


def build_spec(
    *,
    name: str,
    served_model: str,
    port: int,
    command: Sequence[str],
    env: Mapping[str, str],
    values: Mapping[str, str],
    host: str = "127.0.0.1",
    startup_timeout_s: float = 900.0,
) -> EngineSpec:
    """An EngineSpec from command/env templates; `{model}` and `{port}` are always available."""
    filled = {**values, "model": served_model, "port": str(port)}
    return EngineSpec(
        name=name,
        served_model=served_model,
        port=port,
        command=tuple(substitute(part, filled) for part in command),
        env={key: substitute(value, filled) for key, value in env.items()},
        host=host,
        startup_timeout_s=startup_timeout_s,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def served_model_ids(models_body: Any) -> list[str]:
    """Model ids from an OpenAI `/v1/models` body; [] when the body is not that shape."""
    if not isinstance(models_body, dict) or not isinstance(models_body.get("data"), list):
        return []
    return [str(m["id"]) for m in models_body["data"] if isinstance(m, dict) and "id" in m]


# --- processes -------------------------------------------------------------------------------


@dataclass
class _Child:
    spec: EngineSpec
    process: subprocess.Popen[bytes]
    log_path: Path

    def running(self) -> RunningEngine:
        return RunningEngine(
            name=self.spec.name,
            served_model=self.spec.served_model,
            url=self.spec.url,
            pid=self.process.pid,
            log_path=self.log_path,
        )

    def failure(self, what: str) -> EngineStartError:
        return EngineStartError(
            f"engine {self.spec.name!r} {what}; log: {self.log_path}\n"
            f"--- last lines ---\n{read_log_tail(self.log_path)}"
        )


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the parent dies without cleaning up (Linux)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(spec: EngineSpec, logs_dir: Path) -> _Child:
    if not port_is_free(spec.host, spec.port):
        raise EngineStartError(f"engine {spec.name!r}: port {spec.port} is already in use")
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = logs_dir / f"{spec.name}.log"
    with log_path.open("ab") as log:
        header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(spec.command)}\n"
        log.write(header.encode())
        log.flush()
        process = subprocess.Popen(
            list(spec.command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **spec.env},
            start_new_session=True,  # its own process group, so stopping reaches vLLM's workers
            preexec_fn=_die_with_parent,  # only calls prctl, then exec
        )
    return _Child(spec=spec, process=process, log_path=log_path)


def _signal_group(child: _Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, sig)


def stop_children(children: Sequence[_Child], grace_s: float = DEFAULT_GRACE_S) -> None:
    """SIGTERM every process group, wait up to `grace_s` in total, then SIGKILL the rest."""
    for child in children:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
    finally:
        # Runs on a second Ctrl-C too ("stop now"), and reaches workers that outlived their
        # leader.
        for child in children:
            _signal_group(child, signal.SIGKILL)
            child.process.wait()


async def _wait_ready(child: _Child, session: aiohttp.ClientSession) -> None:
    spec = child.spec
    deadline = time.monotonic() + spec.startup_timeout_s
    while True:
        code = child.process.poll()
        if code is not None:
            raise child.failure(f"exited with code {code} while starting")
        if await _answers(session, spec):
            return
        if time.monotonic() > deadline:
            raise child.failure(f"did not become ready within {spec.startup_timeout_s:.0f}s")
        await asyncio.sleep(_POLL_INTERVAL_S)


async def _answers(session: aiohttp.ClientSession, spec: EngineSpec) -> bool:
    try:
        async with session.get(f"{spec.url}/health") as health:
            if health.status != 200:
                return False
        async with session.get(f"{spec.url}/v1/models") as models:
            if models.status != 200:
                return False
            body = await models.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return spec.served_model in served_model_ids(body)


async def wait_all_ready(children: Sequence[_Child], *, progress: bool) -> None:
    """Wait for every engine in parallel; the first failure cancels the other waits."""
    names = ", ".join(c.spec.name for c in children)
    timeout = aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)
    with make_bar(
        desc=f"starting engines ({names}), 1-2 min",
        enabled=progress,
        total=len(children),
        bar_format="{desc}: {n_fmt}/{total_fmt} ready, {elapsed}",
    ) as bar:

        async def one(child: _Child) -> None:
            await _wait_ready(child, session)
            bar.update(1)

        async def tick() -> None:
            while True:
                await asyncio.sleep(refresh_seconds())
                bar.refresh()

        async with aiohttp.ClientSession(timeout=timeout) as session:
            ticker = asyncio.create_task(tick())
            try:
                async with asyncio.TaskGroup() as group:
                    for child in children:
                        group.create_task(one(child))
            except* EngineStartError as errors:
                # Report the first engine's failure as is; the others were cancelled with it.
                raise errors.exceptions[0] from None
            finally:
                ticker.cancel()


def _start_all(specs: Sequence[EngineSpec], data_dir: Path) -> list[_Child]:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise EngineStartError(f"engine names must be unique, got {names}")
    children: list[_Child] = []
    try:
        for spec in specs:
            children.append(_start(spec, data_dir / "logs"))
    except BaseException:
        stop_children(children)
        raise
    return children


@contextlib.asynccontextmanager
async def launch_engines(
    specs: Sequence[EngineSpec],
    data_dir: Path,
    *,
    progress: bool = True,
    grace_s: float = DEFAULT_GRACE_S,
) -> AsyncIterator[list[RunningEngine]]:
    """Start all engines, wait until each serves, yield them; stop them all on the way out."""
    children = _start_all(specs, data_dir)
    try:
        await wait_all_ready(children, progress=progress)
        yield [c.running() for c in children]
    finally:
        await asyncio.shield(asyncio.to_thread(stop_children, children, grace_s))


@contextlib.contextmanager
def engines_running(
    specs: Sequence[EngineSpec],
    data_dir: Path,
    *,
    progress: bool = True,
    grace_s: float = DEFAULT_GRACE_S,
) -> Iterator[list[RunningEngine]]:
    """Synchronous twin of launch_engines, for code not inside an event loop."""
    children = _start_all(specs, data_dir)
    try:
        # A private loop: unlike asyncio.run, it leaves the thread's current loop alone
        # (pytest-asyncio keeps one there).
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            runner.run(wait_all_ready(children, progress=progress))
        yield [c.running() for c in children]
    finally:
        stop_children(children, grace_s)
