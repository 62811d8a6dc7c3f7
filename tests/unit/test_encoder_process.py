"""The encoder's child process: framing, answers, calls side by side, a child that fails or
exits, background texts, and calls from threads."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.embeddings.process import (
    EncoderFailed,
    EncoderLost,
    EncoderProcess,
    areceive,
    frame,
    receive,
    send,
)
from proxy.embeddings.worker import EncoderUnavailable
from tests.unit.encoder_factories import row

FACTORY = "tests.unit.encoder_factories:hashed"


@given(st.lists(st.text(), max_size=5), st.booleans())
def test_a_message_comes_back_as_it_was_sent(texts: list[str], flag: bool) -> None:
    stream = io.BytesIO()
    send(stream, (texts, flag))
    send(stream, ("ok", np.arange(3, dtype=np.float32)))
    stream.seek(0)
    assert receive(stream) == (texts, flag)
    status, array = receive(stream)
    assert status == "ok" and array.tolist() == [0.0, 1.0, 2.0]
    assert receive(stream) is None  # the end of the stream: the other side is gone


async def test_the_event_loop_reads_the_same_frames() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(frame(["one"]) + frame({"two": 2}) + frame("cut")[:-1])
    reader.feed_eof()
    assert await areceive(reader) == ["one"]
    assert await areceive(reader) == {"two": 2}
    assert await areceive(reader) is None  # a cut frame reads as the end


def test_a_cut_frame_reads_as_the_end_of_the_stream() -> None:
    stream = io.BytesIO()
    send(stream, ["a long enough message"])
    stream = io.BytesIO(stream.getvalue()[:-3])
    assert receive(stream) is None


@pytest.fixture
async def process() -> AsyncIterator[EncoderProcess]:
    encoder = EncoderProcess(FACTORY, {}, threads=2)
    await encoder.start()
    yield encoder
    await encoder.close()


async def test_rows_come_back_in_order_from_another_process(process: EncoderProcess) -> None:
    texts = ["b", "a", "naïve question?"]
    batch = await process.encode(texts, use_helper=False)
    assert [r[:4].tolist() for r in batch.base] == [row(t).tolist() for t in texts]
    assert np.array_equal(batch.verifier, batch.base * 2)
    assert batch.shallow is not None and np.array_equal(batch.shallow, batch.base * 3)
    assert batch.whole is not None and batch.whole.tolist() == [False] * 3  # use_helper passed
    assert {int(r[4]) for r in batch.base} == {process.pid} != {os.getpid()}


async def test_calls_made_together_are_encoded_side_by_side(process: EncoderProcess) -> None:
    # Each call waits in the child until the other is encoding too (else its barrier breaks).
    answers = await asyncio.gather(*(process.encode([f"together:2:{i}"]) for i in range(2)))
    assert [a.base[0, :4].tolist() for a in answers] == [
        row(f"together:2:{i}").tolist() for i in range(2)
    ]


async def test_an_error_fails_the_call_and_the_child_keeps_serving(
    process: EncoderProcess,
) -> None:
    pid = process.pid
    with pytest.raises(EncoderFailed, match="raise:this one") as failed:
        await process.encode(["fine", "raise:this one"])
    assert isinstance(failed.value, EncoderUnavailable)  # the request goes on without a vector
    assert (await process.encode(["next"])).base[0, 4] == pid
    assert process.starts == 1


async def test_a_lost_child_fails_every_call_it_had_and_the_next_call_starts_another(
    process: EncoderProcess,
) -> None:
    first = process.pid
    waiting = asyncio.ensure_future(process.encode(["sleep:30"]))
    await asyncio.sleep(0.2)  # (queued in the child before it goes)
    with pytest.raises(EncoderLost, match="code 3"):
        await process.encode(["exit:now"])
    with pytest.raises(EncoderLost):
        await asyncio.wait_for(waiting, 10)  # not left waiting for a child that is gone
    batch = await process.encode(["after"])
    assert process.starts == 2
    assert process.pid is not None and process.pid != first
    assert batch.base[0, 4] == process.pid
    assert batch.base[0, :4].tolist() == row("after").tolist()


async def test_a_caller_that_leaves_does_not_disturb_the_others(process: EncoderProcess) -> None:
    leaving = asyncio.ensure_future(process.encode(["sleep:0.3:leaving"]))
    await asyncio.sleep(0.05)
    leaving.cancel()
    staying = await process.encode(["staying"])  # (its answer is not the one left behind)
    assert staying.base[0, :4].tolist() == row("staying").tolist()
    await asyncio.sleep(0.4)  # the left call's answer arrives, and is dropped
    assert (await process.encode(["later"])).base[0, :4].tolist() == row("later").tolist()


async def test_a_factory_that_fails_says_why_the_child_did_not_start() -> None:
    encoder = EncoderProcess("tests.unit.encoder_factories:failing", {"why": "no weights here"})
    with pytest.raises(EncoderLost, match="RuntimeError: no weights here"):
        await encoder.start()
    await encoder.close()


async def test_close_ends_the_child_and_refuses_later_calls(process: EncoderProcess) -> None:
    pid = process.pid
    assert pid is not None
    await process.close()
    with pytest.raises(ProcessLookupError):  # exited and reaped
        os.kill(pid, 0)
    with pytest.raises(EncoderLost, match="closed"):
        await process.encode(["too late"])


async def test_background_texts_run_at_the_lowest_priority_without_the_helper(
    process: EncoderProcess,
) -> None:
    user = await process.encode(["a user's question"])
    audit = await process.encode(["an audit's answer"], background=True)
    assert user.base[0, 5] == os.getpriority(os.PRIO_PROCESS, 0)  # the child's own
    assert audit.base[0, 5] == 19
    assert audit.whole is not None and not audit.whole[0]  # use_helper=False
    assert user.whole is not None and user.whole[0]
    assert int(audit.base[0, 4]) == process.pid  # the same child


async def test_threads_other_than_the_loops_encode_through_it(process: EncoderProcess) -> None:
    batch = await asyncio.to_thread(process.encode_blocking, ["from a thread"])
    assert batch.base[0, :4].tolist() == row("from a thread").tolist()
