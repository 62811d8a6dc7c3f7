"""Pure parts of the replay loop: loopback check, answer parsing (body and SSE), pacing."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.bench.replay import (
    NotLoopbackError,
    answer_from_body,
    answer_from_stream,
    check_loopback,
    prompt_chars,
    schedule,
)
from proxy.bench.trace import TraceRequest
from proxy.sse import DONE_PAYLOAD, parse_all


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/", "http://127.9.9.9", "http://localhost:1", "https://[::1]:8443"],
)
def test_loopback_urls_are_accepted(url: str) -> None:
    assert not check_loopback(url).endswith("/")


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:8000", "http://"],
)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(NotLoopbackError):
        check_loopback(url)


def chat_body(text: str, usage: tuple[int, int] | None = (5, 7)) -> bytes:
    body: dict[str, object] = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    return orjson.dumps(body)


def chunk(text: str, index: int = 0) -> bytes:
    return orjson.dumps({"choices": [{"index": index, "delta": {"content": text}}]})


def test_answer_from_body_chat_and_text() -> None:
    answer = answer_from_body(chat_body("Paris"))
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens, answer.error) == (
        "Paris",
        5,
        7,
        None,
    )
    text = answer_from_body(orjson.dumps({"choices": [{"index": 0, "text": "4"}]}))
    assert (text.text, text.prompt_tokens) == ("4", None)


def test_answer_from_body_failures() -> None:
    assert answer_from_body(b"<html>").error == "bad-json"
    assert answer_from_body(b'{"error": {"message": "x"}}').error == "error-body"


def test_answer_digest_tells_answers_apart_and_ignores_empty() -> None:
    assert answer_from_body(chat_body("a")).digest != answer_from_body(chat_body("b")).digest
    assert answer_from_body(chat_body("a", None)).digest == answer_from_body(chat_body("a")).digest
    assert answer_from_body(chat_body("")).digest is None


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=10))
def test_streamed_and_whole_answers_have_the_same_digest(pieces: list[str]) -> None:
    payloads = [chunk(p) for p in pieces] + [DONE_PAYLOAD]
    streamed = answer_from_stream(payloads)
    assert streamed.error is None
    assert streamed.digest == answer_from_body(chat_body("".join(pieces))).digest


def test_stream_usage_and_multiple_choices() -> None:
    usage = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    raw = b"".join(
        b"data: " + p + b"\n\n"
        for p in (chunk("a", 0), chunk("x", 1), chunk("b", 0), usage, DONE_PAYLOAD)
    )
    answer = answer_from_stream(parse_all(raw))
    assert answer.text == "ab\x1ex"
    assert (answer.prompt_tokens, answer.completion_tokens, answer.error) == (3, 4, None)


def test_stream_failures() -> None:
    assert answer_from_stream([chunk("a")]).error == "truncated-stream"
    error_event = orjson.dumps({"error": {"message": "engine died", "code": "upstream"}})
    failed = answer_from_stream([chunk("a"), error_event, DONE_PAYLOAD])
    assert (failed.error, failed.text) == ("stream-error", "a")
    assert answer_from_stream([b"{oops", DONE_PAYLOAD]).error == "bad-sse-json"


def test_prompt_chars_counts_messages_parts_and_prompt() -> None:
    assert prompt_chars({"prompt": "abcd"}) == 4
    messages = [
        {"role": "system", "content": "ab"},
        {"role": "user", "content": [{"type": "text", "text": "cde"}, {"type": "image_url"}]},
    ]
    assert prompt_chars({"messages": messages}) == 5


def requests_at(times: list[float | None]) -> list[TraceRequest]:
    return [TraceRequest(index=i, body={}, t=t) for i, t in enumerate(times)]


def test_schedule_modes() -> None:
    requests = requests_at([0.0, 1.0, None, 4.0])
    assert schedule(requests, "fast") == [0.0] * 4
    assert schedule(requests, "rate", rate=2.0) == [0.0, 0.5, 1.0, 1.5]
    assert schedule(requests, "timed") == [0.0, 1.0, 1.0, 4.0]
    assert schedule(requests, "timed", speed=2.0) == [0.0, 0.5, 0.5, 2.0]
    with pytest.raises(ValueError):
        schedule(requests, "rate")
    with pytest.raises(ValueError):
        schedule(requests, "timed", speed=0)


@given(st.lists(st.none() | st.floats(0, 1000), max_size=30), st.floats(0.1, 10))
def test_timed_schedule_never_goes_back_in_time(times: list[float | None], speed: float) -> None:
    planned = schedule(requests_at(times), "timed", speed=speed)
    assert planned == sorted(planned)
    assert len(planned) == len(times)


def test_odd_choice_indexes_fall_back_to_position() -> None:
    body = orjson.dumps({"choices": [{"index": None, "text": "a"}, {"index": "x", "text": "b"}]})
    assert answer_from_body(body).text == "a\x1eb"
    assert (
        answer_from_stream(
            [orjson.dumps({"choices": [{"index": None, "text": "a"}]}), DONE_PAYLOAD]
        ).text
        == "a"
    )
