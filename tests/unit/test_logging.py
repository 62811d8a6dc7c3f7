from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from proxy.observability.logging import (
    ACCESS_EVENT,
    CONTENT_KEYS,
    DropContent,
    access_log_fields,
    configure_logging,
    level_number,
)


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers = []


def lines(buffer: io.BytesIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines() if line]


def access_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "tier": "free",
        "engine": "small",
        "model_version": "small@abc123",
        "cache": "hit_semantic",
        "route_reason": "score_below_threshold",
        "route_score": 0.123456,
        "tokens_in": 12,
        "tokens_out": 40,
        "latency_s": 0.012345,
        "ttft_s": 0.003,
        "overhead_s": 0.00012,
        "cost_usd": 0.0,
        "saved_usd": 0.002,
        "stream": True,
    }
    fields.update(overrides)
    return access_log_fields(**fields)


def test_json_lines_carry_access_fields_without_prompt_or_answer() -> None:
    out = io.BytesIO()
    configure_logging(json=True, level="INFO", stream=out)
    log = structlog.get_logger("frugal.access")
    log.info(
        ACCESS_EVENT,
        **access_fields(),
        prompt="what is my password",
        messages=[{"role": "user", "content": "secret question"}],
        answer="secret answer",
    )
    [line] = lines(out)
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["request_id"] == "req-1"
    assert line["latency_ms"] == 12.35
    assert line["overhead_ms"] == 0.12
    assert line["route_score"] == 0.1235
    assert {"prompt", "messages", "answer"}.isdisjoint(line)
    raw = out.getvalue()
    assert b"secret" not in raw and b"password" not in raw


def test_debug_lines_keep_content_and_info_threshold_hides_debug() -> None:
    out = io.BytesIO()
    configure_logging(json=True, level="DEBUG", stream=out)
    structlog.get_logger().debug("upstream body", prompt="hello there")
    structlog.get_logger().warning("odd body", body={"messages": [{"content": "hi"}], "n": 2})
    debug_line, warning_line = lines(out)
    assert debug_line["prompt"] == "hello there"
    assert warning_line["body"] == {"n": 2}

    quiet = io.BytesIO()
    configure_logging(json=True, level="INFO", stream=quiet)
    structlog.get_logger().debug("upstream body", prompt="hello there")
    assert quiet.getvalue() == b""


def test_stdlib_records_go_through_the_same_json_renderer() -> None:
    out = io.BytesIO()
    configure_logging(json=True, level="INFO", stream=out)
    logging.getLogger("aiohttp.server").warning("bad request line")
    [line] = lines(out)
    assert line["event"] == "bad request line"
    assert line["logger"] == "aiohttp.server"
    assert line["level"] == "warning"


def test_stdlib_records_keep_their_extra_fields_without_content() -> None:
    out = io.BytesIO()
    configure_logging(json=True, level="INFO", stream=out)
    logging.getLogger("proxy.cache.service").warning(
        "cache.backend.down",
        extra={"operation": "get", "error": "ConnectionError: refused", "prompt": "secret"},
    )
    [line] = lines(out)
    assert line["event"] == "cache.backend.down"
    assert line["operation"] == "get" and line["error"] == "ConnectionError: refused"
    assert "prompt" not in line  # (before: every extra field was lost, the reason with it)


def test_console_renderer_is_readable_text() -> None:
    out = io.StringIO()
    configure_logging(json=False, level="INFO", stream=out)
    structlog.get_logger().info("started", port=8080, content="never shown")
    text = out.getvalue()
    assert "started" in text and "port=8080" in text
    assert "never shown" not in text


def _failing_with_a_prompt_in_scope() -> BaseException:
    prompt = "my secret question"  # noqa: F841 - a local a traceback with locals would show
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("json", [True, False])
def test_tracebacks_show_no_local_variables(json: bool) -> None:
    out: io.BytesIO | io.StringIO = io.BytesIO() if json else io.StringIO()
    configure_logging(json=json, level="INFO", stream=out)
    structlog.get_logger().error("unexpected error", exc_info=_failing_with_a_prompt_in_scope())
    value = out.getvalue()
    text = value.decode() if isinstance(value, bytes) else value
    assert "RuntimeError" in text and "_failing_with_a_prompt_in_scope" in text
    assert "my secret question" not in text


def test_unknown_level_is_rejected() -> None:
    assert level_number("warning") == logging.WARNING
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(json=True, level="loud")


def test_access_fields_hold_no_text_and_optional_error() -> None:
    fields = access_fields(ttft_s=None, error="upstream_timeout")
    assert fields["ttft_ms"] is None
    assert fields["error"] == "upstream_timeout"
    assert CONTENT_KEYS.isdisjoint(fields)
    assert "error" not in access_fields()


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
key = st.sampled_from(sorted(CONTENT_KEYS)) | st.text(min_size=1, max_size=6)
json_tree = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(key, inner, max_size=3),
    max_leaves=15,
)


def keys_anywhere(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_anywhere(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_anywhere(v)}
    return set()


@given(st.dictionaries(key, json_tree, max_size=5))
def test_drop_content_leaves_no_content_key_at_any_depth(event: dict[str, Any]) -> None:
    scrubbed = DropContent()(None, "info", dict(event))
    assert CONTENT_KEYS.isdisjoint(keys_anywhere(scrubbed))
    # Keys that are not content survive at the top level.
    assert {k for k in event if k not in CONTENT_KEYS} == set(scrubbed)


@given(st.dictionaries(key, json_tree, max_size=5))
def test_drop_content_passes_debug_untouched(event: dict[str, Any]) -> None:
    assert DropContent()(None, "debug", dict(event)) == event


def test_json_access_line_timestamp_is_utc_iso_with_microseconds() -> None:
    import datetime as dt
    import time

    from proxy.observability.access import AccessLog

    out = io.BytesIO()
    access = AccessLog(json=True, stream=out)
    before = time.time()
    access.write({"request_id": "a"})
    access.write({"request_id": "b"})  # the cached second is reused
    after = time.time()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["a", "b"]
    for line in lines:
        stamp = line["timestamp"]
        assert stamp.endswith("Z") and len(stamp.split(".")[1]) == 7  # 6 digits + Z
        parsed = dt.datetime.fromisoformat(stamp[:-1]).replace(tzinfo=dt.UTC).timestamp()
        assert before - 1e-6 <= parsed <= after + 1e-6
