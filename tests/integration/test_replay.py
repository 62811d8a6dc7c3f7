"""Replay the small trace against an in-test server that answers like the proxy.

``MockProxy`` keeps an exact and a "semantic" cache (keyed by the trace's group, which a real
proxy cannot see, so the test knows the truth), routes long prompts to ``large``, injects 429s,
mid-stream errors and deliberate false semantic hits, and records what it served. The tests check
that the harness measured exactly what the server did.

Run as a script, the same mock is a stand-in ``frugal serve`` for ``frugal bench compare``::

    python tests/integration/test_replay.py --config X.yaml --port P --trace T.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.bench.cli import main as bench_main
from proxy.bench.replay import ReplayOptions, replay
from proxy.bench.summary import EngineCost, summarize
from proxy.bench.trace import TraceRequest, load_trace
from proxy.sse import DONE_EVENT, frame

SMALL_TRACE = Path(__file__).resolve().parents[1] / "data" / "small_trace.jsonl"
STRATEGIES = Path(__file__).resolve().parents[2] / "scripts" / "strategies"
PRICES = {"small": EngineCost(0.1, 0.2), "large": EngineCost(1.0, 3.0)}


def request_key(endpoint: str, body: Mapping[str, Any]) -> bytes:
    return orjson.dumps([endpoint, body.get("messages") or body.get("prompt")])


def last_text(body: Mapping[str, Any]) -> str:
    if isinstance(body.get("prompt"), str):
        return str(body["prompt"])
    return str(body["messages"][-1]["content"])


@dataclass(frozen=True, slots=True)
class Entry:
    text: str
    group: str
    engine: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Served:
    status: int
    group: str = ""
    cache: str = ""
    route: str = ""
    entry: Entry | None = None
    stream_error: bool = False
    bearer: str | None = None


@dataclass
class MockProxy:
    trace: Sequence[TraceRequest]
    engines: tuple[str, ...] = ("small", "large")
    cache_enabled: bool = True
    semantic: bool = True
    fail_every: int = 25
    stream_error_every: int = 20
    poisoned_groups: frozenset[str] = frozenset()
    hang: asyncio.Event | None = None
    hang_after: int = 0  # with hang: the first N requests are answered, the rest wait for it
    received: int = 0
    store_file: Path | None = None
    served: list[Served] = field(default_factory=list)
    exact: dict[bytes, Entry] = field(default_factory=dict)
    by_group: dict[str, Entry] = field(default_factory=dict)
    last_entry: Entry | None = None
    count: int = 0
    streams: int = 0

    def __post_init__(self) -> None:
        self.group_of = {request_key(r.endpoint, r.body): r.group or "" for r in self.trace}
        if self.store_file is not None and self.store_file.exists():
            for key, entry in orjson.loads(self.store_file.read_bytes()):
                self.exact[key.encode()] = Entry(**entry)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_get("/readyz", self.ready)
        return app

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    def route(self, body: Mapping[str, Any]) -> tuple[str, str]:
        if len(self.engines) == 1:
            return self.engines[0], "default"
        return ("large", "hard") if len(last_text(body)) > 200 else ("small", "easy")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received += 1
        if self.hang is not None and self.received > self.hang_after:
            await self.hang.wait()
        self.count += 1
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        if self.count % self.fail_every == 0:
            self.served.append(Served(429, bearer=bearer))
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        body = await request.json()
        endpoint = "completions" if request.path == "/v1/completions" else "chat"
        key = request_key(endpoint, body)
        group = self.group_of[key]
        engine, reason = self.route(body)
        sampled = body.get("temperature", 1.0) > 0
        entry: Entry | None = None
        if not self.cache_enabled or sampled:
            cache = "bypass"
        elif key in self.exact:
            cache, entry = "hit-exact", self.exact[key]
        elif self.semantic and group in self.poisoned_groups and self.last_entry is not None:
            cache, entry = "hit-semantic", self.last_entry  # deliberately someone else's answer
        elif self.semantic and group in self.by_group:
            cache, entry = "hit-semantic", self.by_group[group]
        else:
            cache = "miss"
        stream = bool(body.get("stream"))
        stream_error = False
        if stream:
            self.streams += 1
            stream_error = self.streams % self.stream_error_every == 0
        if entry is None:
            text = f"answer #{self.count} by {engine}: {last_text(body)[:40]}"
            entry = Entry(text, group, engine, len(str(key)) // 4, len(text.split()))
            if cache == "miss" and not stream_error:
                self.store(key, entry)
        self.served.append(Served(200, group, cache, engine, entry, stream_error, bearer))
        headers = {
            "x-frugal-cache": cache,
            "x-frugal-route": engine,
            "x-frugal-route-reason": reason,
            "x-frugal-engine": entry.engine,
        }
        usage = {"prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens}
        if not stream:
            field_name = "text" if endpoint == "completions" else "message"
            content: Any = entry.text if endpoint == "completions" else {"content": entry.text}
            choice = {"index": 0, field_name: content, "finish_reason": "stop"}
            return web.json_response({"choices": [choice], "usage": usage}, headers=headers)
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)
        words = entry.text.split(" ")
        pieces = [" ".join(words[:2]) + " ", " ".join(words[2:])]
        for piece in pieces[:1] if stream_error else pieces:
            delta = {"content": piece} if endpoint == "chat" else None
            choice = {"index": 0, "delta": delta} if delta else {"index": 0, "text": piece}
            await response.write(frame(orjson.dumps({"choices": [choice]})))
        if stream_error:
            await response.write(frame(b'{"error": {"message": "engine failed mid-stream"}}'))
            return response
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(frame(orjson.dumps({"choices": [], "usage": usage})))
        await response.write(DONE_EVENT)
        return response

    def store(self, key: bytes, entry: Entry) -> None:
        self.exact[key] = entry
        self.by_group.setdefault(entry.group, entry)
        self.last_entry = entry
        if self.store_file is not None:
            rows = [(k.decode(), _entry_dict(e)) for k, e in self.exact.items()]
            self.store_file.write_bytes(orjson.dumps(rows))


def _entry_dict(entry: Entry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in Entry.__slots__}


async def start(proxy: MockProxy) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


TRACE = load_trace(SMALL_TRACE)


async def test_replay_measures_what_the_server_did() -> None:
    poisoned = frozenset(sorted({r.group or "" for r in TRACE if r.kind == "paraphrase"})[:3])
    proxy = MockProxy(TRACE, poisoned_groups=poisoned)
    runner, url = await start(proxy)
    try:
        run = await replay(TRACE, ReplayOptions(url=url, concurrency=8, progress=False))
    finally:
        await runner.cleanup()
    assert (run.not_sent, run.cancelled, len(run.results)) == (0, 0, len(TRACE))
    summary = summarize(run.results, run.duration_s, PRICES)

    good = [s for s in proxy.served if s.status == 200 and not s.stream_error]
    assert summary["errors"] == {
        "429": len(TRACE) // proxy.fail_every,
        "stream-error": sum(s.stream_error for s in proxy.served),
    }
    assert summary["ok"] == len(good)
    assert {k: v for k, v in summary["cache"]["counts"].items() if v} == dict(
        Counter(s.cache for s in good)
    )
    assert summary["routes"]["counts"] == dict(Counter(s.route for s in good))
    assert summary["routes"]["reasons"] == {"easy": sum(s.route == "small" for s in good)} | (
        {"hard": n} if (n := sum(s.route == "large" for s in good)) else {}
    )

    called = [s for s in good if s.cache in ("miss", "bypass") and s.entry is not None]
    for engine, tokens in summary["tokens"]["by_engine"].items():
        mine = [s.entry for s in called if s.entry is not None and s.entry.engine == engine]
        assert tokens["requests"] == len(mine)
        assert tokens["completion"] == sum(e.completion_tokens for e in mine)
    expected_cost = sum(
        PRICES[s.entry.engine].of(s.entry.prompt_tokens, s.entry.completion_tokens)
        for s in called
        if s.entry is not None
    )
    assert summary["cost"]["total"] == pytest.approx(expected_cost)
    assert summary["tokens"]["estimated_requests"] == 0

    semantic = summary["quality"]["cache"]["hit-semantic"]
    semantic_hits = [s for s in good if s.cache == "hit-semantic" and s.entry is not None]
    false_hits = sum(s.entry.group != s.group for s in semantic_hits if s.entry is not None)
    assert false_hits > 0  # the poisoned groups did produce false hits
    assert (semantic["false"], semantic["correct"], semantic["unknown"]) == (
        false_hits,
        len(semantic_hits) - false_hits,
        0,
    )
    assert summary["quality"]["cache"]["hit-exact"]["false"] == 0

    ref_of = {request_key(r.endpoint, r.body): r.ref for r in TRACE}
    by_index = {r.index: r for r in TRACE}
    scored = [
        (res, ref_of[request_key(by_index[res.index].endpoint, by_index[res.index].body)])
        for res in run.results
        if res.ok and by_index[res.index].ref
    ]
    expected_quality = sum(
        ref["strong" if res.engine == "large" else "weak"] for res, ref in scored
    ) / len(scored)
    assert summary["quality"]["routing"]["mean_quality"] == pytest.approx(expected_quality)

    streamed_ok = [r for r in run.results if r.ok and r.stream]
    assert streamed_ok and all(r.ttft_s is not None for r in streamed_ok)
    assert summary["ttft_s"]["count"] == len(streamed_ok)
    assert Counter(s.bearer for s in proxy.served) == Counter(r.api_key for r in TRACE)


async def test_streamed_requests_without_stream_options_still_get_exact_usage() -> None:
    # A trace of clients that never asked for a usage chunk: the harness asks, so its token and
    # cost figures are the engine's, not a characters-per-token guess.
    plain = [
        dataclasses.replace(r, body={k: v for k, v in r.body.items() if k != "stream_options"})
        for r in TRACE
        if r.stream
    ][:20]
    proxy = MockProxy(plain, fail_every=10**9, stream_error_every=10**9)
    runner, url = await start(proxy)
    try:
        run = await replay(plain, ReplayOptions(url=url, concurrency=4, progress=False))
    finally:
        await runner.cleanup()
    summary = summarize(run.results, run.duration_s, PRICES)
    assert summary["ok"] == len(plain)
    assert summary["tokens"]["estimated_requests"] == 0
    served = {s.entry.text: s.entry for s in proxy.served if s.entry is not None}
    assert len(served) > 1
    assert sum(r.completion_tokens for r in run.results) == sum(
        s.entry.completion_tokens for s in proxy.served if s.entry is not None
    )


async def test_timed_replay_never_sends_early() -> None:
    requests = TRACE[:30]
    proxy = MockProxy(TRACE)
    runner, url = await start(proxy)
    try:
        options = ReplayOptions(url=url, mode="timed", speed=8.0, progress=False)
        run = await replay(requests, options)
    finally:
        await runner.cleanup()
    assert len(run.results) == len(requests)
    for result, request in zip(run.results, requests, strict=True):
        assert request.t is not None
        assert result.started_s >= request.t / 8.0 - 0.005
        assert result.lag_s == pytest.approx(max(0.0, result.started_s - request.t / 8.0))
    assert summarize(run.results, run.duration_s)["send_lag_s"]["count"] == len(requests)


async def test_a_full_concurrency_limit_shows_as_send_lag() -> None:
    """One slot and a slow server: later requests leave late, and the summary says so."""
    release = asyncio.Event()
    proxy = MockProxy(TRACE, hang=release)
    runner, url = await start(proxy)
    try:
        options = ReplayOptions(url=url, mode="rate", rate=1000.0, concurrency=1, progress=False)
        task = asyncio.create_task(replay(TRACE[:3], options))
        await asyncio.sleep(0.2)
        release.set()
        run = await task
    finally:
        release.set()
        await runner.cleanup()
    assert [r.ok for r in run.results] == [True, True, True]
    assert run.results[1].lag_s >= 0.1  # the second waited for the first, held for >= 0.2 s


async def test_a_hanging_server_cannot_hold_the_run() -> None:
    release = asyncio.Event()
    proxy = MockProxy(TRACE, hang=release)
    runner, url = await start(proxy)
    try:
        options = ReplayOptions(url=url, concurrency=2, max_duration_s=0.5, progress=False)
        run = await replay(TRACE[:10], options)
    finally:
        release.set()
        await runner.cleanup()
    assert (len(run.results), run.cancelled, run.not_sent) == (0, 2, 8)


async def test_per_request_timeout_is_counted() -> None:
    release = asyncio.Event()
    proxy = MockProxy(TRACE, hang=release)
    runner, url = await start(proxy)
    try:
        options = ReplayOptions(url=url, concurrency=4, timeout_s=0.2, progress=False)
        run = await replay(TRACE[:4], options)
    finally:
        release.set()
        await runner.cleanup()
    assert summarize(run.results, run.duration_s)["errors"] == {"timeout": 4}


async def test_cli_replay_writes_summary_and_results(tmp_path: Path) -> None:
    proxy = MockProxy(TRACE)
    runner, url = await start(proxy)
    costs = tmp_path / "costs.json"
    costs.write_bytes(orjson.dumps({"small": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}))
    out, results = tmp_path / "summary.json", tmp_path / "results.jsonl"
    argv = [
        sys.executable, "-m", "proxy.bench.cli", "bench", "replay", "--trace", str(SMALL_TRACE),
        "--url", url, "--limit", "40", "--rate", "200", "--costs", str(costs), "--out", str(out),
        "--results", str(results), "--no-progress",
    ]  # fmt: skip
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    finally:
        await runner.cleanup()
    assert process.returncode == 0, stderr.decode()
    summary = orjson.loads(out.read_bytes())
    assert summary["requests"] == 40
    assert summary["cost"]["unpriced_engines"] in ([], ["large"])
    assert len(results.read_bytes().splitlines()) == 40
    assert b"cache hit rate" in stdout


def _answer_ctrl_c() -> None:
    """In the child, before it starts: Ctrl-C at its default. A shell runs a background job
    (``scripts/test &``, CI runners) with SIGINT ignored, every child inherits that, and Python
    then never turns SIGINT into KeyboardInterrupt: the test's Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_keeps_what_finished(tmp_path: Path) -> None:
    from tests.integration.conftest import wait_until  # here: this file also runs as a script

    release = asyncio.Event()
    proxy = MockProxy(TRACE, hang=release, hang_after=3, fail_every=1000)
    runner, url = await start(proxy)
    out, results = tmp_path / "summary.json", tmp_path / "results.jsonl"
    argv = [
        sys.executable, "-m", "proxy.bench.cli", "bench", "replay", "--trace", str(SMALL_TRACE),
        "--url", url, "--limit", "10", "--concurrency", "1", "--out", str(out),
        "--results", str(results), "--no-progress",
    ]  # fmt: skip
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_answer_ctrl_c,
        )
        # Three answered, the fourth hangs: now the operator presses Ctrl-C.
        await wait_until(lambda: proxy.received >= 4, timeout_s=60)
        assert proxy.received == 4
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        release.set()
        await runner.cleanup()
    assert process.returncode == 130, stderr.decode()
    summary = orjson.loads(out.read_bytes())
    assert (summary["requests"], summary["cancelled"], summary["not_sent"]) == (3, 1, 6)
    assert summary["interrupted"] is True
    assert len(results.read_bytes().splitlines()) == 3
    assert b"interrupted: 6 not sent, 1 cancelled" in stderr
    assert b"Traceback" not in stderr


def test_cli_refuses_remote_targets_and_bad_traces(tmp_path: Path) -> None:
    assert (
        bench_main(["bench", "replay", "--trace", str(SMALL_TRACE), "--url", "http://10.1.2.3"])
        == 2
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": {}}\n{"t": 1}\n')
    assert bench_main(["bench", "replay", "--trace", str(bad), "--url", "http://127.0.0.1:9"]) == 2


def test_compare_runs_each_strategy_fresh_and_writes_a_report(tmp_path: Path) -> None:
    """Two runs of the same cached strategy must match: each proxy starts with an empty cache."""
    serve = f"{sys.executable} {Path(__file__)} --config {{config}} --port {{port}}"
    configs = ["no_cache", "exact_cache", "exact_cache", "routed_semantic"]
    out = tmp_path / "out"
    code = bench_main(
        [
            "bench", "compare", "--trace", str(SMALL_TRACE), "--limit", "60",
            "--configs", *(str(STRATEGIES / f"{name}.yaml") for name in configs),
            "--out", str(out), "--serve-cmd", f"{serve} --trace {SMALL_TRACE}",
            "--concurrency", "1", "--no-progress", "--ready-timeout", "60",
        ]
    )  # fmt: skip
    assert code == 0
    results = orjson.loads((out / "compare.json").read_bytes())
    assert list(results) == ["no_cache", "exact_cache", "exact_cache-2", "routed_semantic"]
    assert results["no_cache"]["cache"]["counts"]["bypass"] == results["no_cache"]["ok"]
    first, second = results["exact_cache"], results["exact_cache-2"]
    assert first["cache"]["counts"]["hit-exact"] > 0
    assert first["cache"]["counts"] == second["cache"]["counts"]
    routed = results["routed_semantic"]
    assert set(routed["routes"]["counts"]) == {"small", "large"}
    # Roles come from all configs together, so the large-only strategies are scored too.
    for summary in results.values():
        assert summary["quality"]["engine_roles"] == {"large": "strong", "small": "weak"}
        assert summary["quality"]["routing"]["scored"] > 0
    assert results["no_cache"]["quality"]["routing"]["share_to_strong"] == 1.0
    assert results["no_cache"]["cost"]["per_1k_requests"] > routed["cost"]["per_1k_requests"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # cost, latency, hits, engines, quality
    assert "exact_cache-2" in html
    assert (out / "serve-routed_semantic.log").exists()


async def test_compare_interrupted_keeps_the_strategies_already_run(tmp_path: Path) -> None:
    from tests.integration.conftest import wait_until  # here: this file also runs as a script

    # The second strategy's proxy never becomes ready: Ctrl-C while the run waits for it.
    serve = (
        f"sh -c 'case {{config}} in *no_cache*) exec sleep 600;; esac; exec {sys.executable} "
        f"{Path(__file__)} --config {{config}} --port {{port}} --trace {SMALL_TRACE}'"
    )
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "proxy.bench.cli", "bench", "compare", "--trace", str(SMALL_TRACE),
        "--limit", "20", "--configs", str(STRATEGIES / "exact_cache.yaml"),
        str(STRATEGIES / "no_cache.yaml"), str(STRATEGIES / "routed_semantic.yaml"),
        "--out", str(out), "--serve-cmd", serve, "--no-progress", "--ready-timeout", "60",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_answer_ctrl_c,
    )
    try:
        await wait_until(lambda: (out / "serve-no_cache.log").exists(), timeout_s=60)
        await asyncio.sleep(0.5)  # it is waiting for /readyz now
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130, stderr.decode()
    results = orjson.loads((out / "compare.json").read_bytes())
    assert list(results) == ["exact_cache"]
    assert results["exact_cache"]["requests"] == 20
    html = (out / "report.html").read_text()
    assert "no_cache: interrupted (Ctrl-C) before its replay" in html
    assert b"Traceback" not in stderr


def _serve_main(argv: Sequence[str] | None = None) -> None:
    """Stand-in for ``frugal serve`` in the compare test: config-driven mock with a disk cache."""
    from proxy.settings import load_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--trace", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    assert settings.cache.data_dir is not None
    settings.cache.data_dir.mkdir(parents=True, exist_ok=True)
    proxy = MockProxy(
        load_trace(args.trace),
        engines=tuple(e.name for e in settings.engines),
        cache_enabled=settings.cache.enabled,
        semantic=settings.cache.semantic,
        store_file=settings.cache.data_dir / "mock-cache.json",
        fail_every=10**9,
        stream_error_every=10**9,
    )
    web.run_app(proxy.app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    _serve_main()
