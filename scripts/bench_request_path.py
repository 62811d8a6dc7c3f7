"""CPU per request of Frugal's own request path, in process, with no sockets.

    .venv/bin/python scripts/bench_request_path.py                 # frugal and full
    .venv/bin/python scripts/bench_request_path.py --config full --requests 4000 --chunks 9
    .venv/bin/python scripts/bench_request_path.py --config cache  # or routing, policy: one feature
    .venv/bin/python scripts/bench_request_path.py --compare /path/to/other/checkout

The app is built from scripts/bench_overhead.py's configurations (``frugal``, ``frugal-cache``,
``frugal-routing``, ``frugal-policy``, ``frugal-full``: same engines, cache, routing and policy)
with a stub transport that answers at once, so what is timed is the handler from the parsed
request to the response written (by aiohttp's own writer, to a socket stub that drops the
bytes), plus the work deferred to the next turn of the loop (metrics, access line): everything
Frugal adds over the thin relay except aiohttp's request parsing, the engine client's socket and
the system calls. The access line goes to /dev/null.

Figures are process CPU time per request, the minimum over ``--chunks`` chunks (the minimum is the
least disturbed by other jobs on a shared machine): all of it, and the part spent before the
answer's last byte was written ("to the answer": what a request waits for at one connection;
the rest runs after it is sent). ``--compare DIR`` runs the same measurement
with another checkout ``DIR`` on the import path, alternating runs of the two (``--rounds``), for
A/B checks of a change. What it leaves out (aiohttp's server and the engine client) is measured
by scripts/bench_overhead.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench_overhead  # noqa: E402  (a sibling script: its configs are the ones measured)

ANSWER = (
    b'{"id":"cmpl-1","object":"chat.completion","created":1,"model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,'
    b'"total_tokens":15}}'
)


class _StubResponse:
    status = 200
    headers: Mapping[str, str] = {"Content-Type": "application/json"}

    async def read(self) -> bytes:
        return ANSWER

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield ANSWER

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks()

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _stub_transport(request: Any) -> _StubResponse:
    return _StubResponse()


def _settings(config: str, work: Path) -> tuple[Any, Any]:
    """The benchmark's own config for ``config`` (engines on an unused port), and its target."""
    from proxy.settings import load_settings

    bench = bench_overhead

    name = "frugal" if config == "frugal" else f"frugal-{config}"
    target = bench.build_targets([name], 9, work, None)[0]
    path = work / f"{name}.yaml"
    # One health poll at start (it fails: there is no engine), then none while measuring.
    text = path.read_text().replace("interval_s: 2.0", "interval_s: 86400")
    # No engine to ask for an auto version: a fixed one, so no start-up resolution (and the
    # cache purge that follows it) runs beside the measurement.
    text = text.replace("  - name: small\n", "  - name: small\n    version: bench-small-1\n")
    path.write_text(text)
    settings = load_settings(path)
    return settings, target


async def _measure(
    config: str, requests: int, chunks: int, sink: IO[bytes]
) -> tuple[list[float], list[float]]:
    from aiohttp import web
    from aiohttp.http_writer import StreamWriter
    from aiohttp.streams import StreamReader
    from aiohttp.test_utils import make_mocked_request

    from proxy import pipeline
    from proxy.app import SERVICES, create_app

    work = Path(tempfile.mkdtemp(prefix="frugal-path-"))
    settings, target = _settings(config, work)
    app = create_app(settings, transport=_stub_transport)
    runner = web.AppRunner(app)
    await runner.setup()
    services = app[SERVICES]
    replicas = [r for engine in services.engines for r in engine.replicas]
    for _ in range(100):  # until the start-up health poll has failed (there is no engine) ...
        if all(r.healthy is not None for r in replicas):
            break
        await asyncio.sleep(0.05)
    for engine in services.engines:  # ... then mark the replicas up
        for replica in engine.replicas:
            replica.healthy = True
    if services.access_log is not None:
        services.access_log._stream = sink  # the lines are made and written, to nowhere
    headers = {"Content-Type": "application/json", **target.headers}
    body = dict(json.loads(json.dumps(bench_overhead.BODY)))
    body["model"] = target.model
    protocol = _Protocol()
    loop = asyncio.get_running_loop()

    def make(i: int) -> web.Request:
        payload = dict(body)
        text = f"{body['messages'][0]['content']} {i}"  # unique: a cache in the path misses
        payload["messages"] = [{"role": "user", "content": text}]
        raw = json.dumps(payload).encode()
        reader = StreamReader(protocol, 2**16, loop=loop)  # type: ignore[arg-type]
        reader.feed_data(raw)
        reader.feed_eof()
        return make_mocked_request(
            "POST",
            "/v1/chat/completions",
            headers={**headers, "Content-Length": str(len(raw))},
            payload=reader,
            app=app,
            writer=StreamWriter(protocol, loop),  # type: ignore[arg-type]
        )

    results: list[float] = []
    to_answer: list[float] = []
    counter = 0
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    for _ in range(chunks + 1):  # the first chunk warms up
        # Mocked requests are costly to make: made before the clock starts.
        batch = [make(counter + i) for i in range(requests)]
        counter += requests
        start = time.process_time()
        waited = 0.0
        for request in batch:
            began = time.process_time()
            response = await pipeline.complete(request, "chat", services)
            # as aiohttp does with what a handler returns (nothing more for one already sent)
            await response.prepare(request)
            await response.write_eof()
            waited += protocol.transport.last_write - began
            await asyncio.sleep(0)  # let the deferred finish run
            if response.status != 200:
                raise SystemExit(f"status {response.status} from the request path")
        results.append((time.process_time() - start) * 1e6 / requests)
        to_answer.append(waited * 1e6 / requests)
        del batch
    await runner.cleanup()
    return results[1:], to_answer[1:]


class _Transport:
    """A socket that takes every write and drops it, noting the CPU clock of the last."""

    last_write = 0.0

    def write(self, data: bytes) -> None:
        self.last_write = time.process_time()

    def writelines(self, data: Any) -> None:
        self.last_write = time.process_time()

    def is_closing(self) -> bool:
        return False


class _Protocol:
    """Enough of a protocol for a StreamReader fed all at once and a StreamWriter."""

    _reading_paused = False
    _paused = False  # (writing: never)

    def __init__(self) -> None:
        self.transport = _Transport()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def _child(config: str, requests: int, chunks: int) -> tuple[list[float], list[float]]:
    import uvloop

    with open(os.devnull, "wb") as sink:
        return uvloop.run(_measure(config, requests, chunks, sink))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", choices=("frugal", "cache", "routing", "policy", "full", "both"), default="both"
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per chunk")
    parser.add_argument("--chunks", type=int, default=7)
    parser.add_argument("--compare", type=Path, help="another checkout to A/B against")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs with --compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = ["frugal", "full"] if args.config == "both" else [args.config]
    if args.child:
        print(json.dumps(_child(configs[0], args.requests, args.chunks)))
        return
    trees = {"this": REPO}
    if args.compare is not None:
        trees["other"] = args.compare.resolve()
    for config in configs:
        found: dict[str, list[float]] = {name: [] for name in trees}
        answered: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.rounds if args.compare else 1):
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                command = [sys.executable, str(Path(__file__).resolve()), "--child"]
                command += ["--config", config, "--requests", str(args.requests)]
                command += ["--chunks", str(args.chunks)]
                done = subprocess.run(
                    command, env=env, capture_output=True, text=True, check=False, cwd=tree
                )
                if done.returncode != 0:
                    raise SystemExit(f"{name} ({tree}) failed:\n{done.stderr[-3000:]}")
                total, to_answer = json.loads(done.stdout.strip().splitlines()[-1])
                found[name] += total
                answered[name] += to_answer
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        for name, values in found.items():
            print(
                f"{config:6} {name:5} ({trees[name]}): {min(values):.1f} µs/request CPU"
                f" (min of {len(values)} chunks; median {sorted(values)[len(values) // 2]:.1f}),"
                f" {min(answered[name]):.1f} to the answer; load {load}",
                flush=True,
            )


if __name__ == "__main__":
    main()
