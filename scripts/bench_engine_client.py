"""CPU per engine call: aiohttp's ClientSession against the lean HTTP/1.1 client.

    .venv/bin/python scripts/bench_engine_client.py
    .venv/bin/python scripts/bench_engine_client.py --calls 8000 --concurrency 32 --rounds 5

Both go through ``AiohttpTransport`` (``lean=False``: every call on the session, as before
proxy/engines/http1.py; ``lean=True``: non-streamed calls on the lean client), posting the overhead
benchmark's chat body to a zero-delay fake engine started here, with ``--concurrency`` calls in
flight. Printed: this process's CPU time per call (the engine runs in its own process), each
round, and the minimum over rounds (alternating, so both see the same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench_overhead as bench  # noqa: E402  (the same body and fake engine as the benchmark)

from proxy.engines.client import AiohttpTransport, UpstreamRequest  # noqa: E402


async def _measure(url: str, *, lean: bool, calls: int, concurrency: int) -> float:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), auto_decompress=False
    )
    transport = AiohttpTransport(session, lean=lean)
    body = json.dumps(bench.BODY).encode()
    headers = {"Content-Type": "application/json", "x-request-id": "bench"}

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await transport(UpstreamRequest(url, body, headers, 5.0))
            await response.read()
            response.release()

    try:
        await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # connections, warm-up
        start = time.process_time()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        return (time.process_time() - start) * 1e6 / (calls // concurrency * concurrency)
    finally:
        await transport.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = bench.free_port()
    command = [sys.executable, "-m", "proxy.engines.fake", "--port", str(port)]
    engine = subprocess.Popen(
        [*command, "--model", bench.MODEL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        bench.wait_ready(bench.Target("direct", port, None), 30, None)
        url = f"http://127.0.0.1:{port}{bench.CHAT_PATH}"
        found: dict[str, list[float]] = {"aiohttp": [], "lean": []}
        for index in range(args.rounds):
            for name in ("aiohttp", "lean") if index % 2 == 0 else ("lean", "aiohttp"):
                us = uvloop.run(
                    _measure(
                        url, lean=name == "lean", calls=args.calls, concurrency=args.concurrency
                    )
                )
                found[name].append(us)
                print(f"round {index + 1} {name}: {us:.1f} µs CPU per call", flush=True)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        for name, values in found.items():
            print(
                f"{name:7}: {min(values):.1f} µs CPU per call (min of {len(values)}); load {load}"
            )
    finally:
        bench.stop(engine)


if __name__ == "__main__":
    main()
