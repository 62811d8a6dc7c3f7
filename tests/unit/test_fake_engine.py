"""The fake engine's pure parts: request checks and error bodies (its HTTP behaviour is in
tests/integration/test_fake_engine.py)."""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.engines.fake import (
    BadRequest,
    Choice,
    FakeCounters,
    add_cli_arguments,
    check_request,
    error_body,
    render_metrics,
    render_stream_events,
    token_steps,
)
from proxy.pipeline import openai_error_body


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
