"""Health and load of each replica, polled from vLLM's ``/health`` and ``/metrics``.

The Prometheus text parser is pure; the poller is the thin I/O shell around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import structlog

from proxy.engines.pool import Engine, Replica, ReplicaLoad
from proxy.tasks import cancelling

log = structlog.get_logger("frugal.health")

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
# vLLM renamed the KV-cache gauge; read whichever the engine exports.
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_vllm_metrics(text: str) -> ReplicaLoad:
    """Requests running and waiting, and KV-cache use (0..1), from vLLM's Prometheus text.

    Series with several label sets (several models on one server) are summed; KV use takes the
    maximum, since any full cache blocks new work.
    """
    running = waiting = kv = 0.0
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        elif space >= 0:
            name, rest = line[:space], line[space:]
        else:
            continue
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if name == _RUNNING:
            running += value
        elif name == _WAITING:
            waiting += value
        elif name in _KV_USAGE:
            kv = max(kv, value)
    return ReplicaLoad(running=running, waiting=waiting, kv_usage=kv)


ReplicaObserver = Callable[[Engine, Replica], None]
AfterPoll = Callable[[], Awaitable[None]]


async def poll_replica(
    session: aiohttp.ClientSession, replica: Replica, timeout_s: float, unhealthy_after: int = 1
) -> None:
    """Poll one replica's /health (and, when healthy, its /metrics for load).

    A replica known to be healthy is marked down only after ``unhealthy_after`` failed polls in a
    row: a CPU-saturated engine can miss one poll's deadline while it serves fine, and marking it
    down would refuse requests it could take. A replica never seen healthy goes down at once.
    A failed /metrics read keeps the last load figures; it says nothing about health.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    was = replica.healthy
    try:
        async with session.get(replica.url + "/health", timeout=timeout) as resp:
            ok = resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if cancelling():
            raise asyncio.CancelledError from exc  # a stop that surfaced as a timeout
        ok = False
    if ok:
        replica.failed_polls = 0
        # (a body that is not text, too: raised out of here, it would end the whole poller)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
            async with session.get(replica.url + "/metrics", timeout=timeout) as resp:
                if resp.status == 200:
                    replica.load = parse_vllm_metrics(await resp.text())
    else:
        replica.failed_polls += 1
    healthy = ok or (was is True and replica.failed_polls < unhealthy_after)
    replica.healthy = healthy
    if ok and was is False:
        # A restart may be a redeploy: what it serves is unknown until it is asked again (an
        # engine with version: auto keeps it out of rotation until then).
        replica.version = None
    if ok and was is False and replica.breaker.state == "open":
        # It was down and is back: let the next request be the half-open probe right away. Not
        # when it stayed healthy: its breaker opened on failed completions that /health does
        # not see, and the open period must run its course.
        replica.breaker.opened_at = time.monotonic() - replica.breaker.open_s
    if was is not None and was != healthy:
        log.warning("replica health changed", replica=replica.url, healthy=healthy)


async def poll_forever(
    session: aiohttp.ClientSession,
    engines: Sequence[Engine],
    *,
    interval_s: float,
    timeout_s: float,
    unhealthy_after: int = 1,
    observe: ReplicaObserver | None = None,
    after: AfterPoll | None = None,
) -> None:
    """Poll every ``interval_s``; ``after`` runs after each round (it sees its results)."""
    while True:
        await poll_once(
            session, engines, timeout_s=timeout_s, unhealthy_after=unhealthy_after, observe=observe
        )
        if after is not None:
            await after()
        await asyncio.sleep(interval_s)


async def poll_once(
    session: aiohttp.ClientSession,
    engines: Sequence[Engine],
    *,
    timeout_s: float,
    unhealthy_after: int = 1,
    observe: ReplicaObserver | None = None,
) -> None:
    pairs = [(e, r) for e in engines for r in e.replicas]
    await asyncio.gather(*(poll_replica(session, r, timeout_s, unhealthy_after) for _, r in pairs))
    if observe is not None:
        for engine, replica in pairs:
            observe(engine, replica)
