"""StreamCutter: the relays it ends, at a stop and past their request's deadline."""

from __future__ import annotations

import asyncio

from proxy.stopping import OVERDUE_GRACE_S, StreamCutter, is_stop


async def _relay(cutter: StreamCutter, deadline: float, entered: asyncio.Event) -> None:
    with cutter.streaming(deadline):
        entered.set()
        await asyncio.Event().wait()  # a write to a client that does not read


async def test_only_the_relays_well_past_their_deadline_are_cut() -> None:
    cutter = StreamCutter()
    marks = [asyncio.Event() for _ in range(3)]
    # deadlines at 10 (overdue at 12), within its grace at 12, none
    deadlines = (10.0, 12.0 - OVERDUE_GRACE_S / 2, float("inf"))
    late, graced, endless = (
        asyncio.create_task(_relay(cutter, deadline, mark))
        for deadline, mark in zip(deadlines, marks, strict=True)
    )
    for mark in marks:
        await mark.wait()
    cutter.cut_overdue(12.0)
    await asyncio.sleep(0)
    assert late.cancelled() or late.cancelling()
    assert not graced.done() and not endless.done()
    cutter.cut()  # a stop ends the rest, with its reason
    for task in (late, graced, endless):
        try:
            await task
        except asyncio.CancelledError as exc:
            assert is_stop(exc) == (task is not late)
    cutter.cut_overdue(1e9)  # the ended relays left the cutter: nothing to cut
