"""Ending the streams still running when the proxy stops, with an error event its clients read.

On SIGTERM aiohttp waits ``server.shutdown_timeout_s`` (split in two waits, see proxy/server.py)
for requests in flight, then cancels their handlers and closes their connections in one step:
a handler cancelled then can no longer write, so a stream still going would just stop, with
neither an error event nor ``[DONE]``. So the app's shutdown signal arms a timer a little before
that deadline, and the streams still running are cancelled with :data:`STOP_REASON` while their
connections are open: the relay sees the reason, writes the error event and ``[DONE]``, and ends
its response cleanly. A request that has sent nothing yet (a non-streamed answer, a stream still
waiting for its first token) keeps the whole grace period: just before aiohttp's last deadline it
is cancelled the same way, and answered 503 ``shutting_down`` instead of an empty reply. (On
SIGTERM all this follows the drain, ``server.drain_delay_s``, in which nothing is cut: see
proxy/server.py.)
"""

from __future__ import annotations

import asyncio
import math

STOP_REASON = "frugal: stopping"
# A stream still being written this long after its request's deadline (total_s) is stuck in a
# write to a client that does not read: see StreamCutter.cut_overdue.
OVERDUE_GRACE_S = 1.0
# aiohttp waits its shutdown timeout twice (for requests to end, then after cancelling them), so
# proxy/server.py gives it this share of server.shutdown_timeout_s each time.
WAITS = 2
# How long before aiohttp's own deadline the streams are ended (time for their last writes).
MARGIN_S = 0.5


class StreamCutter:
    """The relays streaming right now, to end when the proxy stops."""

    __slots__ = ("_requests", "_streams", "_timers")

    def __init__(self) -> None:
        # each relaying task, and the deadline of its request (monotonic)
        self._streams: dict[asyncio.Task[object], float] = {}
        self._requests: set[asyncio.Task[object]] = set()
        self._timers: list[asyncio.TimerHandle] = []

    def streaming(self, deadline: float = math.inf) -> _Streaming:
        """Mark the current task as relaying a stream, due to end by ``deadline``
        (monotonic), for as long as the block runs."""
        return _Streaming(self._streams, deadline)

    def cut_overdue(self, now: float) -> None:
        """Cancel the relays still running well past their request's deadline. The relay reads
        the engine within that deadline, but a write waits for as long as the client does not
        read (a client that stopped reading, a network gone silent): that would hold the
        engine's request and its admission slot until the client's TCP connection gives up.
        Run every second or so (one timer for all streams, none per request); the relay takes
        the cancellation as the client leaving."""
        for task, deadline in list(self._streams.items()):
            if now > deadline + OVERDUE_GRACE_S:
                task.cancel()

    def answering(self) -> _Marked:
        """Mark the current task as answering a request (cut last, see :meth:`arm`)."""
        return _Marked(self._requests)

    def arm(self, grace_s: float) -> None:
        """The proxy is stopping and its requests have ``grace_s`` left, twice (aiohttp's two
        waits): end the streams still running a little before the first deadline, and the
        requests still waiting for their answer a little before the second."""
        if not self._timers:
            loop = asyncio.get_running_loop()
            self._timers = [
                loop.call_later(max(0.0, grace_s - MARGIN_S), self.cut),
                loop.call_later(max(0.0, WAITS * grace_s - MARGIN_S), self.cut_requests),
            ]

    def cut(self) -> None:
        for task in list(self._streams):
            task.cancel(STOP_REASON)

    def cut_requests(self) -> None:
        for task in list(self._requests):
            task.cancel(STOP_REASON)

    def disarm(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []


class _Marked:
    """The current task in ``tasks`` while the block runs. A class, not a generator: every
    request enters one, and a generator-based context manager cost ~5 µs of it here."""

    __slots__ = ("_task", "_tasks")

    def __init__(self, tasks: set[asyncio.Task[object]]) -> None:
        self._tasks = tasks
        self._task: asyncio.Task[object] | None = None

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._tasks.add(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._tasks.discard(self._task)


def is_stop(exc: asyncio.CancelledError) -> bool:
    """Whether a cancellation is the stop's own (see :meth:`StreamCutter.cut`)."""
    return bool(exc.args) and exc.args[0] == STOP_REASON


class _Streaming:
    """The current task and its deadline in ``streams`` while the block runs (a class: see
    :class:`_Marked`)."""

    __slots__ = ("_deadline", "_streams", "_task")

    def __init__(self, streams: dict[asyncio.Task[object], float], deadline: float) -> None:
        self._streams = streams
        self._deadline = deadline
        self._task: asyncio.Task[object] | None = None

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._streams[self._task] = self._deadline

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._streams.pop(self._task, None)
