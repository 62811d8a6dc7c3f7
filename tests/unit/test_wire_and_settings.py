from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest, QuotaExceeded, RateLimited
from proxy.settings import ConfigError, load_settings, parse_settings
from proxy.wire import last_user_text, parse_request


def test_parse_keeps_raw_bytes_until_modified() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": 1}'
    req = parse_request(raw, "chat")
    assert req.encoded() is raw
    req.set("model", "n")
    assert orjson.loads(req.encoded())["model"] == "n"
    assert orjson.loads(req.encoded())["x"] == 1


def test_determinism() -> None:
    base = {"model": "m", "prompt": "p"}
    assert not parse_request(orjson.dumps(base), "completion").deterministic  # default temp is 1
    assert parse_request(orjson.dumps({**base, "temperature": 0}), "completion").deterministic
    assert parse_request(orjson.dumps({**base, "seed": 3}), "completion").deterministic


def test_last_user_text_reads_content_parts() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ],
    }
    assert last_user_text(parse_request(orjson.dumps(body), "chat")) == "second"


def test_stream_options_need_stream() -> None:
    body = {"model": "m", "prompt": "p", "stream_options": {"include_usage": True}}
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps(body), "completion")
    assert err.value.param == "stream_options"


@given(
    st.dictionaries(
        st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=4
    )
)
def test_parse_never_crashes_with_anything_but_invalid_request(extra: dict[str, object]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}
    try:
        parse_request(orjson.dumps(body), "chat")
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message


def test_error_bodies_and_retry_after() -> None:
    err = RateLimited("slow down", retry_after_s=1.2)
    assert err.headers["Retry-After"] == "2"
    assert orjson.loads(err.to_json())["error"]["code"] == "rate_limit_exceeded"
    quota = QuotaExceeded("spent")
    assert quota.status == 429 and quota.body()["error"]["code"] == "insufficient_quota"
    sse = quota.to_sse()
    assert sse.endswith(b"data: [DONE]\n\n") and sse.startswith(b'data: {"error"')


MINIMAL = "engines:\n  - {name: small, model: m, urls: ['http://127.0.0.1:1']}\n"


def test_minimal_config_and_defaults() -> None:
    settings = parse_settings(MINIMAL)
    assert settings.server.port == 8000
    assert settings.engines[0].version == "auto"
    assert settings.health.version_interval_s == 30.0
    assert settings.cache.enabled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "cache: {enabeld: true}\n", "c.yaml:3: cache.enabeld: unknown field"),
        (MINIMAL.replace("http://", "ftp://"), "engines.0.urls: Value error"),
        (
            MINIMAL + "  - {name: small, model: x, urls: ['http://h']}\n",
            "name 'small' is used twice",
        ),
        ("engines: []\n", "engines: List should have at least 1 item"),
        ("- a\n", "the top level must be a mapping"),
        ("engines: [\n", "not valid YAML"),
        (MINIMAL.replace("model: m", "model: auto"), "virtual routed model"),
        (
            MINIMAL + "health: {version_interval_s: 0}\n",
            "c.yaml:3: health.version_interval_s: Input should be greater than 0",
        ),
    ],
)
def test_config_errors_name_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(text, source="c.yaml")
    assert expected in str(err.value)
    assert "c.yaml" in str(err.value)


def test_relative_policies_resolve_next_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "frugal.yaml"
    path.write_text(MINIMAL + "policies: tiers\n")
    assert load_settings(path).policies == tmp_path / "tiers"
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_a_conversation_keeps_its_prefix_across_turns() -> None:
    from proxy.wire import conversation_prefix

    def prefix(messages: list[dict[str, str]]) -> bytes:
        return conversation_prefix(
            parse_request(orjson.dumps({"model": "m", "messages": messages}), "chat")
        )

    for opening in ([], [{"role": "system", "content": "be brief"}]):
        first = [*opening, {"role": "user", "content": "hello"}]
        later = [
            *first,
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "more"},
        ]
        assert prefix(first) == prefix(later)
        other = [*opening, {"role": "user", "content": "another conversation"}]
        assert prefix(other) != prefix(first)
