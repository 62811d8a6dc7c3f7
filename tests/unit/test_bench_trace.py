"""Trace line format: parsing, validation messages, round trip, and the committed small trace."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.bench.trace import (
    TraceError,
    TraceRequest,
    dump_line,
    load_trace,
    parse_line,
    parse_lines,
)

SMALL_TRACE = Path(__file__).resolve().parents[1] / "data" / "small_trace.jsonl"


def test_minimal_line_infers_endpoint() -> None:
    chat = parse_line(b'{"body": {"messages": [{"role": "user", "content": "hi"}]}}', 3)
    assert (chat.endpoint, chat.path, chat.index, chat.id, chat.t) == (
        "chat",
        "/v1/chat/completions",
        3,
        "3",
        None,
    )
    text = parse_line(b'{"body": {"prompt": "hi"}}', 0)
    assert text.endpoint == "completions"
    assert text.path == "/v1/completions"


def test_label_is_an_alias_of_group_and_unknown_keys_are_kept() -> None:
    request = parse_line(b'{"body": {}, "label": 7, "source": "qqp"}', 0)
    assert request.group == "7"
    assert request.extra == {"source": "qqp"}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"t": 1}', "'body'"),
        (b'{"body": {}, "endpoint": "embeddings"}', "'endpoint'"),
        (b'{"body": {}, "t": -1}', "'t'"),
        (b'{"body": {}, "t": true}', "'t'"),
        (b'{"body": {}, "ref": {"weak": "good"}}', "'ref'"),
        (b'{"body": {}, "api_key": 5}', "'api_key'"),
    ],
)
def test_bad_lines_name_the_place_and_field(line: bytes, complaint: str) -> None:
    with pytest.raises(TraceError) as caught:
        parse_line(line, 0, "trace.jsonl:12")
    assert "trace.jsonl:12" in str(caught.value)
    assert complaint in str(caught.value)


def test_a_cut_line_is_placed_by_its_file_line_and_column() -> None:
    cut = b'{"body": {"model": "m"}\n'  # the closing brace is missing
    with pytest.raises(TraceError) as caught:
        list(parse_lines([b'{"body": {}}\n', cut], "t.jsonl"))
    message = str(caught.value)
    assert message.startswith("t.jsonl:2: not JSON (")
    assert "at column 24" in message
    assert "line 2 column" not in message  # the decoder's own count, past the newline


def test_parse_lines_skips_blank_lines_and_counts_file_lines() -> None:
    lines = [b'{"body": {}}\n', b"\n", b'{"body": {}}\n', b"oops\n"]
    with pytest.raises(TraceError, match=r"t\.jsonl:4"):
        list(parse_lines(lines, "t.jsonl"))
    assert [r.index for r in parse_lines(lines[:3])] == [0, 1]


@pytest.mark.parametrize(
    ("body", "sampled"),
    [({}, True), ({"temperature": 0}, False), ({"temperature": 0.7}, True)],
)
def test_sampled_follows_openai_default_temperature(body: dict[str, float], sampled: bool) -> None:
    assert TraceRequest(index=0, body=body).sampled is sampled


@given(
    t=st.none() | st.floats(0, 1e6),
    group=st.none() | st.text(max_size=10),
    kind=st.none() | st.sampled_from(["question", "routing"]),
    api_key=st.none() | st.text(min_size=1, max_size=10),
    ref=st.dictionaries(st.sampled_from(["weak", "strong", "m"]), st.floats(0, 1)),
    stream=st.booleans(),
)
def test_dump_then_parse_round_trips(
    t: float | None,
    group: str | None,
    kind: str | None,
    api_key: str | None,
    ref: dict[str, float],
    stream: bool,
) -> None:
    original = TraceRequest(
        index=0,
        id="r1",
        t=t,
        body={"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": stream},
        group=group,
        kind=kind,
        api_key=api_key,
        ref=ref,
        extra={"source": "mock"},
    )
    parsed = parse_line(dump_line(original), 0)
    assert parsed.body == original.body
    assert (parsed.group, parsed.kind, parsed.api_key, parsed.ref, parsed.extra) == (
        group,
        kind,
        api_key,
        ref,
        {"source": "mock"},
    )
    assert parsed.stream is stream
    if t is None:
        assert parsed.t is None
    else:
        assert parsed.t == pytest.approx(t, abs=1e-4)


def test_committed_small_trace_is_valid_and_varied() -> None:
    requests = load_trace(SMALL_TRACE)
    assert len(requests) == 200
    times = [r.t for r in requests]
    assert all(t is not None for t in times)
    assert times == sorted(times)  # type: ignore[type-var]
    kinds = {r.kind for r in requests}
    assert {"question", "paraphrase", "routing", "followup"} <= kinds
    assert all(set(r.ref) == {"weak", "strong"} for r in requests if r.kind == "routing")
    assert all(r.group for r in requests)
    assert any(r.stream for r in requests) and any(not r.stream for r in requests)
    assert any(r.sampled for r in requests) and any(not r.sampled for r in requests)
    assert {r.endpoint for r in requests} == {"chat", "completions"}
    assert len(load_trace(SMALL_TRACE, limit=7)) == 7
    first = orjson.loads(SMALL_TRACE.read_bytes().splitlines()[0])
    assert first["id"] == requests[0].id
