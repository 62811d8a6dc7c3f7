"""What this host gives the proxy, to read the absolute benchmark figures against.

    .venv/bin/python scripts/host_profile.py [--seconds 5]

The cache issue's exact-hit and semantic targets are absolute times, and they were met on one
kind of host (AMD EPYC with AVX-512 BF16). This prints, for the host it runs on:

* the CPU's matrix features: native bfloat16 (what ``embeddings.precision: auto`` uses), VNNI
  (int8), AVX-512;
* the cost of a system call and of reading the clock (a VM with expensive exits pays more per
  request for every socket read and write);
* the floor for an answer from memory: wrk at one connection posting the cache benchmark's body
  to the smallest aiohttp server that reads the body and returns a fixed chat completion (what an
  exact hit does, without the proxy's own work);
* the encoder alone: one MiniLM pass over a short question, in the precision ``auto`` picks
  (or each of ``--precisions``), one torch thread (the proxy's own packed encoder, with the
  verifier's tuned layers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANSWER = (
    b'{"id":"cmpl-1","object":"chat.completion","created":1,"model":"bench-model",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,'
    b'"total_tokens":15}}'
)
SERVER = """
import sys
from aiohttp import web
ANSWER = {answer!r}
async def answer(request):
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")
app = web.Application()
app.router.add_post("/v1/chat/completions", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.MULTILINE)
    number = re.search(r"^model\s*:\s*(\d+)$", text, re.MULTILINE)
    parts = [model.group(1) if model else "unknown"]
    if family and number:
        parts.append(f"family {family.group(1)} model {number.group(1)}")
    return ", ".join(parts)


def ns_per_call(statement: str, setup: str) -> float:
    timer = timeit.Timer(statement, setup)
    loops, _ = timer.autorange()
    return min(timer.repeat(5, loops)) / loops * 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answer_floor(seconds: int) -> dict[str, float]:
    """wrk at one connection against the smallest aiohttp server that answers from memory."""
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        script = Path(work) / "server.py"
        script.write_text(SERVER.format(answer=ANSWER))
        server = subprocess.Popen([sys.executable, str(script), str(port)])
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)
            body = {
                "model": "bench-model",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 16,
            }
            lua = Path(work) / "post.lua"
            lua.write_text(
                'wrk.method = "POST"\n'
                f"wrk.body = '{json.dumps(body)}'\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
                "done = function(summary, latency, requests)\n"
                '  io.write(string.format("P50 %f\\nP99 %f\\n", latency:percentile(50), '
                "latency:percentile(99)))\nend\n"
            )
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            out = subprocess.run(
                ["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", str(lua), url],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        finally:
            server.terminate()
            server.wait()
    values = dict(line.split() for line in out.splitlines() if line.startswith(("P50", "P99")))
    return {"p50_ms": float(values["P50"]) / 1000, "p99_ms": float(values["P99"]) / 1000}


def encoder_ms(precision: str) -> tuple[str, float]:
    """Wall milliseconds for one lone short question through the proxy's encoder (median)."""
    import torch

    from proxy.cache import verifier
    from proxy.cache.packed_encoder import PackedEncoder, resolve_precision

    torch.set_num_threads(1)
    reference = verifier.MiniLMEncoder.load(
        tuned_layers=verifier.ARTIFACT_DIR / verifier.LAYERS_FILE
    )
    compute = resolve_precision(precision)  # type: ignore[arg-type]
    encoder = PackedEncoder(reference, precision=compute)
    text = ["How do I convert a list to a set in Python?"]
    for _ in range(5):
        encoder.encode(text)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        encoder.encode(text)
        times.append(time.perf_counter() - start)
    return compute, sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk's run for the floor")
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder's timing")
    parser.add_argument(
        "--precisions",
        default="auto",
        help="comma-separated embeddings.precision values to time (e.g. float32,bfloat16,int8)",
    )
    args = parser.parse_args()
    from proxy.cpu import cpu_flags, has_vnni, native_bfloat16

    flags = cpu_flags()
    yes = {True: "yes", False: "no"}
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs")
    print(
        f"matrix features: AVX-512 {yes['avx512f' in flags]}, "
        f"bfloat16 {yes[native_bfloat16(flags)]}, VNNI {yes[has_vnni(flags)]}, "
        f"AMX {yes['amx_tile' in flags]}"
    )
    syscall = ns_per_call("getppid()", "from os import getppid")
    clock = ns_per_call("perf_counter()", "from time import perf_counter")
    print(f"system call (getppid): {syscall:.0f} ns; clock read (perf_counter): {clock:.0f} ns")
    floor = answer_floor(args.seconds)
    print(
        "answer from memory, smallest aiohttp server, wrk c=1: "
        f"p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms"
    )
    if not args.no_encoder:
        for asked in args.precisions.split(","):
            compute, ms = encoder_ms(asked.strip())
            print(f"encoder, one short question alone ({compute}, 1 thread): {ms:.1f} ms median")


if __name__ == "__main__":
    main()
