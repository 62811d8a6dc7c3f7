"""Ending the streams still running when the proxy stops, with an error event its clients read.

On SIGTERM aiohttp waits ``server.shutdown_timeout_s`` (split in two waits, see proxy/server.py)
for requests in flight, then cancels their handlers and closes their connections in one step:
a handler cancelled then can no longer write, so a stream still going would just stop, with
neither an error event nor ``[DONE]``. So the app's shutdown signal arms a timer a little before
that deadline, and the streams still running are cancelled with :data:`STOP_REASON` while their
connections are open: the relay sees the reason, writes the error event and ``[DONE]``, and ends
its response cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

STOP_REASON = "frugal: stopping"
# aiohttp waits its shutdown timeout twice (for requests to end, then after cancelling them), so
# proxy/server.py gives it this share of server.shutdown_timeout_s each time.
WAITS = 2
# How long before aiohttp's own deadline the streams are ended (time for their last writes).
MARGIN_S = 0.5


class StreamCutter:
    """The relays streaming right now, to end when the proxy stops."""

    __slots__ = ("_streams", "_timer")

    def __init__(self) -> None:
        self._streams: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Mark the current task as relaying a stream for as long as the block runs."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._streams.add(task)
        try:
            yield
        finally:
            self._streams.discard(task)

    def arm(self, grace_s: float) -> None:
        """The proxy is stopping and its requests have ``grace_s`` left: end the streams still
        running a little before that."""
        if self._timer is None:
            delay = max(0.0, grace_s - MARGIN_S)
            self._timer = asyncio.get_running_loop().call_later(delay, self.cut)

    def cut(self) -> None:
        for task in list(self._streams):
            task.cancel(STOP_REASON)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def is_stop(exc: asyncio.CancelledError) -> bool:
    """Whether a cancellation is the stop's own (see :meth:`StreamCutter.cut`)."""
    return bool(exc.args) and exc.args[0] == STOP_REASON
