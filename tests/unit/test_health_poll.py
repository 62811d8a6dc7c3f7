"""The health poller and the circuit breaker, against a stub session (no sockets)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from proxy.engines.breaker import CircuitBreaker
from proxy.engines.health import poll_replica
from proxy.engines.pool import Replica


class _Answer:
    def __init__(self, status: int) -> None:
        self.status = status

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        return None

    async def text(self) -> str:
        return "vllm:num_requests_running 1\n"


class _Session:
    """Answers every GET with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status

    def get(self, url: str, **_: Any) -> _Answer:
        return _Answer(self.status)


def _opened(healthy: bool | None) -> Replica:
    """A replica whose breaker completion failures have just opened."""
    breaker = CircuitBreaker(failure_threshold=1, open_s=30.0)
    breaker.on_failure(time.monotonic())
    assert breaker.state == "open"
    return Replica(url="http://r", breaker=breaker, healthy=healthy)


async def test_a_healthy_replica_keeps_its_open_breaker_open() -> None:
    # /health is fine but completions fail: the breaker's open period must run its course,
    # or the replica is probed with a real request on every poll.
    replica = _opened(healthy=True)
    await poll_replica(_Session(200), replica, 1.0)  # type: ignore[arg-type]
    assert replica.healthy is True
    assert not replica.breaker.available(time.monotonic())


async def test_a_replica_back_from_down_gets_its_probe_at_once() -> None:
    replica = _opened(healthy=False)
    await poll_replica(_Session(200), replica, 1.0)  # type: ignore[arg-type]
    assert replica.healthy is True
    assert replica.breaker.available(time.monotonic())


async def test_a_replica_still_down_keeps_its_breaker_open() -> None:
    replica = _opened(healthy=False)
    await poll_replica(_Session(503), replica, 1.0)  # type: ignore[arg-type]
    assert replica.healthy is False
    assert not replica.breaker.available(time.monotonic())
