"""Stopping background tasks whose cancellation surfaced as a timeout."""

from __future__ import annotations

import asyncio

from proxy.tasks import cancelling, stop


async def _retry_loop(check: bool, rounds: list[int]) -> None:
    """A background loop that retries on timeouts; a cancel arrives looking like one (as when
    it lands while an ``asyncio.timeout`` expires on Python 3.11)."""
    while len(rounds) < 2:  # a bound, so the test without the check ends
        rounds.append(1)
        try:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise TimeoutError from None  # the lost cancellation
        except TimeoutError:
            if check and cancelling():
                raise asyncio.CancelledError from None


async def test_a_loop_that_checks_cancelling_ends_on_a_cancel_that_looked_like_a_timeout() -> None:
    rounds: list[int] = []
    task = asyncio.create_task(_retry_loop(True, rounds))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.cancelled()


async def test_without_the_check_the_same_loop_swallows_the_cancel() -> None:
    rounds: list[int] = []
    task = asyncio.create_task(_retry_loop(False, rounds))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=0.05)
    assert not task.done() and len(rounds) == 2  # it went round again
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done() and not task.cancelled()  # both cancels lost: it ended on its own bound


async def test_stop_asks_again_until_a_task_that_lost_the_first_request_ends() -> None:
    lost = asyncio.Event()

    async def loses_the_first_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            lost.set()  # swallowed once, e.g. converted to a timeout and retried
        await asyncio.sleep(10)

    task = asyncio.create_task(loses_the_first_cancel())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop(task, every_s=0.01), timeout=2)
    assert lost.is_set() and task.cancelled()


async def test_stop_of_nothing_or_a_finished_task_returns() -> None:
    await stop(None)

    async def fails() -> None:
        raise ValueError("done badly")

    task = asyncio.create_task(fails())
    await asyncio.wait({task})
    await stop(task)  # the failure is retrieved, not raised
