"""Tier limits on a real redis-server shared by two independent clients (two "replicas")."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.observability.metrics import iter_samples
from proxy.policy.errors import BudgetExhausted, ConcurrencyLimitExceeded, RateLimitExceeded
from proxy.policy.limits import NANO, CounterBackendError, Limiter, to_nano
from proxy.policy.policyset import Principal
from proxy.policy.redis_limits import RedisCounters
from proxy.policy.schema import TierPolicy
from proxy.tasks import stop
from tests.integration.conftest import StartFake, StartProxy, wait_until
from tests.integration.test_policy_pipeline import (
    FREE_KEY,
    auth,
    chat,
    proxy_with,
    tier,
    write_policies,
)

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def policy_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away redis-server on a free port, data in a temp dir, no persistence."""
    folder: Path = tmp_path_factory.mktemp("policy-redis")
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def replicas(policy_redis_url: str) -> AsyncIterator[tuple[RedisCounters, RedisCounters]]:
    """Two independent clients (connection pools) on one Redis, emptied first.

    A long wait for a connection: these tests check the counters' atomicity across replicas.
    On a loaded host 200 clients could wait over the default 1 s for one of a pool's 8
    connections, and the outage policy then serves unchecked (a fresh-clone run overspent a
    budget by 1.3% so); that policy has tests of its own."""
    first = RedisCounters.from_url(policy_redis_url, timeout_s=30.0)
    second = RedisCounters.from_url(policy_redis_url, timeout_s=30.0)
    async with aioredis.Redis.from_url(policy_redis_url) as admin:
        await admin.flushdb()
    yield first, second
    await first.aclose()
    await second.aclose()


def _principal(tenant: str = "acme", **overrides: object) -> Principal:
    raw: dict[str, object] = {
        "tier": "free",
        "models": ["auto"],
        "limits": {"max_tokens": 512},
        "routing": {"strong_share": 0.1},
        "latency": {"ttft_p95_ms": 3000},
        "priority": 1,
    }
    raw.update(overrides)
    return Principal("free", tenant, TierPolicy.model_validate(raw), "sha256:" + "0" * 64)


DAY = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _limiter(backend: RedisCounters) -> Limiter:
    return Limiter(backend, wall_clock=lambda: DAY)


async def test_two_replicas_200_clients_never_overspend_exact_costs(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    """Every answer costs its full worst case: exactly floor(budget / cost) requests get through."""
    budget, cost = 1.00, 0.013
    principal = _principal(budget={"usd_per_day": budget})
    limiters = [_limiter(r) for r in replicas]
    granted = 0

    async def client(i: int) -> None:
        nonlocal granted
        limiter = limiters[i % 2]
        while True:
            try:
                async with limiter.reserve_budget(principal, cost) as spend:
                    await asyncio.sleep(0)  # the "engine call": let the others interleave
                    spend.record(cost)
                    granted += 1
            except BudgetExhausted:
                return

    await asyncio.gather(*(client(i) for i in range(200)))
    tier, _ = await limiters[0].budget_status(principal)
    assert granted == int(budget // cost) == 76
    assert tier.spent_usd == pytest.approx(76 * cost)
    assert tier.reserved_usd == 0


async def test_a_burst_shares_a_few_connections_instead_of_opening_one_each(
    policy_redis_url: str,
) -> None:
    """200 requests at once on one replica: they queue for the pool's connections (before:
    one connect each, some of which timed out on a loaded host and let requests through
    unchecked)."""
    counters = RedisCounters.from_url(policy_redis_url, max_connections=8)
    principal = _principal(limits={"max_tokens": 512, "requests_per_minute": 1_000_000})
    limiter = _limiter(counters)
    try:
        async with aioredis.Redis.from_url(policy_redis_url) as admin:
            before = len(await admin.client_list())

            async def one() -> None:
                async with limiter.admit(principal, prompt_tokens=10):
                    await asyncio.sleep(0)

            await asyncio.gather(*(one() for _ in range(200)))
            opened = len(await admin.client_list()) - before
        assert 1 <= opened <= 8
    finally:
        await counters.aclose()


async def test_two_replicas_200_clients_stop_within_one_request_of_the_ceiling(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    """Answers cost less than reserved: spend still never passes the ceiling, and the clients
    only stop once less than one request's worst case is left."""
    budget, worst = 2.00, 0.02
    principal = _principal(budget={"usd_per_day": budget, "usd_per_day_per_tenant": budget})
    limiters = [_limiter(r) for r in replicas]
    rng = random.Random(7)
    peak_spent = 0

    async def client(i: int) -> None:
        nonlocal peak_spent
        limiter = limiters[i % 2]
        while True:
            try:
                async with limiter.reserve_budget(principal, worst) as spend:
                    await asyncio.sleep(rng.random() / 1000)
                    spend.record(worst * rng.uniform(0.2, 1.0))
            except BudgetExhausted:
                tier, _ = await limiter.budget_status(principal)
                peak_spent = max(peak_spent, to_nano(tier.spent_usd))
                if tier.reserved_usd == 0:
                    return  # refused with nothing in flight: the budget really is spent
                await asyncio.sleep(0.001)

    await asyncio.gather(*(client(i) for i in range(200)))
    tier, tenant = await limiters[1].budget_status(principal)
    assert tier.spent_usd <= budget
    assert budget - tier.spent_usd < worst
    assert tenant.spent_usd == pytest.approx(tier.spent_usd)
    assert peak_spent <= budget * NANO


async def test_failed_call_releases_its_reservation(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    principal = _principal(budget={"usd_per_day": 0.05})
    limiter = _limiter(replicas[0])
    with pytest.raises(ConnectionError):
        async with limiter.reserve_budget(principal, 0.05):
            raise ConnectionError("engine died")
    tier, _ = await limiter.budget_status(principal)
    assert (tier.spent_usd, tier.reserved_usd) == (0, 0)
    async with limiter.reserve_budget(principal, 0.05) as spend:  # the whole budget is free again
        spend.record(0.05)
    with pytest.raises(BudgetExhausted):
        async with limiter.reserve_budget(principal, 0.01):
            pass


async def test_cancelled_request_releases_reservation_and_lease(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    principal = _principal(budget={"usd_per_day": 1.0}, limits={"max_tokens": 8, "concurrent": 1})
    limiter = _limiter(replicas[0])
    entered = asyncio.Event()

    async def request() -> None:
        async with (
            limiter.admit(principal, prompt_tokens=1),
            limiter.reserve_budget(principal, 1.0),
        ):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(request())
    await entered.wait()
    with pytest.raises(ConcurrencyLimitExceeded):  # the lease is held on the other replica too
        async with _limiter(replicas[1]).concurrency(principal):
            pass
    task.cancel()  # the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    tier, _ = await limiter.budget_status(principal)
    assert tier.reserved_usd == 0
    async with _limiter(replicas[1]).concurrency(principal):
        pass


async def test_crashed_replica_holdings_expire(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    """A replica that reserved and died never settles; the reservation TTL frees the money."""
    principal = _principal(budget={"usd_per_day": 1.0}, limits={"max_tokens": 8, "concurrent": 1})
    # Long enough that the survivor surely asks while they are held, even on a loaded machine.
    ttl_s = 1.5
    crashed = Limiter(
        replicas[0], wall_clock=lambda: DAY, reservation_ttl_s=ttl_s, lease_ttl_s=ttl_s
    )
    keys = crashed.budget_keys(principal, DAY.date())
    outcome = await replicas[0].reserve([(keys[0], NANO)], "dead-replica", NANO, ttl_s)
    assert outcome.granted
    assert await replicas[0].acquire_lease("lease-key", "dead", 1, ttl_s)
    survivor = _limiter(replicas[1])
    with pytest.raises(BudgetExhausted):
        async with survivor.reserve_budget(principal, 0.5):
            pass
    assert not await replicas[1].acquire_lease("lease-key", "alive", 1, 10)
    await asyncio.sleep(ttl_s + 0.1)
    async with survivor.reserve_budget(principal, 0.5):
        pass
    assert await replicas[1].acquire_lease("lease-key", "alive", 1, 10)


async def test_rate_limit_is_shared_and_says_when_to_retry(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    principal = _principal(limits={"max_tokens": 8, "requests_per_minute": 10})
    limiters = [_limiter(r) for r in replicas]
    for i in range(10):
        await limiters[i % 2].check_rate(principal, prompt_tokens=0)
    with pytest.raises(RateLimitExceeded) as refused:
        await limiters[0].check_rate(principal, prompt_tokens=0)
    # GCRA at 10/min frees one request every 6 s.
    assert refused.value.retry_after is not None
    assert 0 < refused.value.retry_after <= 6.0
    other_tenant = _principal("other", limits={"max_tokens": 8, "requests_per_minute": 10})
    await limiters[1].check_rate(other_tenant, prompt_tokens=0)


async def test_tokens_per_minute_counts_debt_after_the_answer(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    principal = _principal(limits={"max_tokens": 8, "tokens_per_minute": 1000})
    limiter = _limiter(replicas[0])
    async with limiter.admit(principal, prompt_tokens=100) as ticket:
        ticket.record_usage(prompt_tokens=100, completion_tokens=950)
    with pytest.raises(RateLimitExceeded) as refused:
        await _limiter(replicas[1]).check_rate(principal, prompt_tokens=10)
    assert refused.value.retry_after is not None
    assert refused.value.retry_after > 0


async def test_refund_of_a_high_prompt_estimate(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    principal = _principal(limits={"max_tokens": 8, "tokens_per_minute": 1000})
    limiter = _limiter(replicas[0])
    async with limiter.admit(principal, prompt_tokens=900) as ticket:
        ticket.record_usage(prompt_tokens=100, completion_tokens=50)
    await _limiter(replicas[1]).check_rate(principal, prompt_tokens=800)


async def test_unreachable_redis_is_a_backend_error_and_fails_open() -> None:
    down = RedisCounters.from_url(f"redis://127.0.0.1:{_free_port()}/0")
    try:
        with pytest.raises(CounterBackendError):
            await down.rate("k", 1, 10)
        principal = _principal(
            limits={"max_tokens": 8, "requests_per_minute": 1, "concurrent": 1},
            budget={"usd_per_day": 0.0},
        )
        async with _limiter(down).admit(principal, prompt_tokens=5) as ticket:
            async with ticket.budget(1.0) as spend:
                spend.record(1.0)
            ticket.record_usage(5, 5)
    finally:
        await down.aclose()


async def test_a_limits_outage_is_counted_on_metrics(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """(before: only logged; /metrics showed nothing of a fleet serving unchecked)"""
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(
        start_fake,
        start_proxy,
        folder,
        redis={"url": f"redis://127.0.0.1:{_free_port()}/0"},
        limits={"backend": "redis"},
    )
    resp = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
    assert resp.status == 200  # fails open (the default)
    assert (await proxy.client.get("/metrics")).status == 200
    errors = {
        sample.labels["op"]: sample.value
        for sample in iter_samples(proxy.services.metrics.registry)
        if sample.name == "frugal_limits_errors_total"
    }
    assert errors.get("check", 0) >= 1 and errors.get("release", 0) >= 1


async def test_a_hung_redis_costs_one_timeout_then_checks_fail_fast() -> None:
    """(before: every counter step of every request waited its own timeout: 7.5 s a request)"""
    received = bytearray()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # accepts, reads, never replies: a stopped (SIGSTOP) Redis
        while data := await reader.read(65536):
            received.extend(data)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = RedisCounters.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        with pytest.raises(CounterBackendError):
            await hung.rate("k", 1, 10)
        seen = len(received)
        for _ in range(3):  # within the back-off, checks are not even sent
            with pytest.raises(CounterBackendError):
                await hung.acquire_lease("c", "id", 1, 60.0)
            with pytest.raises(CounterBackendError):
                await hung.reserve([("b", 100)], "r", 1, 60.0)
        assert len(received) == seen
        # ...but a release and a settle are always tried: skipped after a passing hiccup, they
        # would hold a slot, or a reservation, until its TTL
        # (each opens a connection, whose handshake is all the hung server ever gets)
        with pytest.raises(CounterBackendError):
            await hung.release_lease("c", "id")
        assert len(received) > seen
        seen = len(received)
        with pytest.raises(CounterBackendError):
            await hung.settle(["b"], "r", 1)
        assert len(received) > seen
    finally:
        await hung.aclose()
        server.close()


async def test_a_hung_redis_does_not_hold_answers_for_their_releases() -> None:
    """Once a check has failed, a request's release and settle are still sent, but its answer
    does not wait for them. (Before: against a stopped Redis every request waited out a lease
    release's timeout and a settle's after its answer, 2 s each, for as long as it lasted.)"""
    received = bytearray()
    connections: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while data := await reader.read(65536):
            received.extend(data)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # a timeout far longer than the test may wait: a release awaited would show as a hang
    timeout_s = 120.0
    hung = RedisCounters.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=timeout_s)
    limiter = _limiter(hung)
    principal = _principal(limits={"max_tokens": 8, "concurrent": 2}, budget={"usd_per_day": 1.0})
    hung._backoff.until = time.monotonic() + 3600  # a check timed out a moment ago
    try:
        async with asyncio.timeout(timeout_s / 4):
            for _ in range(3):
                async with (
                    limiter.admit(principal, prompt_tokens=5) as ticket,
                    ticket.budget(0.01) as spend,
                ):
                    spend.record(0.01)
        await wait_until(lambda: bool(received), timeout_s=30)  # ...and were sent all the same
        assert received
    finally:
        for writer in connections:  # the server dies: the releases still waiting fail now
            writer.close()
        server.close()
        await limiter.drain()
        await hung.aclose()


async def test_holdings_are_renewed_while_held_and_a_crashed_replicas_come_free(
    replicas: tuple[RedisCounters, RedisCounters],
) -> None:
    """A request that outlasts the TTLs keeps its concurrency slot and its budget reservation; a
    replica that dies holding them frees both within the TTLs. (Before: nothing renewed them, so
    the app's TTLs had to outlast any request, 15 minutes, and a crashed replica's slots and
    reserved money locked its tenants out that long.)"""
    ttl_s = 2.0
    principal = _principal(limits={"max_tokens": 8, "concurrent": 1}, budget={"usd_per_day": 1.0})
    holder = Limiter(
        replicas[0], wall_clock=lambda: DAY, lease_ttl_s=ttl_s, reservation_ttl_s=ttl_s
    )
    other = _limiter(replicas[1])
    renewing = asyncio.create_task(holder.keep_holdings())
    entered, finish = asyncio.Event(), asyncio.Event()

    async def long_request() -> None:
        async with holder.concurrency(principal), holder.reserve_budget(principal, 1.0):
            entered.set()
            await finish.wait()

    async def slot_free() -> bool:
        try:
            async with other.concurrency(principal):
                return True
        except ConcurrencyLimitExceeded:
            return False

    async def money_free() -> bool:
        try:
            async with other.reserve_budget(principal, 0.5):
                return True
        except BudgetExhausted:
            return False

    request = asyncio.create_task(long_request())
    try:
        await entered.wait()
        await asyncio.sleep(ttl_s * 2.5)  # well past the TTLs: renewed meanwhile
        assert not await slot_free()
        assert not await money_free()
        await stop(renewing)  # the holder crashes: no renewal, no release
        await wait_until(slot_free, timeout_s=60)
        await wait_until(money_free, timeout_s=60)
        assert await slot_free() and await money_free()
    finally:
        await stop(renewing)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
