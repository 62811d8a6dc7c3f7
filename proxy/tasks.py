"""Stopping background tasks reliably.

On Python 3.11 a cancellation that lands while an ``asyncio.timeout`` (which aiohttp and
redis-py use for their socket timeouts) expires can surface as ``TimeoutError`` instead of
``CancelledError``. A background loop that retries on ``TimeoutError`` then swallows the cancel
and runs on, and whoever awaits it at shutdown waits forever (seen in the Redis follower under
CPU load). Loops check :func:`cancelling` where they catch timeouts; owners stop tasks with
:func:`stop`, which asks again until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def cancelling() -> bool:
    """Whether the running task has been asked to stop (even if the request surfaced as a
    timeout): a retry loop re-raises instead of retrying."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop(task: asyncio.Task[Any] | None, *, every_s: float = 0.5) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again if a request was lost."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()  # retrieved, so an ending failure is not reported as never retrieved
