"""Proxy overhead, measured as ratios in one run on loopback against a zero-delay fake engine.

    .venv/bin/python scripts/bench_overhead.py    # every target below
    .venv/bin/python scripts/bench_overhead.py --targets direct,relay,frugal,frugal-full
    .venv/bin/python scripts/bench_overhead.py \\
        --targets direct,relay,frugal,frugal-cache,frugal-routing,frugal-policy  # one feature each
    .venv/bin/python scripts/bench_overhead.py --targets direct,relay,litellm,portkey  # no Frugal
    .venv/bin/python scripts/bench_overhead.py --frugal-config my.yaml  # ${ENGINE_URL} substituted

Targets, each started and stopped here on free loopback ports, in front of one fake engine
(``python -m proxy.engines.fake``): ``direct`` (the engine itself), ``relay`` (scripts/relay.py,
the floor), ``frugal`` (``python -m proxy serve``: the bare path, cache and routing off, no
policy files), one feature at a time in the same proxy: ``frugal-cache`` (the exact cache on;
every request misses and its answer is stored), ``frugal-routing`` (two engines, ``model: auto``
routed between them), ``frugal-policy`` (a keyed tier with rate, token, concurrency and budget
limits that never refuse), and ``frugal-full`` (all three: every request goes through the cache
lookup, the router, the limiter and the budget reservation, and misses); ``litellm`` and
``portkey`` (installed by scripts/setup_peers.sh under ``$FRUGAL_BENCH_DIR``, default
``~/.cache/frugal-bench``). The Frugal targets leave the embedding model out (no semantic lookup,
no difficulty score): one MiniLM pass costs milliseconds on this CPU and is measured by
bench_cache_speed.py and bench_engines.py instead.

Every request's body is unique (a run-unique counter in the user message, same for every target),
so a cache in the path always misses and also stores every answer; ``--same-body`` posts one body
throughout instead (then ``frugal-full`` would serve exact hits after the first request).

Load generator: wrk (C, one thread) with scripts/wrk/post_json.lua posting a non-streamed
chat body (with a per-request nonce unless ``--same-body``). With ``--pin`` wrk and the engine
share CPU 0 and the proxy under test gets CPU 1, so the load generator does not steal the proxy's
core (off by default: see --pin's help).

Measured, interleaved over ``--rounds`` rounds (targets in rotating order) and reported as
medians, because the machine is shared and noisy:

(a) latency at concurrency 1: p50 and p99, and the latency *added* over direct in the same round;
(b) requests/s at 64 connections;
(c) errors at 1,000 connections (refused/reset connections and non-2xx answers), after the
    rounds; requests still unanswered after 10 s (wrk's timeout count, which the 12 s default
    run exposes) are reported beside them, not counted as errors.

Targets, for each Frugal configuration: added p50 and p99 within 1.3x the relay's, throughput
>= 0.8x the relay's, no errors at 1,000 connections. Output: ``--out``/overhead.{md,json} (plus
a time-stamped copy).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import proc_cpu  # noqa: E402  (a sibling module: CPU of the proxy's process tree)

LUA = REPO / "scripts" / "wrk" / "post_json.lua"
MODEL = "bench-model"
LITELLM_KEY = "sk-frugalbench-9f4c2a7d1e8b3c6f5a0d9e2b7c4f1a8d"  # local-only master key
FULL_KEY = "sk-frugalbench-full-5d2e8a1c7b9f4e6a3c0d8b2f1e7a9c4d"  # local-only API key
CHAT_PATH = "/v1/chat/completions"

# The measured request: short, non-streamed, deterministic (temperature 0) so every target
# returns the same bytes.
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France? Answer briefly."}],
    "temperature": 0,
    "max_tokens": 16,
}
NONCE = "#NONCE"  # post_json.lua replaces it with a run-unique counter per request

# Frugal's configurations: the bare path, each feature alone (in the path, every request a miss),
# and all of them together. With routing on, two engine names on the one fake engine so `auto`
# is routed between them; with a policy, a keyed tier whose limits never refuse.
FRUGAL_FEATURES: dict[str, tuple[str, ...]] = {
    "frugal": (),
    "frugal-cache": ("cache",),
    "frugal-routing": ("routing",),
    "frugal-policy": ("policy",),
    "frugal-full": ("cache", "routing", "policy"),
}
FRUGAL_TARGETS = tuple(FRUGAL_FEATURES)
ALL_TARGETS = ("direct", "relay", *FRUGAL_TARGETS, "litellm", "portkey")

ENGINE_SMALL = """\
  - name: small
    model: {model}
    urls: ["${{ENGINE_URL}}"]
    cost: {{input_per_mtok: 0.05, output_per_mtok: 0.10}}
"""
ENGINE_LARGE = """\
  - name: large
    model: {model}-large
    version: bench-large-1  # the fake engine reports one model name: no auto version for this one
    urls: ["${{ENGINE_URL}}"]
    cost: {{input_per_mtok: 0.50, output_per_mtok: 1.50}}
"""


def frugal_config(features: tuple[str, ...], *, policies: Path | None, data_dir: Path) -> str:
    """The proxy's config for ``features`` (logging as in production; no embedding model: one
    MiniLM pass costs ~10 ms on this CPU and is measured by bench_cache_speed.py instead)."""
    engines = ENGINE_SMALL + (ENGINE_LARGE if "routing" in features else "")
    on = ", semantic: false" if "cache" in features else ""
    return (
        f"# Generated by scripts/bench_overhead.py: {', '.join(features) or 'the bare path'}.\n"
        "server: {host: 127.0.0.1, port: 0}\n"
        f"engines:\n{engines.format(model=MODEL)}"
        f"cache: {{enabled: {str('cache' in features).lower()}{on}}}\n"
        f"routing: {{enabled: {str('routing' in features).lower()}}}\n"
        "embeddings: {enabled: false}\n"
        f"policies: {policies if 'policy' in features else 'null'}\n"
        "health: {interval_s: 2.0, timeout_s: 2.0}\n"
        "logging: {format: json, level: info}\n"
        f"data_dir: {data_dir}\n"
    )


FULL_POLICY = """\
tier: bench
description: scripts/bench_overhead.py, every check on, limits that never refuse
keys:
  - {{hash: "{key_hash}", tenant: bench}}
models: [{models}]
limits:
  requests_per_minute: 100000000
  tokens_per_minute: 1000000000
  concurrent: 100000
  max_tokens: 4096
budget:
  usd_per_day: 1000000.0
  usd_per_day_per_tenant: 1000000.0
routing: {{strong_share: 0.30}}
latency: {{ttft_p95_ms: 60000}}
cache: {{scope: tenant, ttl_seconds: 3600, semantic: false}}
priority: 5
queue: {{max_wait_ms: 10000}}
"""

# --background-cpu: a busy loop at the lowest scheduling class, using only CPU nobody else wants.
BACKGROUND_CPU = """\
import os
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    pass
"""

LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {engine_url}/v1
      api_key: sk-none
litellm_settings:
  telemetry: false
  set_verbose: false
  turn_off_message_logging: true
general_settings:
  disable_spend_logs: true
"""


@dataclass
class Target:
    name: str
    port: int
    command: list[str] | None  # None: the engine itself (direct)
    headers: dict[str, str] = field(default_factory=dict)
    model: str = MODEL  # the body's model field
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT_PATH}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench_dir() -> Path:
    return Path(os.environ.get("FRUGAL_BENCH_DIR", Path.home() / ".cache" / "frugal-bench"))


def peer_commands(engine_url: str, work: Path) -> dict[str, Target]:
    """How each peer is started in front of ``engine_url`` (a base URL without /v1)."""
    peers = bench_dir()
    litellm_cfg = work / "litellm.yaml"
    litellm_cfg.write_text(LITELLM_CONFIG.format(model=MODEL, engine_url=engine_url))
    litellm_port, portkey_port = free_port(), free_port()
    litellm = Target(
        "litellm",
        litellm_port,
        [
            str(peers / "litellm-venv" / "bin" / "litellm"),
            "--config",
            str(litellm_cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(litellm_port),
            "--num_workers",
            "1",  # one process, like every other target (and pinned to one core)
        ],
        headers={"Authorization": f"Bearer {LITELLM_KEY}"},
        env={
            "LITELLM_MASTER_KEY": LITELLM_KEY,  # refuses to start without one
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "DATABASE_URL": None,  # no spend/key DB: the bare proxy path
        },
        cwd=work,
    )
    portkey = Target(
        "portkey",
        portkey_port,
        [
            "node",
            str(peers / "portkey/node_modules/@portkey-ai/gateway/build/start-server.js"),
            f"--port={portkey_port}",
            "--headless",
        ],
        # Provider "openai" with a custom host is Portkey's way to reach any OpenAI-compatible
        # server; 127.0.0.1 is in its default trusted custom hosts. Known gap: with gateway
        # 1.15.2 on node 20, *streamed* requests this way fail ("TypeError: immutable" in
        # updateHeaders, Portkey-AI/gateway#1389/#1550); the non-streamed ones measured here work.
        # It listens on all interfaces (no host flag); only loopback traffic is sent.
        headers={
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"{engine_url}/v1",
            "Authorization": "Bearer sk-none",
        },
        env={"NODE_ENV": "production"},
        cwd=peers / "portkey",
    )
    return {"litellm": litellm, "portkey": portkey}


def _frugal_target(
    name: str,
    config_text: str,
    work: Path,
    *,
    headers: dict[str, str] | None = None,
    model: str = MODEL,
    tree: Path = REPO,
) -> Target:
    config = work / f"{name}.yaml"
    config.write_text(config_text)
    port = free_port()
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)]
    # From the tree's own directory, and its children by PYTHONPATH: its `proxy` is the one run.
    env: dict[str, str | None] = {"PYTHONPATH": str(tree)} if tree != REPO else {}
    return Target(name, port, command, headers=headers or {}, model=model, env=env, cwd=tree)


def build_targets(
    names: list[str],
    engine_port: int,
    work: Path,
    frugal_config_file: Path | None,
    tree: Path = REPO,
) -> list[Target]:
    """``tree``: the checkout Frugal's targets run from (a compiled build's: --tree)."""
    engine_url = f"http://127.0.0.1:{engine_port}"
    peers = peer_commands(engine_url, work)
    targets: list[Target] = []
    for name in names:
        if name == "direct":
            targets.append(Target("direct", engine_port, None))
        elif name == "relay":
            port = free_port()
            command = [sys.executable, str(REPO / "scripts" / "relay.py")]
            command += ["--upstream", engine_url, "--port", str(port)]
            targets.append(Target("relay", port, command))
        elif name == "frugal" and frugal_config_file is not None:
            text = frugal_config_file.read_text().replace("${ENGINE_MODEL}", MODEL)
            text = text.replace("${ENGINE_URL}", engine_url)
            targets.append(_frugal_target(name, text, work, tree=tree))
        elif name in FRUGAL_FEATURES:
            features = FRUGAL_FEATURES[name]
            headers, policies = {}, None
            models = [MODEL, f"{MODEL}-large", "auto"] if "routing" in features else [MODEL]
            if "policy" in features:
                policies = work / f"{name}-policies"
                policies.mkdir(exist_ok=True)
                key_hash = "sha256:" + hashlib.sha256(FULL_KEY.encode()).hexdigest()
                policy = FULL_POLICY.format(key_hash=key_hash, models=", ".join(models))
                (policies / "bench.yaml").write_text(policy)
                headers = {"Authorization": f"Bearer {FULL_KEY}"}
            text = frugal_config(features, policies=policies, data_dir=work / f"{name}-data")
            model = "auto" if "routing" in features else MODEL
            text = text.replace("${ENGINE_URL}", engine_url)
            target = _frugal_target(name, text, work, headers=headers, model=model, tree=tree)
            targets.append(target)
        elif name in peers:
            targets.append(peers[name])
        else:
            raise SystemExit(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")
    return targets


def pinned(command: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def start(command: list[str], log: Path, env: dict[str, str | None], cwd: Path | None) -> Any:
    # Own session: stop() signals the whole group we started (uvicorn, node workers), no more.
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
            cwd=cwd,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def body_for(target: Target, *, unique: bool) -> dict[str, Any]:
    """The posted body: the same for every target but its model field (and, when unique, a
    marker in the user message that the wrk script replaces per request)."""
    body: dict[str, Any] = json.loads(json.dumps(BODY))  # a deep copy
    body["model"] = target.model
    if unique:
        body["messages"][-1]["content"] += f" {NONCE}"
    return body


def one_request(url: str, headers: dict[str, str], timeout: float, model: str = MODEL) -> int:
    data = json.dumps({**BODY, "model": model}).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return 0


def wait_ready(target: Target, timeout_s: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    status = 0
    while time.monotonic() < deadline:
        if target.process is not None and target.process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise SystemExit(f"{target.name} exited during start-up:\n{tail}")
        status = one_request(target.url, target.headers, timeout=2, model=target.model)
        if status == 200:
            return
        time.sleep(0.3)
    raise SystemExit(f"{target.name} not ready after {timeout_s}s (last status {status})")


WRK_JSON = re.compile(r"^WRK_JSON (\{.*\})$", re.MULTILINE)


def run_wrk(
    target: Target,
    body_file: Path,
    connections: int,
    duration_s: int,
    cpus: str | None,
    timeout_s: int = 10,
) -> dict[str, Any]:
    seconds, timeout = max(1, duration_s), max(1, timeout_s)  # wrk takes whole seconds
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout}s"]
    command += ["-s", str(LUA), target.url, "--", str(body_file)]
    command += [f"{name}: {value}" for name, value in target.headers.items()]
    done = subprocess.run(
        pinned(command, cpus), capture_output=True, text=True, timeout=seconds + 60
    )
    match = WRK_JSON.search(done.stdout)
    if not match:
        raise RuntimeError(f"wrk gave no result for {target.name}: {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    # Hard errors: refused/reset connections and non-2xx answers. wrk's "timeout" counts
    # requests (or connections never accepted) older than --timeout at its 2-second checks:
    # slowness under overload, reported apart.
    errors = result["errors"]
    result["error_total"] = errors["connect"] + errors["read"] + errors["write"] + errors["status"]
    result["slow"] = errors["timeout"]
    return result


def cpu_seconds(target: Target) -> float | None:
    """CPU time of the target's process and its children so far (None for the engine itself)."""
    if target.process is None:
        return None
    return proc_cpu.cpu_seconds(target.process.pid)


def skipped_stores(target: Target) -> int | None:
    """Answers a Frugal target did not store because its cache's write queue was full (the
    ``frugal_cache_errors_total{op="put"}`` counter); None when it has no such metric."""
    if not target.name.startswith("frugal"):
        return None
    url = f"http://127.0.0.1:{target.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    lines = [
        x for x in text.splitlines() if x.startswith("frugal_cache_errors") and 'op="put"' in x
    ]
    return sum(int(float(x.rsplit(" ", 1)[1])) for x in lines)


def listen_overflows() -> int:
    """TcpExt ListenOverflows from /proc/net/netstat (0 where it cannot be read)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(
    rounds: list[dict[str, dict[str, Any]]], stress: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Medians over rounds; added latency is taken against direct within the same round."""
    names = list(rounds[0])
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        lat = [r[name]["latency"]["latency_us"] for r in rounds]
        row = {
            "p50_ms": median([x["p50"] / 1000 for x in lat]),
            "p99_ms": median([x["p99"] / 1000 for x in lat]),
            "rps_64": median([r[name]["throughput"]["rps"] for r in rounds]),
            "errors_64": float(sum(r[name]["throughput"]["error_total"] for r in rounds)),
        }
        cpu = [r[name]["throughput"].get("cpu_us_per_request") for r in rounds]
        if all(c is not None for c in cpu):
            row["cpu_us_per_request"] = median([float(c) for c in cpu if c is not None])
        if "direct" in names:
            for q in ("p50", "p99"):
                added = [
                    (r[name]["latency"]["latency_us"][q] - r["direct"]["latency"]["latency_us"][q])
                    / 1000
                    for r in rounds
                ]
                row[f"added_{q}_ms"] = median(added)
        if "relay" in names:
            by_round = [
                r[name]["throughput"]["rps"] / r["relay"]["throughput"]["rps"] for r in rounds
            ]
            row["rps_vs_relay"] = median(by_round)
            # the spread a verdict is read against: on a noisy host one round can cross the line
            row["rps_vs_relay_min"], row["rps_vs_relay_max"] = min(by_round), max(by_round)
        if name in stress:
            row["errors_1000"] = float(stress[name]["error_total"])
            row["slow_1000"] = float(stress[name]["slow"])
            row["listen_overflows_1000"] = float(stress[name].get("listen_overflows", 0))
            row["requests_1000"] = float(stress[name]["requests"])
            row["rps_1000"] = stress[name]["rps"]
        summary[name] = row
    if "relay" in summary and "direct" in summary:
        relay = summary["relay"]
        for row in summary.values():
            for q in ("p50", "p99"):
                floor = relay[f"added_{q}_ms"]
                row[f"added_{q}_vs_relay"] = row[f"added_{q}_ms"] / floor if floor > 0 else 0.0
    return summary


def verdict(summary: dict[str, dict[str, float]]) -> list[str]:
    names = [name for name in FRUGAL_TARGETS if name in summary]
    if not names or "relay" not in summary or "direct" not in summary:
        return ["(no verdict: needs direct, relay and frugal in the run)"]
    lines: list[str] = []
    for name in names:
        lines += [f"{name}:", *_checks(summary[name])]
    return lines


def _checks(frugal: dict[str, float]) -> list[str]:
    checks = [
        ("added p50 <= 1.3x relay", frugal["added_p50_vs_relay"] <= 1.3),
        ("added p99 <= 1.3x relay", frugal["added_p99_vs_relay"] <= 1.3),
        ("throughput >= 0.8x relay", frugal["rps_vs_relay"] >= 0.8),
        # wrk counts only finished requests: zero errors with zero answers is not a pass.
        (
            "no errors at 1,000 connections",
            frugal.get("errors_1000", 1.0) == 0 and frugal.get("requests_1000", 0.0) > 0,
        ),
    ]
    return [f"- {name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks]


def render_markdown(meta: dict[str, Any], summary: dict[str, dict[str, float]]) -> str:
    def f(row: dict[str, float], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    lines = [
        f"# Proxy overhead ({meta['date']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Load generator: wrk {meta['wrk']} (1 thread, Lua POST of a non-streamed chat body,"
        f" max_tokens 16, {meta['bodies']}). Pinning: {meta['pinning']}."
        f" Background CPU: {meta.get('background_cpu', 'none')}."
        f" Rounds: {meta['rounds']} (interleaved, medians); latency {meta['latency_s']} s at 1"
        f" connection, throughput"
        f" {meta['throughput_s']} s at 64, stress {meta['stress_s']} s at 1,000.",
        f"Machine: {meta['cpus']} CPUs; load average before {meta['load_before']},"
        f" after {meta['load_after']} (shared with other jobs: numbers are noisy).",
        "",
        "| target | p50 ms | added p50 ms | x relay | p99 ms | added p99 ms | x relay |"
        " req/s @64 | x relay | CPU µs/req @64 | errors @64 |"
        " @1000: errors / >10 s (of answered) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in summary.items():
        stress = (
            f"{row['errors_1000']:.0f} / {row['slow_1000']:.0f} (of {row['requests_1000']:.0f})"
            if "errors_1000" in row
            else "-"
        )
        lines.append(
            f"| {name} | {row['p50_ms']:.3f} | {f(row, 'added_p50_ms', '+.3f')} |"
            f" {f(row, 'added_p50_vs_relay', '.2f')} | {row['p99_ms']:.3f} |"
            f" {f(row, 'added_p99_ms', '+.3f')} | {f(row, 'added_p99_vs_relay', '.2f')} |"
            f" {row['rps_64']:,.0f} | {f(row, 'rps_vs_relay', '.2f')} |"
            f" {f(row, 'cpu_us_per_request', '.0f')} | {row['errors_64']:.0f} | {stress} |"
        )
    spread = [
        f"{name} {row['rps_vs_relay_min']:.2f}-{row['rps_vs_relay_max']:.2f}"
        for name, row in summary.items()
        if "rps_vs_relay_min" in row and name != "relay"
    ]
    if spread and meta["rounds"] > 1:
        lines += ["", f"Throughput x relay, lowest-highest round: {'; '.join(spread)}."]
    lines += [
        "",
        "Added latency is a target's percentile minus direct's in the same round (median over"
        " rounds); p99 at 1 connection on a shared 2-core machine is mostly scheduling noise."
        " At 1,000 connections wrk counts finished requests only (a target can show 0 errors"
        " and 0 answers); errors are refused/reset connections and non-2xx, '>10 s' is wrk's"
        " timeout count (requests or connections still waiting after 10 s at its 2-s checks).",
        "",
        "Frugal targets:",
        *verdict(summary),
        "",
    ]
    lines += [f"Versions: {json.dumps(meta['versions'])}", ""]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    peers = bench_dir()
    pip = peers / "litellm-venv" / "bin" / "pip"
    if pip.exists():
        shown = subprocess.run([str(pip), "show", "litellm"], capture_output=True, text=True)
        found["litellm"] = next(
            (line.split()[-1] for line in shown.stdout.splitlines() if line.startswith("Version")),
            "?",
        )
    package = peers / "portkey/node_modules/@portkey-ai/gateway/package.json"
    if package.exists():
        found["portkey"] = json.loads(package.read_text())["version"]
    return found


def check_peers(names: list[str]) -> None:
    peers = bench_dir()
    missing = [
        name
        for name, path in (
            ("litellm", peers / "litellm-venv" / "bin" / "litellm"),
            ("portkey", peers / "portkey/node_modules/@portkey-ai/gateway/build/start-server.js"),
        )
        if name in names and not path.exists()
    ]
    if missing:
        raise SystemExit(f"{missing} not installed under {peers}: run scripts/setup_peers.sh")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: run scripts/setup_peers.sh (or apt-get install wrk)")


@contextlib.contextmanager
def running(targets: list[Target], engine: Target) -> Iterator[None]:
    """Stop every process this run started, whatever happens."""
    try:
        yield
    finally:
        for target in [*targets, engine]:
            stop(target.process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS))
    parser.add_argument(
        "--same-body",
        action="store_true",
        help="post one body throughout (default: a unique body per request, so caches miss)",
    )
    parser.add_argument("--frugal-config", type=Path, help="template; ${ENGINE_URL} substituted")
    parser.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="run Frugal's targets from this checkout, e.g. the compiled build's"
        " (scripts/build_compiled makes build/compiled); the relay and engine run from here",
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "overhead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-s", type=int, default=5)
    parser.add_argument("--throughput-s", type=int, default=5)
    parser.add_argument("--stress-s", type=int, default=12)
    parser.add_argument("--warmup-s", type=int, default=3)
    parser.add_argument("--no-stress", action="store_true")
    parser.add_argument(
        "--background-cpu",
        action="store_true",
        # A control for the one-connection tail: how much a process that only uses spare CPU
        # (a writer child, a log shipper) moves every target's p99 on this machine.
        help="run a lowest-priority (SCHED_IDLE) busy loop throughout the measurements",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        # Off by default: on a 2-core machine shared with other jobs, confining the proxy to one
        # core gave no steadier numbers in A/B runs (the core is shared anyway).
        help="engine + wrk on CPU 0, the proxy under test on CPU 1",
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if args.frugal_config and "frugal" not in names:
        names.append("frugal")
    check_peers(names)
    load_cpus, proxy_cpus = ("0", "1") if args.pin else (None, None)

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="frugal-overhead-"))
    engine_port = free_port()
    engine = Target("engine", engine_port, None)
    targets = build_targets(names, engine_port, work, args.frugal_config, args.tree.resolve())
    bodies: dict[str, Path] = {}
    for target in targets:
        bodies[target.name] = work / f"body-{target.name}.json"
        bodies[target.name].write_text(json.dumps(body_for(target, unique=not args.same_body)))
    load_before = os.getloadavg()
    background: list[Target] = []

    with running(targets, engine), running(background, Target("none", 0, None)):
        engine_cmd = [sys.executable, "-m", "proxy.engines.fake", "--port", str(engine_port)]
        engine_cmd += ["--model", MODEL]
        engine.process = start(pinned(engine_cmd, load_cpus), work / "engine.log", {}, REPO)
        direct = Target("direct", engine_port, None)
        wait_ready(direct, 30, work / "engine.log")
        if args.background_cpu:
            burner = Target("background-cpu", 0, [sys.executable, "-c", BACKGROUND_CPU])
            burner.process = start(burner.command or [], work / "burner.log", {}, REPO)
            background.append(burner)
        for target in targets:
            if target.command is not None:
                log = work / f"{target.name}.log"
                target.process = start(
                    pinned(target.command, proxy_cpus), log, target.env, target.cwd
                )
                wait_ready(target, 120, log)
            print(f"[{target.name}] up at {target.url}; warming up", flush=True)
            run_wrk(target, bodies[target.name], 8, args.warmup_s, load_cpus)

        rounds: list[dict[str, dict[str, Any]]] = []
        for index in range(args.rounds):
            shift = index % len(targets)
            order = targets[shift:] + targets[:shift]  # rotate so no target always goes first
            results: dict[str, dict[str, Any]] = {}
            for target in order:
                body_file = bodies[target.name]
                latency = run_wrk(target, body_file, 1, args.latency_s, load_cpus)
                cpu_before = cpu_seconds(target)
                throughput = run_wrk(target, body_file, 64, args.throughput_s, load_cpus)
                cpu_after = cpu_seconds(target)
                # The steadier figure on a shared machine: the proxy's CPU per answered request.
                throughput["cpu_us_per_request"] = (
                    (cpu_after - cpu_before) * 1e6 / max(1, throughput["requests"])
                    if cpu_before is not None and cpu_after is not None
                    else None
                )
                # A slow target may still be working through requests wrk abandoned at the end;
                # one fresh answer means its queue has drained before the next target runs.
                wait_ready(target, 60, None)
                results[target.name] = {"latency": latency, "throughput": throughput}
                print(
                    f"round {index + 1} {target.name}: p50 {latency['latency_us']['p50']} us,"
                    f" p99 {latency['latency_us']['p99']} us, {throughput['rps']:.0f} req/s @64,"
                    f" errors {throughput['error_total']},"
                    f" cpu/request {throughput['cpu_us_per_request'] or 0:.0f} us",
                    flush=True,
                )
            rounds.append({t.name: results[t.name] for t in targets})
        for target in targets:
            skipped = skipped_stores(target)
            if skipped is not None:
                print(f"[{target.name}] answers not stored (write queue full): {skipped}")

        stress: dict[str, dict[str, Any]] = {}
        if not args.no_stress:
            for target in targets:
                overflows = listen_overflows()
                stress[target.name] = run_wrk(
                    target, bodies[target.name], 1000, args.stress_s, load_cpus
                )
                # The kernel's accept-queue overflow count (machine-wide) during the run.
                stress[target.name]["listen_overflows"] = listen_overflows() - overflows
                print(
                    f"stress {target.name}: {stress[target.name]['requests']} requests,"
                    f" errors {stress[target.name]['errors']},"
                    f" listen overflows {stress[target.name]['listen_overflows']}",
                    flush=True,
                )
                wait_ready(target, 60, None)  # let a backed-up target drain before the next

    summary = summarise(rounds, stress)
    now = datetime.now(UTC)
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "wrk": (wrk_version.stdout + wrk_version.stderr).split()[1],
        "pinning": "engine + wrk on CPU 0, proxy on CPU 1" if args.pin else "none",
        "bodies": "one body throughout" if args.same_body else "a unique body per request",
        "background_cpu": "a SCHED_IDLE busy loop" if args.background_cpu else "none",
        "rounds": args.rounds,
        "latency_s": args.latency_s,
        "throughput_s": args.throughput_s,
        "stress_s": 0 if args.no_stress else args.stress_s,
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
        "body": BODY,
    }
    markdown = render_markdown(meta, summary)
    report = {"meta": meta, "summary": summary, "rounds": rounds, "stress": stress}
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    for stem in ("overhead", f"overhead-{stamp}"):
        (args.out / f"{stem}.md").write_text(markdown)
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(markdown)
    print(f"written to {args.out}/overhead.md and .json; target logs in {work}")


if __name__ == "__main__":
    main()
