"""The fake engine's pure parts: request checks and error bodies (its HTTP behaviour is in
tests/integration/test_fake_engine.py)."""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.cache.keys import Endpoint as CodecEndpoint
from proxy.cache.stream_codec import assemble, normalise_response
from proxy.engines.fake import (
    BadRequest,
    Choice,
    Endpoint,
    FakeCounters,
    add_cli_arguments,
    check_request,
    error_body,
    output_shape,
    render_metrics,
    render_response,
    render_stream_events,
    token_steps,
)
from proxy.pipeline import openai_error_body
from proxy.sse import parse_all


def test_check_request_accepts_what_vllm_accepts() -> None:
    chat: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "max_tokens": 5,
        "max_completion_tokens": None,
        "stop": ["\n", "."],
        "seed": 3,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert check_request("chat", chat) is chat
    completion = {"model": "m", "prompt": [1, 2, 3], "stop": "x", "temperature": 0}
    assert check_request("completions", completion) is completion


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stop", 5, "'stop' must be a string or a list of strings"),
        ("stop", [1], "'stop' must be a string or a list of strings"),
        ("max_tokens", "x", "'max_tokens' must be an integer >= 1"),
        ("max_tokens", True, "'max_tokens' must be an integer >= 1"),
        ("max_completion_tokens", 0, "'max_completion_tokens' must be an integer >= 1"),
        ("n", 1.5, "'n' must be an integer >= 1"),
        ("seed", "1", "'seed' must be an integer"),
        ("temperature", -1, "'temperature' must be a number >= 0"),
        ("stream", "yes", "'stream' must be a boolean"),
    ],
)
def test_check_request_names_the_bad_field(field: str, value: Any, message: str) -> None:
    body = {"model": "m", "messages": [], field: value}
    with pytest.raises(BadRequest) as err:
        check_request("chat", body)
    assert str(err.value) == message
    assert err.value.param == field


def test_error_body_is_vllm_openai_shape_and_the_proxy_relays_it_with_a_string_code() -> None:
    body = error_body("'stop' must be a string", "BadRequestError", 400, "stop")
    assert orjson.loads(body) == {
        "error": {
            "message": "'stop' must be a string",
            "type": "BadRequestError",
            "param": "stop",
            "code": 400,
        }
    }
    # vLLM's integer code becomes OpenAI's string code; the rest is relayed as it came
    assert orjson.loads(openai_error_body(body, 400)) == {
        "error": {
            "message": "'stop' must be a string",
            "type": "BadRequestError",
            "param": "stop",
            "code": "400",
        }
    }
    already = b'{"error":{"message":"m","type":"t","param":null,"code":"bad_thing"}}'
    assert openai_error_body(already, 400) == already
    # Older vLLM sends the flat shape; the proxy still nests it.
    flat = b'{"object":"error","message":"m","type":"BadRequestError","param":null,"code":400}'
    assert orjson.loads(openai_error_body(flat, 400)) == {
        "error": {"message": "m", "type": "BadRequestError", "param": None, "code": "400"}
    }


def test_a_stream_waits_once_per_token_position_not_per_event() -> None:
    choices = [Choice([" a", " b", " c"], "length"), Choice([" d"], "stop")]
    used = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    chat = render_stream_events("chat", "id", 0, "m", choices, used)
    # 2 role chunks, then positions 0 (2 tokens), 1 and 2 (1 each), 2 finish chunks, usage, DONE.
    steps = token_steps("chat", choices)
    assert steps == {4: 1, 5: 2}
    assert all(b'"content":" ' in chat[i] for i in steps)
    assert max(steps.values()) == 2  # the longest answer's last token: (3 - 1) waits in all
    assert token_steps("completions", choices) == {2: 1, 3: 2}
    assert token_steps("chat", [Choice([], "stop")]) == {}


def test_metrics_escape_the_model_label() -> None:
    model = 'a"b\\c\nd'
    text = render_metrics(model, 1, 0, 4, FakeCounters(finished={"stop": 2}))
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert {s.labels["model_name"] for s in samples} == {model}
    running = next(s for s in samples if s.name == "vllm:num_requests_running")
    assert running.value == 1.0
    assert 'model_name="a\\"b\\\\c\\nd"' in text


def test_every_cli_flag_has_help_and_seed_says_it_seeds_the_text() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    flags = {action.option_strings[-1]: action.help for action in parser._actions}
    assert [flag for flag, text in flags.items() if not text] == []
    assert "random answers" in str(flags["--seed"])
    assert "per choice" in str(flags["--tokens-per-s"])


def _streamed_and_whole(
    endpoint: Endpoint, body: dict[str, Any], choices: list[Choice]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    shape = output_shape(endpoint, body)
    used = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    whole = orjson.loads(render_response(endpoint, "id", 0, "m", choices, used, shape))
    events = render_stream_events(endpoint, "id", 0, "m", choices, used, shape)
    return whole, [orjson.loads(p) for p in parse_all(b"".join(events))[:-1]]


def _without_call_ids(body: dict[str, Any]) -> dict[str, Any]:
    for choice in body["choices"]:
        for call in (choice.get("message") or {}).get("tool_calls") or ():
            call["id"] = "<random>"
    return body


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]


@pytest.mark.parametrize(
    ("body", "content", "finish"),
    [
        ({"tools": TOOLS}, None, "tool_calls"),
        ({"tools": TOOLS, "tool_choice": "auto", "logprobs": True}, None, "tool_calls"),
        ({"tools": TOOLS, "tool_choice": "required"}, "", "stop"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "",
            "stop",
        ),
    ],
)
def test_a_request_with_tools_gets_vllms_tool_call_shapes(
    body: dict[str, Any], content: str | None, finish: str
) -> None:
    # a call with no argument tokens (its whole arguments come in the finish chunk), except
    # with logprobs: an answer of no tokens has none to stream (vLLM always makes one)
    second = [" c"] if body.get("logprobs") else []
    choices = [Choice([" a", ' "b'], "stop"), Choice(second, "stop")]
    whole, chunks = _streamed_and_whole("chat", body, choices)
    name = "x" if isinstance(body.get("tool_choice"), dict) else "lookup"
    for choice, tokens in zip(whole["choices"], (' a "b', "".join(second)), strict=True):
        message = choice["message"]
        assert message["content"] == content
        assert choice["finish_reason"] == finish
        [call] = message["tool_calls"]
        assert call["id"].startswith("chatcmpl-tool-")
        assert call["function"] == {
            "name": name,
            "arguments": orjson.dumps({"text": tokens}).decode(),
        }
    # streamed as vLLM does: the call's id, type and name first, then its arguments in pieces
    deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    calls = [d[0] for d in deltas if d]
    named = [c for c in calls if "id" in c]
    assert [set(c) for c in named] == [{"id", "type", "index", "function"}] * 2
    assert all(set(c["function"]) == {"name"} for c in named)
    assert all(set(c) == {"index", "function"} for c in calls if "id" not in c)
    assembled = assemble(CodecEndpoint.CHAT, chunks)
    if content is None:  # the stream's role chunk says "" where the whole answer has null
        for choice in assembled["choices"]:
            choice["message"]["content"] = None
    expected = _without_call_ids(normalise_response(whole))
    expected.pop("prompt_logprobs")
    assert _without_call_ids(assembled) == expected


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 3}),
        ("chat", {"logprobs": True}),
        ("completions", {"logprobs": 2, "echo": True}),
    ],
)
def test_logprobs_and_echo_are_the_same_streamed_and_whole(
    endpoint: Endpoint, body: dict[str, Any]
) -> None:
    echo = "prompt" if body.get("echo") else ""
    choices = [Choice([" a", " b", " c"], "length", echo), Choice([" d"], "stop", echo)]
    whole, chunks = _streamed_and_whole(endpoint, body, choices)
    expected = normalise_response(whole)
    expected.pop("prompt_logprobs")
    for choice in expected["choices"]:
        choice.pop("prompt_logprobs", None)
    assert assemble(CodecEndpoint(endpoint), chunks) == expected
    logprobs = whole["choices"][0]["logprobs"]
    if endpoint == "chat":
        entries = logprobs["content"]
        assert [e["token"] for e in entries] == [" a", " b", " c"]
        assert [len(e["top_logprobs"]) for e in entries] == [body.get("top_logprobs", 0)] * 3
    else:
        assert whole["choices"][0]["text"] == "prompt a b c"
        assert logprobs["tokens"] == [" a", " b", " c"]
        assert logprobs["text_offset"] == [6, 8, 10]
        assert all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_a_tool_call_stream_waits_once_per_token_position() -> None:
    choices = [Choice([" a", " b"], "stop")]
    shape = output_shape("chat", {"tools": TOOLS})
    events = render_stream_events("chat", "id", 0, "m", choices, None, shape)
    # role, name, then the arguments of positions 0 and 1
    assert token_steps("chat", choices, shape) == {3: 1}
    assert b'"arguments":" b"' in events[3]
