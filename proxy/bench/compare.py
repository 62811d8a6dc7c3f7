"""Compare strategies: for each config, start a fresh proxy, replay the trace, stop it, report.

Each proxy gets its own temporary data directory (cache included), so no strategy starts with a
cache another one warmed. Proxies are started as child processes and always stopped, also when
a replay fails; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.bench.config import costs_from_config, fresh_config_text
from proxy.bench.replay import ReplayOptions, replay
from proxy.bench.report import render_html
from proxy.bench.summary import summarize
from proxy.bench.trace import TraceRequest
from proxy.settings import ConfigError

STOP_GRACE_S = 20.0


def default_serve_command() -> list[str]:
    """``frugal serve`` from the running environment, with placeholders filled per strategy."""
    frugal = Path(sys.executable).with_name("frugal")
    base = [str(frugal)] if frugal.exists() else [sys.executable, "-m", "proxy"]
    return [*base, "serve", "--config", "{config}", "--port", "{port}"]


def fill_command(template: Sequence[str], config: Path, port: int, data_dir: Path) -> list[str]:
    values = {"config": str(config), "port": str(port), "data_dir": str(data_dir)}
    return [part.format(**values) for part in template]


def free_port() -> int:
    """A port nobody listens on right now (the OS picks; a tiny race is acceptable for a bench)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class StrategyError(RuntimeError):
    """A strategy's proxy could not be started or did not become ready."""


async def wait_ready(
    url: str, process: asyncio.subprocess.Process, timeout_s: float, log: Path
) -> None:
    """Poll ``/readyz`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise StrategyError(
                    f"the proxy exited with code {process.returncode} before it was ready; "
                    f"last log lines:\n{_tail(log)}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise StrategyError(f"the proxy was not ready within {timeout_s:.0f}s; see {log}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE_S)
    except TimeoutError:
        process.kill()
        await process.wait()


@dataclass(frozen=True, slots=True)
class CompareOptions:
    replay: ReplayOptions
    serve_command: tuple[str, ...]
    ready_timeout_s: float = 300.0
    roles: Mapping[str, str] | None = None


async def run_strategy(
    config: Path, requests: Sequence[TraceRequest], options: CompareOptions, log: Path
) -> dict[str, Any]:
    """Start a fresh proxy for ``config``, replay, stop it; return the replay summary."""
    costs = costs_from_config(config)
    with tempfile.TemporaryDirectory(prefix="frugal-bench-") as tmp:
        data_dir = Path(tmp)
        port = free_port()
        fresh = data_dir / config.name
        fresh.write_text(fresh_config_text(config, data_dir, port))
        command = fill_command(options.serve_command, fresh, port, data_dir)
        env = {**os.environ, "FRUGAL_DATA_DIR": str(data_dir)}
        url = f"http://127.0.0.1:{port}"
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env
            )
            try:
                await wait_ready(url, process, options.ready_timeout_s, log)
                run = await replay(requests, replace(options.replay, url=url))
            finally:
                await stop(process)
    summary = summarize(run.results, run.duration_s, costs, options.roles)
    summary["not_sent"] = run.not_sent
    summary["cancelled"] = run.cancelled
    summary["interrupted"] = run.interrupted
    summary["config"] = str(config)
    return summary


def strategy_names(configs: Sequence[Path]) -> list[str]:
    """File stems, numbered when two configs share one (``config``, ``config-2``)."""
    names: list[str] = []
    for config in configs:
        name, copy = config.stem, 1
        while name in names:
            copy += 1
            name = f"{config.stem}-{copy}"
        names.append(name)
    return names


@dataclass(slots=True)
class Comparison:
    names: list[str]
    summaries: list[dict[str, Any]]
    notes: list[str]
    failed: int
    interrupted: bool = False


async def compare(
    configs: Sequence[Path],
    requests: Sequence[TraceRequest],
    options: CompareOptions,
    out_dir: Path,
) -> Comparison:
    """Run every strategy in turn (proxy logs go to ``<out_dir>/serve-<name>.log``)."""
    outcome = Comparison(
        [],
        [],
        [f"{len(requests)} requests per strategy; each proxy started with an empty cache."],
        0,
    )
    for name, config in zip(strategy_names(configs), configs, strict=True):
        print(f"== {name} ({config})", file=sys.stderr)
        try:
            summary = await run_strategy(config, requests, options, out_dir / f"serve-{name}.log")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.uncancel() > 0:
                raise
            # Ctrl-C while this strategy's proxy was starting (its replay keeps what it got by
            # itself): the strategies already run are still reported.
            outcome.interrupted = True
            outcome.notes.append(f"{name}: interrupted (Ctrl-C) before its replay")
            print("   interrupted", file=sys.stderr)
            break
        except (StrategyError, ConfigError, OSError, ValueError) as exc:
            outcome.failed += 1
            outcome.notes.append(f"{name}: failed: {exc}")
            print(f"   failed: {exc}", file=sys.stderr)
            continue
        outcome.names.append(name)
        outcome.summaries.append(summary)
        if summary["interrupted"]:
            # Ctrl-C: the partial strategy is reported, the ones after it are not started.
            outcome.interrupted = True
            outcome.notes.append(f"{name}: interrupted (Ctrl-C); later strategies not run")
            break
    return outcome


def write_outputs(outcome: Comparison, out_dir: Path, title: str) -> None:
    """``<out>/<name>.json`` per strategy, ``compare.json`` with all, and ``report.html``."""
    for name, summary in zip(outcome.names, outcome.summaries, strict=True):
        (out_dir / f"{name}.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    (out_dir / "compare.json").write_bytes(
        orjson.dumps(
            dict(zip(outcome.names, outcome.summaries, strict=True)), option=orjson.OPT_INDENT_2
        )
    )
    if outcome.summaries:
        html = render_html(title, outcome.names, outcome.summaries, outcome.notes)
        (out_dir / "report.html").write_text(html)
