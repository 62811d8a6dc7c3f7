from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.policy.errors import BudgetExhausted, RateLimitExceeded
from proxy.settings import ConfigError, load_settings, parse_settings
from proxy.wire import (
    MAX_N,
    MAX_NESTING,
    expected_choices,
    generated_sequences,
    last_user_text,
    parse_request,
    text_of,
)


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


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
        ([{"type": "text", "text": None}], "messages[0].content[0].text"),
        ([{"type": "text"}], "messages[0].content[0].text"),
        (["hello"], "messages[0].content[0]"),
        ([{"text": "hi"}], "messages[0].content[0].type"),
        ([{"type": 3, "text": "hi"}], "messages[0].content[0].type"),
        (7, "messages[0].content"),
    ],
)
def test_content_parts_are_checked(content: object, param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps(body), "chat")
    assert err.value.param == param


@pytest.mark.parametrize("role", ["user", "system", "developer"])
def test_a_turn_that_asks_or_instructs_needs_content(role: str) -> None:
    for message in ({"role": role}, {"role": role, "content": None}):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, message]}
        with pytest.raises(InvalidRequest, match="Missing required parameter") as err:
            parse_request(orjson.dumps(body), "chat")
        assert err.value.param == "messages[1].content"


def test_an_assistant_turn_may_carry_only_tool_calls() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    parse_request(orjson.dumps({"model": "m", "messages": messages}), "chat")


@pytest.mark.parametrize("stop", [5, ["a", 5], {"a": 1}, True])
def test_stop_is_a_string_or_strings(stop: object) -> None:
    body = {"model": "m", "prompt": "p", "stop": stop}
    with pytest.raises(InvalidRequest, match="'stop' must be") as err:
        parse_request(orjson.dumps(body), "completion")
    assert err.value.param == "stop"
    for good in ("\n", ["\n", "END"], [], None):
        parse_request(orjson.dumps({**body, "stop": good}), "completion")


def test_content_parts_the_proxy_does_not_read_pass_through() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"type": "text", "text": "what is this?"}, image, {"type": "input_audio"}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    req = parse_request(orjson.dumps(body), "chat")
    assert req.body["messages"][0]["content"] == parts
    assert last_user_text(req) == "what is this?"


def test_text_of_skips_text_that_is_not_a_string() -> None:
    parts = [{"type": "text", "text": 5}, {"type": "text", "text": None}, {"type": "text"}]
    assert text_of([*parts, {"type": "text", "text": "ok"}]) == "ok"


def test_stream_options_need_stream() -> None:
    body = {"model": "m", "prompt": "p", "stream_options": {"include_usage": True}}
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps(body), "completion")
    assert err.value.param == "stream_options"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"stream": "yes"}, "'stream' must be a boolean."),
        ({"stream": True, "stream_options": "x"}, "'stream_options' must be an object."),
    ],
)
def test_a_field_of_the_wrong_type_is_named_in_plain_english(
    body: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps({"model": "m", "prompt": "p", **body}), "completion")
    assert err.value.message == message


def test_a_utf8_byte_order_mark_before_the_body_is_ignored() -> None:
    """Editors on Windows save JSON files with one; vLLM's parser (Python's json on bytes)
    skips it, so the proxy must not refuse what the engine would answer."""
    raw = b'\xef\xbb\xbf{"model": "m", "prompt": "p"}'
    req = parse_request(raw, "completion")
    assert (req.model, req.body["prompt"]) == ("m", "p")
    assert req.encoded() == raw[3:]  # the engine gets the body without it


@pytest.mark.parametrize("value", ["false", "true", 0, 1, {}])
def test_include_usage_must_be_a_boolean(value: object) -> None:
    body = {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": value}}
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps(body), "completion")
    assert err.value.param == "stream_options.include_usage"


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), (None, False)])
def test_include_usage_as_a_boolean_or_null(value: object, expected: bool) -> None:
    body = {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": value}}
    assert parse_request(orjson.dumps(body), "completion").include_usage is expected


@pytest.mark.parametrize("bad", [-1, 0, "10", 1.5, True])
def test_max_tokens_is_checked_beside_max_completion_tokens(bad: object) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps({**chat, "max_completion_tokens": 5, "max_tokens": bad}), "chat")
    assert err.value.param == "max_tokens"
    req = parse_request(orjson.dumps({**chat, "max_completion_tokens": 5, "max_tokens": 9}), "chat")
    assert req.max_tokens == 5  # the newer name is the one read


@pytest.mark.parametrize(
    ("kind", "fields", "choices"),
    [
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, 1),
        ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 3),
        ("completion", {"prompt": "hi", "n": 2}, 2),
        ("completion", {"prompt": [1, 2, 3], "n": 2}, 2),  # token ids: one prompt
        ("completion", {"prompt": ["a", "b"]}, 2),
        ("completion", {"prompt": [[1], [2], [3]], "n": 2}, 6),
    ],
)
def test_expected_choices_count_n_per_prompt(
    kind: str, fields: dict[str, object], choices: int
) -> None:
    raw = orjson.dumps({"model": "m", **fields})
    assert expected_choices(parse_request(raw, kind)) == choices  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "fields", "sequences", "choices"),
    [
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, 1, 1),
        ("chat", {"messages": [{"role": "user", "content": "hi"}], "best_of": 4}, 4, 1),
        ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 3, "best_of": 3}, 3, 3),
        ("completion", {"prompt": "hi", "n": 2, "best_of": 5}, 5, 2),
        ("completion", {"prompt": "hi", "n": 2}, 2, 2),
        ("completion", {"prompt": ["a", "b"], "best_of": 3}, 6, 2),
        ("completion", {"prompt": [[1], [2], [3]], "n": 2, "best_of": 4}, 12, 6),
    ],
)
def test_the_engine_generates_the_larger_of_n_and_best_of_per_prompt(
    kind: str, fields: dict[str, object], sequences: int, choices: int
) -> None:
    """vLLM samples best_of sequences and returns the n best: each may use all of max_tokens, so
    the budget's worst case counts them all; the answer still has n choices per prompt."""
    req = parse_request(orjson.dumps({"model": "m", **fields}), kind)  # type: ignore[arg-type]
    assert generated_sequences(req) == sequences
    assert expected_choices(req) == choices


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"best_of": 0}, "'best_of' must be a positive integer."),
        ({"best_of": -1}, "'best_of' must be a positive integer."),
        ({"best_of": "4"}, "'best_of' must be a positive integer."),
        ({"best_of": 2.5}, "'best_of' must be a positive integer."),
        ({"best_of": True}, "'best_of' must be a positive integer."),
        ({"n": 3, "best_of": 2}, "'best_of' must be at least 'n' (3), got 2."),
        ({"best_of": MAX_N + 1}, f"'best_of' must be at most {MAX_N}, got {MAX_N + 1}."),
        ({"n": 2, "best_of": 10**9}, f"'best_of' must be at most {MAX_N}, got {10**9}."),
    ],
)
def test_best_of_is_an_integer_from_n_to_the_maximum(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps({"model": "m", "prompt": "p", **fields}), "completion")
    assert (err.value.message, err.value.param) == (message, "best_of")


@pytest.mark.parametrize("fields", [{"best_of": None}, {"best_of": 1}, {"n": 2, "best_of": MAX_N}])
def test_best_of_within_bounds_passes_untouched(fields: dict[str, object]) -> None:
    raw = orjson.dumps({"model": "m", "prompt": "p", **fields})
    req = parse_request(raw, "completion")
    assert req.encoded() == raw


@pytest.mark.parametrize("prompt", [[[1, "a"]], [[1, 2], [True]], [[1], []], [[1], "a"], [1, "a"]])
def test_token_id_prompts_hold_only_integers(prompt: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request(orjson.dumps({"model": "m", "prompt": prompt}), "completion")
    assert err.value.param == "prompt"


@pytest.mark.parametrize("prompt", ["p", ["a", "b"], [1, 2], [[1, 2], [3]]])
def test_prompt_shapes_that_pass(prompt: object) -> None:
    assert parse_request(orjson.dumps({"model": "m", "prompt": prompt}), "completion")


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


@pytest.mark.parametrize(
    ("depth", "ok"), [(MAX_NESTING - 2, True), (MAX_NESTING - 1, False), (900, False)]
)
def test_a_body_is_nested_no_deeper_than_the_proxy_can_write(depth: int, ok: bool) -> None:
    # the body and its metadata object are two of the levels
    raw = b'{"model":"m","prompt":"p","metadata":{"x":%s}}' % (b"[" * depth + b"]" * depth)
    if ok:
        assert orjson.dumps(parse_request(raw, "completion").body)
        return
    with pytest.raises(InvalidRequest, match="nests arrays and objects too deeply"):
        parse_request(raw, "completion")


def test_many_shallow_brackets_are_not_too_deep() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * 500
    assert parse_request(orjson.dumps({"model": "m", "messages": messages}), "chat")


@pytest.mark.parametrize(("n", "ok"), [(MAX_N, True), (MAX_N + 1, False), (10**9, False)])
def test_n_is_at_most_openai_s_maximum(n: int, ok: bool) -> None:
    raw = orjson.dumps({"model": "m", "prompt": "p", "n": n})
    if ok:
        assert parse_request(raw, "completion").body["n"] == n
        return
    with pytest.raises(InvalidRequest, match=f"at most {MAX_N}") as err:
        parse_request(raw, "completion")
    assert err.value.param == "n"


def test_error_bodies_and_retry_after() -> None:
    err = RateLimitExceeded("slow down", retry_after=1.2)
    assert err.headers["Retry-After"] == "2"
    assert orjson.loads(err.to_json())["error"]["code"] == "rate_limit_exceeded"
    quota = BudgetExhausted("spent")
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
    # no drain by default: a stop closes the listener at once, as before drain_delay_s existed
    assert settings.server.drain_delay_s == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "cache: {enabeld: true}\n", "c.yaml:3: cache.enabeld: unknown field"),
        (MINIMAL.replace("http://", "ftp://"), "engines.0.urls: Value error"),
        # (before: accepted, and every call to the replica failed at run time)
        (MINIMAL.replace("http://127.0.0.1:1", "http://"), "engines.0.urls: Value error"),
        (MINIMAL.replace("127.0.0.1:1", "127.0.0.1:99999"), "engines.0.urls: Value error"),
        (MINIMAL.replace("127.0.0.1:1", "gpu a:8000"), "engines.0.urls: Value error"),
        # (before: accepted; the password then showed in /metrics' replica label, the admin
        # API, the dashboard and the logs, and with api_key set every request was a 500)
        (
            MINIMAL.replace("127.0.0.1:1", "user:pw@127.0.0.1:1"),
            "c.yaml:2: engines.0.urls: Value error, 'http://user:***@127.0.0.1:1' has credentials",
        ),
        (
            MINIMAL.replace("}", ", canary: {version: v2, urls: ['http://u@h'], share: 0.1}}"),
            "engines.0.canary.urls: Value error, 'http://u@h' has credentials",
        ),
        (
            MINIMAL.replace("}", ", canary: {version: v2, urls: ['http://:80'], share: 0.1}}"),
            "engines.0.canary.urls: Value error",
        ),
        # (before: "c.yaml:1: (top level): Value error, ...")
        (
            MINIMAL + "  - {name: small, model: x, urls: ['http://h']}\n",
            "c.yaml:3: engines.1.name: engine name 'small' is used twice (also engines.0.name)",
        ),
        (
            MINIMAL + "  - {name: other, model: m, urls: ['http://h']}\n",
            "c.yaml:3: engines.1.model: engine model 'm' is used twice",
        ),
        (MINIMAL + "limits: {backend: redis}\n", "c.yaml:3: limits.backend: "),
        # (before: the config passed, and start-up ended in a ValueError traceback from redis-py)
        (
            MINIMAL + "redis: {url: 'redis://:pw@127.0.0.1:notaport/0'}\n",
            "c.yaml:3: redis.url: Value error, 'redis://:***@127.0.0.1:notaport/0' is not a valid",
        ),
        (MINIMAL + "redis: {url: 'redis://h:99999'}\n", "redis.url: Value error, 'redis://h:99"),
        (
            MINIMAL + "redis: {url: 'redis://h/0?socket_timeout=x'}\n",
            "redis.url: Value error, 'redis://h/0?socket_timeout=x' is not a valid Redis URL",
        ),
        ("engines: []\n", "engines: List should have at least 1 item"),
        ("- a\n", "the top level must be a mapping"),
        # (before: 'c.yaml: not valid YAML: while parsing ... in "<unicode string>", line 2')
        ("engines: [\n", "c.yaml:2: not valid YAML: expected the node content"),
        (MINIMAL + "cache: 'x\n", "c.yaml:4: not valid YAML: found unexpected end of stream"),
        (
            MINIMAL.replace("model: m", "model: auto"),
            "c.yaml:2: engines.0.model: 'auto' is the virtual routed model",
        ),
        (MINIMAL.replace("model: m", "model: 'my model'"), "engines.0.model: String should"),
        (
            MINIMAL + "health: {version_interval_s: 0}\n",
            "c.yaml:3: health.version_interval_s: Input should be greater than 0",
        ),
        (
            MINIMAL + "server: {drain_delay_s: -1}\n",
            "c.yaml:3: server.drain_delay_s: Input should be greater than or equal to 0",
        ),
        # (an endless drain would be a stop that never comes)
        (MINIMAL + "server: {drain_delay_s: .inf}\n", "c.yaml:3: server.drain_delay_s: Input"),
        (MINIMAL + "server: {drain_delay_s: 5s}\n", "c.yaml:3: server.drain_delay_s: Input"),
        # (before: the second `server:` silently replaced the first)
        (
            "server: {port: 9000}\n" + MINIMAL + "server: {port: 9001}\n",
            "c.yaml:4: server: duplicate",
        ),
        (
            MINIMAL + "cache: {enabled: true, enabled: false}\n",
            "c.yaml:3: cache.enabled: duplicate",
        ),
    ],
)
def test_config_errors_name_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(text, source="c.yaml")
    assert expected in str(err.value)
    assert "c.yaml" in str(err.value)
    assert "pw@" not in str(err.value)
    assert "<unicode string>" not in str(err.value)


def test_relative_policies_resolve_next_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "frugal.yaml"
    path.write_text(MINIMAL + "policies: tiers\n")
    assert load_settings(path).policies == tmp_path / "tiers"
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_a_config_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    # (before: a UnicodeDecodeError traceback)
    path = tmp_path / "frugal.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}:3: not UTF-8 text")


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


def test_a_hugging_face_model_id_is_a_model_name() -> None:
    # vLLM serves a model under its Hugging Face id unless told otherwise
    settings = parse_settings(MINIMAL.replace("model: m", "model: Qwen/Qwen2.5-0.5B-Instruct"))
    assert settings.engines[0].model == "Qwen/Qwen2.5-0.5B-Instruct"
