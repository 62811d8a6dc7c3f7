"""TimeLimit: the engine calls' light timeout, with asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio

import pytest

from proxy.engines.timelimit import TimeLimit


async def test_a_block_within_its_limit_returns_normally() -> None:
    async with TimeLimit(5.0):
        await asyncio.sleep(0)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_block_past_its_limit_raises_timeout_and_leaves_the_task_uncancelled() -> None:
    with pytest.raises(TimeoutError):
        async with TimeLimit(0.01):
            await asyncio.sleep(10)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the task goes on working after the timeout


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    started = asyncio.Event()

    async def call() -> None:
        async with TimeLimit(10.0):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_error_inside_the_block_passes_through() -> None:
    with pytest.raises(KeyError):
        async with TimeLimit(10.0):
            raise KeyError("x")
