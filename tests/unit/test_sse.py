from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.sse import DONE_EVENT, SSEParser, encode_all, frame, parse_all

payload = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"\n" not in b and b"\r" not in b and not b.startswith(b" ")
)


@given(st.lists(payload, max_size=20), st.data())
def test_any_chunking_yields_the_same_payloads(payloads: list[bytes], data: st.DataObject) -> None:
    raw = encode_all(payloads) + DONE_EVENT
    parser = SSEParser()
    assert fed_in_pieces(parser, raw, data) == [*payloads, b"[DONE]"]
    assert parser.pending == b""


def fed_in_pieces(parser: SSEParser, raw: bytes, data: st.DataObject) -> list[bytes]:
    """The payloads ``parser`` gives for ``raw`` cut into reads at drawn places."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(raw)]:
        out += parser.feed(raw[start:cut])
        start = cut
    return out


line = st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b)
multiline = st.lists(line, min_size=1, max_size=3).map(b"\n".join)


@given(st.lists(multiline, max_size=8), st.booleans(), st.data())
def test_framed_multiline_payloads_survive_any_chunking_and_line_endings(
    payloads: list[bytes], crlf: bool, data: st.DataObject
) -> None:
    raw = encode_all(payloads) + DONE_EVENT
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")  # a \r\n may now be cut between two reads
    parser = SSEParser()
    assert fed_in_pieces(parser, raw, data) + parser.flush() == [*payloads, b"[DONE]"]


def test_crlf_comments_and_other_fields() -> None:
    raw = b': keep-alive\r\n\r\nevent: x\r\ndata: {"a":1}\r\n\r\nid: 3\ndata: [DONE]\n\n'
    assert parse_all(raw) == [b'{"a":1}', b"[DONE]"]


def test_multiline_data_is_joined_and_unterminated_event_flushed() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\ndata: b\n\ndata: tail") == [b"a\nb"]
    assert parser.flush() == [b"tail"]


def test_frame() -> None:
    assert frame(b"{}") == b"data: {}\n\n"
    assert frame(b'{"a":\n1}') == b'data: {"a":\ndata: 1}\n\n'  # one data line per line
