"""``Upstream.rest()``: the whole-request deadline mid-stream, and whose fault it was."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import pytest

from proxy.engines.client import Upstream
from proxy.engines.pool import Engine
from proxy.errors import AnswerOutlastedRequest, UpstreamTimeout
from proxy.settings import EngineSettings


class _Answer:
    """An engine stream whose chunks are all there at once (the engine is not silent)."""

    status = 200
    headers: Mapping[str, str] = {}

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def read(self) -> bytes:
        return b"".join(self._chunks)

    async def _each(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    def chunks(self) -> AsyncIterator[bytes]:
        return self._each()

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def _upstream(first_token_s: float, total_s: float) -> Upstream:
    settings = EngineSettings(
        name="e",
        model="m",
        urls=["http://a"],
        timeouts={"first_token_s": first_token_s, "total_s": total_s},  # type: ignore[arg-type]
    )
    engine = Engine.from_settings(settings)
    answer = _Answer([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"])
    return Upstream(engine, engine.replicas[0], answer, deadline=time.monotonic() + total_s)


async def test_a_client_slow_to_take_the_chunks_is_not_a_replica_that_stalled() -> None:
    # The replica had every chunk ready; the client took longer than first_token_s to be sent
    # the first one (a slow reader: the write waited), and the request's time ran out meanwhile.
    upstream = _upstream(first_token_s=1.0, total_s=0.2)
    with pytest.raises(UpstreamTimeout) as raised:
        async for _ in upstream.rest():
            await asyncio.sleep(1.2)  # the relay's write to a client that does not read
    assert isinstance(raised.value, AnswerOutlastedRequest)  # not told to the breaker
