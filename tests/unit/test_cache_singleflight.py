"""Single-flight: one upstream call per key, streamed followers, failed leaders."""

from __future__ import annotations

import asyncio

import pytest

from proxy.cache.singleflight import Follower, Leader, LeaderFailed, SingleFlight


async def test_concurrent_misses_make_one_call() -> None:
    flights: SingleFlight[bytes, str] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def work() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "answer"

    tasks = [asyncio.create_task(flights.run("k", work)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert [r for r, _ in results] == ["answer"] * 10
    assert sum(1 for _, shared in results if not shared) == 1
    assert len(flights) == 0


async def test_different_keys_do_not_share() -> None:
    flights: SingleFlight[bytes, str] = SingleFlight()
    a, b = flights.join("a"), flights.join("b")
    assert isinstance(a, Leader) and isinstance(b, Leader)


async def test_streamed_followers_get_every_chunk_from_the_start() -> None:
    flights: SingleFlight[bytes, bytes] = SingleFlight()
    leader = flights.join("k")
    assert isinstance(leader, Leader)
    leader.publish(b"1")
    leader.publish(b"2")
    early = flights.join("k")
    assert isinstance(early, Follower) and early.streaming

    async def collect(follower: Follower[bytes, bytes]) -> list[bytes]:
        return [chunk async for chunk in follower.chunks()]

    early_task = asyncio.create_task(collect(early))
    await asyncio.sleep(0)
    leader.publish(b"3")
    late = flights.join("k")
    assert isinstance(late, Follower)
    late_task = asyncio.create_task(collect(late))
    await asyncio.sleep(0)
    leader.publish(b"4")
    leader.finish(b"1234")
    assert await early_task == [b"1", b"2", b"3", b"4"]
    assert await late_task == [b"1", b"2", b"3", b"4"]
    assert await late.result() == b"1234"
    assert leader.followers == 2
    # the key is free again: the next request leads a new flight
    assert isinstance(flights.join("k"), Leader)


async def test_failed_leader_releases_followers_with_the_error() -> None:
    flights: SingleFlight[bytes, str] = SingleFlight()
    leader = flights.join("k")
    assert isinstance(leader, Leader)
    follower = flights.join("k")
    assert isinstance(follower, Follower)
    waiting = asyncio.create_task(follower.result())
    streaming = asyncio.create_task(_drain(follower))

    with pytest.raises(ValueError):
        async with leader:
            leader.publish(b"partial")
            raise ValueError("upstream 500")
    with pytest.raises(LeaderFailed) as failure:
        await waiting
    assert isinstance(failure.value.__cause__, ValueError)
    with pytest.raises(LeaderFailed):
        await streaming
    assert len(flights) == 0


async def _drain(follower: Follower[bytes, str]) -> list[bytes]:
    return [chunk async for chunk in follower.chunks()]


async def test_cancelled_leader_fails_the_flight() -> None:
    flights: SingleFlight[bytes, str] = SingleFlight()
    started = asyncio.Event()

    async def lead() -> None:
        leader = flights.join("k")
        assert isinstance(leader, Leader)
        async with leader:
            started.set()
            await asyncio.Event().wait()  # the client went away mid-call

    task = asyncio.create_task(lead())
    await started.wait()
    follower = flights.join("k")
    assert isinstance(follower, Follower)
    waiting = asyncio.create_task(follower.result())
    task.cancel()
    with pytest.raises(LeaderFailed):
        await waiting


async def test_followers_retry_after_a_failed_leader() -> None:
    flights: SingleFlight[bytes, str] = SingleFlight()
    attempts = 0
    gates = [asyncio.Event(), asyncio.Event()]

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        mine = attempts
        await gates[mine - 1].wait()
        if mine == 1:
            raise RuntimeError("first call fails")
        return "second"

    first = asyncio.create_task(flights.run("k", flaky))
    await asyncio.sleep(0)
    others = [asyncio.create_task(flights.run("k", flaky)) for _ in range(3)]
    await asyncio.sleep(0)
    gates[0].set()
    with pytest.raises(RuntimeError):
        await first
    for _ in range(5):
        await asyncio.sleep(0)  # let the followers see the failure and regroup
    gates[1].set()
    results = await asyncio.gather(*others)
    assert [r for r, _ in results] == ["second"] * 3
    assert attempts == 2  # one retry leader, the rest followed it


async def test_follower_cancellation_does_not_disturb_others() -> None:
    flights: SingleFlight[bytes, str] = SingleFlight()
    leader = flights.join("k")
    assert isinstance(leader, Leader)
    a, b = flights.join("k"), flights.join("k")
    assert isinstance(a, Follower) and isinstance(b, Follower)
    ta, tb = asyncio.create_task(a.result()), asyncio.create_task(b.result())
    await asyncio.sleep(0)
    ta.cancel()
    await asyncio.sleep(0)
    leader.finish("done")
    assert await tb == "done"
    assert ta.cancelled()


async def test_a_handed_off_flight_outlives_its_leaders_block() -> None:
    flights: SingleFlight[bytes, bytes] = SingleFlight()
    leader = flights.join("k", streaming=True)
    assert isinstance(leader, Leader)
    follower = flights.join("k")
    assert isinstance(follower, Follower)
    with pytest.raises(asyncio.CancelledError):
        async with leader:
            leader.publish(b"a")
            leader.hand_off()  # a background task reads the rest for the follower
            raise asyncio.CancelledError  # the leader's own client went away
    result = asyncio.ensure_future(follower.result())
    await asyncio.sleep(0)
    assert not result.done()  # leaving the block did not fail the flight
    leader.publish(b"b")
    leader.finish(b"ab")
    assert await result == b"ab"
    assert [c async for c in follower.chunks()] == [b"a", b"b"]
