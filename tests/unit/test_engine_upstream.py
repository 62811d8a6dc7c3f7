"""``Upstream.rest()``: the whole-request deadline mid-stream, and whose fault it was; and
``EngineCaller.open`` retrying a failed call on another replica set within that deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import pytest

from proxy.engines.client import EngineCaller, Upstream, UpstreamRequest
from proxy.engines.pool import Engine
from proxy.errors import AnswerOutlastedRequest, UpstreamError, UpstreamTimeout
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


async def test_a_retry_on_another_replica_set_keeps_the_failed_calls_deadline_and_error() -> None:
    # The other version of a canary's engine retries a call whose replicas all failed: with time
    # left it answers, counted as a retry of the failed call's reason; with none, nothing is
    # sent and the failed call's own error stands (not a 503 saying no replica was up).
    sent: list[str] = []
    retries: list[str] = []

    async def transport(request: UpstreamRequest) -> _Answer:
        sent.append(request.url)
        return _Answer([b'{"ok": true}'])

    caller = EngineCaller(transport, on_retry=lambda engine, reason: retries.append(reason))
    other = _upstream(first_token_s=1.0, total_s=10.0).engine
    failed = UpstreamError("engine e is unreachable")

    async def retry(deadline: float) -> Upstream:
        return await caller.open(
            other, "/v1/chat/completions", b"{}", {}, affinity=None, stream=False,
            deadline=deadline, failed=failed,
        )  # fmt: skip

    with pytest.raises(UpstreamError) as raised:
        await retry(time.monotonic())
    assert raised.value is failed and sent == [] and retries == []
    answer = await retry(time.monotonic() + 5)
    assert answer.body == b'{"ok": true}' and answer.deadline < time.monotonic() + 5
    assert sent == ["http://a/v1/chat/completions"] and retries == ["upstream_error"]
