"""Single-flight: identical concurrent misses make one upstream call. Pure asyncio, no I/O.

The first request for a key becomes the *leader* and does the work; later requests for the same key
while it runs become *followers*. The leader publishes stream chunks as they arrive and finally the
complete result; followers iterate the chunks from the very first one (late joiners replay the
buffer, then follow live) and/or await the result.

The leader must end the flight: ``finish(result)`` or ``fail(exc)``. Using the leader as an async
context manager makes that automatic: leaving the block without ``finish`` (an exception, a
cancellation because the client went away) fails the flight with ``LeaderFailed``, so followers are
never left hanging; they get the error and may retry (``run`` does: the first retrier becomes the
new leader). The key is released as soon as the flight ends, so a later request starts afresh.

    flight = flights.join(key)
    if isinstance(flight, Leader):
        async with flight:
            async for chunk in upstream():
                flight.publish(chunk)
            flight.finish(full_response)
    else:
        async for chunk in flight.chunks(): ...     # streamed follower
        full_response = await flight.result()       # or just this
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Generic, TypeVar

C = TypeVar("C")  # stream chunk
R = TypeVar("R")  # final result


class LeaderFailed(Exception):
    """The leader of a flight ended without a result; the cause is chained."""


class _Flight(Generic[C, R]):
    __slots__ = ("_changed", "chunks", "done", "error", "result", "streaming", "waiters")

    def __init__(self) -> None:
        self.chunks: list[C] = []
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None
        self.streaming = False
        self.waiters = 0
        # Made when a follower first waits: most flights have none, and their leader's two
        # futures (one made here, one per notify) were for nobody.
        self._changed: asyncio.Future[None] | None = None

    def notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set_result(None)

    async def changed(self) -> None:
        # (a waiter checks the flight and calls this without a suspension between: no notify
        # can come before the future it waits on is made)
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        # shield: a cancelled waiter must not cancel the future everyone else waits on
        await asyncio.shield(self._changed)


class Leader(Generic[C, R]):
    """The one request doing the work for a key."""

    __slots__ = ("_flight", "_handed_off", "_release")

    def __init__(self, flight: _Flight[C, R], release: Callable[[], None]) -> None:
        self._flight = flight
        self._release = release
        self._handed_off = False

    def hand_off(self) -> None:
        """Someone else (a background task) now ends this flight: leaving the ``async with``
        block no longer fails it. The new owner must call ``finish`` or ``fail``."""
        self._handed_off = True

    @property
    def followers(self) -> int:
        return self._flight.waiters

    def publish(self, chunk: C) -> None:
        if self._flight.done:
            raise RuntimeError("flight already ended")
        self._flight.streaming = True
        self._flight.chunks.append(chunk)
        self._flight.notify()

    def finish(self, result: R) -> None:
        self._end(result, None)

    def fail(self, error: BaseException) -> None:
        self._end(None, error)

    def _end(self, result: R | None, error: BaseException | None) -> None:
        flight = self._flight
        if flight.done:
            return
        flight.done = True
        flight.result = result
        flight.error = error
        self._release()
        flight.notify()

    async def __aenter__(self) -> Leader[C, R]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._flight.done and not self._handed_off:
            cause = exc if exc is not None else RuntimeError("leader ended without a result")
            failure = LeaderFailed(str(cause) or type(cause).__name__)
            failure.__cause__ = cause
            self.fail(failure)


class Follower(Generic[C, R]):
    """A request waiting on another request's work for the same key."""

    __slots__ = ("_flight",)

    def __init__(self, flight: _Flight[C, R]) -> None:
        self._flight = flight

    @property
    def streaming(self) -> bool:
        """Whether the leader streams: joined with ``streaming=True`` or has published chunks."""
        return self._flight.streaming

    def chunks(self) -> AsyncIterator[C]:
        """Every chunk the leader published, from the first; ends when the flight ends.
        Raises the leader's error if it failed (after the chunks published before the failure)."""
        return _Chunks(self._flight)

    async def result(self) -> R:
        """The leader's result, or its error raised."""
        flight = self._flight
        while not flight.done:
            await flight.changed()
        if flight.error is not None:
            raise flight.error
        return flight.result  # type: ignore[return-value]


class _Chunks(AsyncIterator[C]):
    """``Follower.chunks``: a class, not a generator, so the module compiles (setup.py)."""

    __slots__ = ("_flight", "_position")

    def __init__(self, flight: _Flight[C, R]) -> None:
        self._flight = flight
        self._position = 0

    async def __anext__(self) -> C:
        flight = self._flight
        while self._position >= len(flight.chunks):
            if flight.done:
                if flight.error is not None:
                    raise flight.error
                raise StopAsyncIteration
            await flight.changed()
        self._position += 1
        return flight.chunks[self._position - 1]


class SingleFlight(Generic[C, R]):
    """Registry of in-flight keys for one event loop (one per app, never module-level)."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[C, R]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str, *, streaming: bool = False) -> Leader[C, R] | Follower[C, R]:
        """Lead or follow the flight for ``key``. ``streaming`` says whether this request, if it
        leads, will publish chunks (followers see it as ``Follower.streaming`` right away)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters += 1
            return Follower(flight)
        flight = _Flight()
        flight.streaming = streaming
        self._flights[key] = flight

        def release() -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]

        return Leader(flight, release)

    async def run(
        self, key: str, work: Callable[[], Awaitable[R]], *, retries: int = 1
    ) -> tuple[R, bool]:
        """Non-streamed helper: ``(result, shared)``; ``shared`` is True for a follower.

        A follower whose leader failed retries (and may lead) up to ``retries`` times, then
        raises the last error.
        """
        attempt = 0
        while True:
            flight = self.join(key)
            if isinstance(flight, Leader):
                async with flight:
                    result = await work()
                    flight.finish(result)
                return result, False
            try:
                return await flight.result(), True
            except LeaderFailed:
                attempt += 1
                if attempt > retries:
                    raise
