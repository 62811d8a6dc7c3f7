"""The stream relay's bookkeeping at the edges of an engine's stream (pure: no I/O)."""

from __future__ import annotations

import orjson

from proxy.pipeline import _StreamRelay
from proxy.sse import parse_all

CHUNK = b'{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}'
USAGE = b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'


def relay_of(
    raw: bytes, *, include_usage: bool = False
) -> tuple[_StreamRelay, list[bytes], list[bytes]]:
    seen: list[bytes] = []
    relay = _StreamRelay(include_usage=include_usage, sink=seen.append)
    out = relay.feed(raw) + relay.close()
    return relay, parse_all(out), seen


def test_a_last_event_without_its_blank_line_is_still_an_event() -> None:
    # the engine ends with an unterminated usage event, then closes
    relay, out, seen = relay_of(b"data: " + CHUNK + b"\n\ndata: " + USAGE)
    assert out == [CHUNK, b"[DONE]"]  # the usage the client did not ask for is held back
    assert relay.usage == (3, 1)  # and counted
    assert seen == [CHUNK, USAGE]  # and given to the cache and the followers
    relay, out, _ = relay_of(b"data: " + CHUNK + b"\n\ndata: [DONE]")
    assert relay.done and out == [CHUNK, b"[DONE]"]  # a clean end, so the answer is stored


def test_nothing_follows_done() -> None:
    _, out, seen = relay_of(b"data: " + CHUNK + b'\n\ndata: [DONE]\n\ndata: {"late":1}\n\n')
    assert out == [CHUNK, b"[DONE]"]
    assert seen == [CHUNK]


def test_usage_is_relayed_when_asked() -> None:
    relay, out, _ = relay_of(
        b"data: " + CHUNK + b"\n\ndata: " + USAGE + b"\n\n", include_usage=True
    )
    assert [orjson.loads(p) for p in out[:-1]] == [orjson.loads(CHUNK), orjson.loads(USAGE)]
    assert out[-1] == b"[DONE]"  # closed for an engine that did not
    assert relay.complete


def test_a_stream_ended_before_a_finish_reason_is_not_complete_and_not_closed() -> None:
    unfinished = b'{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}'
    relay, out, _ = relay_of(b"data: " + unfinished + b"\n\n")
    assert out == [unfinished]  # no [DONE]: the caller ends it with an error event
    assert not relay.complete and not relay.done


def test_a_finish_reason_with_spaces_counts_and_null_does_not() -> None:
    spaced = b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}'
    relay, out, _ = relay_of(b"data: " + spaced + b"\n\n")
    assert relay.complete and out[-1] == b"[DONE]"
    relay, _, _ = relay_of(b'data: {"choices":[{"delta":{},"finish_reason": null}]}\n\n')
    assert not relay.complete
