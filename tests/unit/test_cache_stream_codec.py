"""Stream codec: assemble(replay(x)) == x, realistic vLLM streams, incomplete streams."""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.keys import Endpoint
from proxy.cache.stream_codec import (
    IncompleteStream,
    StreamAssembler,
    assemble,
    normalise_response,
    replay,
    replay_sse,
    split_text,
    wants_usage,
)
from proxy.sse import parse_all

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
maybe_text = st.none() | texts
usage = st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10_000),
        "completion_tokens": st.integers(0, 10_000),
        "total_tokens": st.integers(0, 20_000),
    }
)
finish = st.sampled_from(["stop", "length", "tool_calls"])
token_logprob = st.fixed_dictionaries(
    {
        "token": texts,
        "logprob": st.floats(-20, 0),
        "bytes": st.lists(st.integers(0, 255), max_size=3),
    }
)
chat_logprobs = st.none() | st.fixed_dictionaries({"content": st.lists(token_logprob, max_size=3)})
tool_call = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=8),
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.text(min_size=1, max_size=8), "arguments": texts}
        ),
    }
)


@st.composite
def chat_message(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": draw(maybe_text)}
    calls = draw(st.lists(tool_call, max_size=2))
    if calls:
        message["tool_calls"] = calls
    reasoning = draw(maybe_text)
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


@st.composite
def responses(draw: st.DrawFn, endpoint: Endpoint) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    choices = []
    for index in range(n):
        choice: dict[str, Any] = {"index": index}
        if endpoint is Endpoint.CHAT:
            choice["message"] = draw(chat_message())
            choice["logprobs"] = draw(chat_logprobs)
        else:
            choice["text"] = draw(texts)
            choice["logprobs"] = draw(
                st.none()
                | st.fixed_dictionaries(
                    {
                        "tokens": st.lists(texts, max_size=3),
                        "token_logprobs": st.lists(st.floats(-5, 0), max_size=3),
                    }
                )
            )
        choice["finish_reason"] = draw(finish)
        if draw(st.booleans()):
            choice["stop_reason"] = draw(st.none() | st.integers(0, 50_000) | texts)
        if draw(st.booleans()):
            choice["token_ids"] = draw(st.lists(st.integers(0, 50_000), max_size=4))
        choices.append(choice)
    body: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=10)),
        "object": "chat.completion" if endpoint is Endpoint.CHAT else "text_completion",
        "created": draw(st.integers(0, 2**31)),
        "model": draw(st.text(min_size=1, max_size=10)),
        "choices": choices,
        "usage": draw(usage),
    }
    if draw(st.booleans()):
        body["system_fingerprint"] = draw(st.text(max_size=8))
    return body


@given(responses(Endpoint.CHAT))
def test_chat_round_trip(response: dict[str, Any]) -> None:
    chunks = replay(Endpoint.CHAT, response, include_usage=True)
    assert assemble(Endpoint.CHAT, chunks) == normalise_response(response)


@given(responses(Endpoint.COMPLETIONS))
def test_completions_round_trip(response: dict[str, Any]) -> None:
    chunks = replay(Endpoint.COMPLETIONS, response, include_usage=True)
    assert assemble(Endpoint.COMPLETIONS, chunks) == normalise_response(response)


@given(responses(Endpoint.CHAT))
def test_round_trip_through_sse_bytes(response: dict[str, Any]) -> None:
    events = replay_sse(Endpoint.CHAT, response, include_usage=True)
    payloads = parse_all(b"".join(events))
    assert payloads[-1] == b"[DONE]"
    assembler = StreamAssembler(Endpoint.CHAT)
    for payload in payloads:
        assembler.add_payload(payload)
    assert assembler.result() == normalise_response(response)


@given(texts, st.integers(1, 6))
def test_split_text_concatenates_back(text: str, words: int) -> None:
    pieces = split_text(text, words)
    assert "".join(pieces) == text
    assert all(len(p.split()) <= words for p in pieces)


def _split_as_first_written(text: str, words: int) -> list[str]:
    tokens = re.findall(r"\s*\S+", text)
    tail = text[sum(len(t) for t in tokens) :]
    pieces = ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces or [""]


_SPACED = st.lists(st.sampled_from(["a", "bc", " ", "  ", "\n", "\t", "\u2028", "é"]), max_size=30)


@given(_SPACED.map("".join) | texts, st.integers(1, 6))
def test_split_text_cuts_where_it_first_cut(text: str, words: int) -> None:
    assert split_text(text, words) == _split_as_first_written(text, words)


def test_a_long_whitespace_tail_is_split_in_linear_time() -> None:
    # A cached answer ending in many blank lines (a model looping on newlines): \s*\S+ tried at
    # each of its n blanks ran to the end, n^2 on the event loop at every replay (~1 s for 8,000).
    answer = "The answer." + "\n" * 40_000
    started = time.perf_counter()
    pieces = split_text(answer)
    assert time.perf_counter() - started < 0.5
    assert pieces == [answer]


def test_replay_shape() -> None:
    response = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "one two three four five six seven"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10},
    }
    chunks = replay(Endpoint.CHAT, response, include_usage=True)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert contents == ["one two three four", " five six seven"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == response["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "cmpl-1" for c in chunks)
    no_usage = replay(Endpoint.CHAT, response, include_usage=False)
    assert all("usage" not in c for c in no_usage)
    fresh = replay(Endpoint.CHAT, response, include_usage=False, overrides={"id": "new"})
    assert {c["id"] for c in fresh} == {"new"}


def test_vllm_stream_with_tool_call_and_usage() -> None:
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 11, "model": "qwen"}
    chunks: list[dict[str, Any]] = [
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "Let me "},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "check."},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "weather", "arguments": ""},
                            }
                        ]
                    },
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
        },
        {
            **head,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        },
    ]
    body = assemble(Endpoint.CHAT, chunks)
    assert body == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 11,
        "model": "qwen",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.COMPLETIONS])
def test_streamed_token_ids_are_concatenated(endpoint: Endpoint) -> None:
    # vLLM's return_token_ids: every chunk carries its own tokens' ids
    def piece(text: str, ids: list[int], finish: str | None = None) -> dict[str, Any]:
        body = {"delta": {"content": text}} if endpoint is Endpoint.CHAT else {"text": text}
        return {"index": 0, **body, "token_ids": ids, "finish_reason": finish}

    chunks = [
        {"id": "x", "created": 1, "model": "m", "choices": [piece("Hel", [9, 8])]},
        {"id": "x", "created": 1, "model": "m", "choices": [piece("lo", [7])]},
        {"id": "x", "created": 1, "model": "m", "choices": [piece("", [6], "stop")]},
    ]
    assert assemble(endpoint, chunks)["choices"][0]["token_ids"] == [9, 8, 7, 6]


def test_interleaved_choices_of_n_2() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}

    body = assemble(
        Endpoint.CHAT,
        [
            chunk(1, {"role": "assistant"}),
            chunk(0, {"role": "assistant"}),
            chunk(0, {"content": "a"}),
            chunk(1, {"content": "x"}),
            chunk(0, {"content": "b"}, "stop"),
            chunk(1, {}, "length"),
        ],
    )
    assert [c["message"]["content"] for c in body["choices"]] == ["ab", "x"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] is None


def test_incomplete_streams_are_refused() -> None:
    head = {"id": "c", "object": "text_completion", "created": 1, "model": "m"}
    cut = [{**head, "choices": [{"index": 0, "text": "half", "finish_reason": None}]}]
    with pytest.raises(IncompleteStream):
        assemble(Endpoint.COMPLETIONS, cut)
    errored = StreamAssembler(Endpoint.COMPLETIONS)
    errored.add({**head, "choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]})
    errored.add_payload(orjson.dumps({"error": {"message": "engine died", "code": 500}}))
    assert not errored.complete
    with pytest.raises(IncompleteStream):
        errored.result()
    with pytest.raises(IncompleteStream):
        assemble(Endpoint.CHAT, [])
    garbled = StreamAssembler(Endpoint.COMPLETIONS)
    garbled.add({**head, "choices": [{"index": 0, "text": "x", "finish_reason": None}]})
    garbled.add_payload(b"{not json")
    garbled.add({**head, "choices": [{"index": 0, "text": "y", "finish_reason": "stop"}]})
    assert not garbled.complete  # a stream with an unreadable event is never stored


def test_normalise_drops_vllm_nulls() -> None:
    vllm_message = {
        "role": "assistant",
        "content": "hi",
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    response = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": vllm_message, "finish_reason": "stop"}],
    }
    normal = normalise_response(response)
    assert normal["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert normal["choices"][0]["logprobs"] is None
    assert assemble(Endpoint.CHAT, replay(Endpoint.CHAT, response, include_usage=True)) == normal


def test_wants_usage() -> None:
    assert wants_usage({"stream_options": {"include_usage": True}})
    assert not wants_usage({"stream_options": {"include_usage": False}})
    assert not wants_usage({})


@pytest.mark.parametrize(("finish", "content"), [("tool_calls", None), ("stop", "")])
def test_a_streamed_tool_call_without_text_has_the_whole_answers_content(
    finish: str, content: str | None
) -> None:
    # vLLM's role chunk says content "" for every choice; its whole answer to an auto tool call
    # says null (a named call, finish stop, says "")
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    call = {"id": "chatcmpl-tool-1", "type": "function", "index": 0, "function": {"name": "f"}}
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk({}, finish),
    ]
    message = assemble(Endpoint.CHAT, chunks)["choices"][0]["message"]
    assert message["content"] == content
    assert message["tool_calls"] == [
        {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
