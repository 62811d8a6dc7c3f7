"""Server-sent events framing for OpenAI-style streams: pure functions, no I/O.

An OpenAI stream is a sequence of ``data: <json>\\n\\n`` events closed by ``data: [DONE]\\n\\n``.
vLLM sends exactly that; other servers may use ``\\r\\n`` or split an event across TCP reads, so
the parser buffers until it sees a blank line.
"""

from __future__ import annotations

from collections.abc import Iterable

DONE_PAYLOAD = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


def frame(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` (a JSON document, or ``[DONE]``). A payload of several
    lines (an engine's multi-line ``data``, joined by the parser) gets a ``data:`` per line."""
    if b"\n" in payload:
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: " + payload + b"\n\n"


class SSEParser:
    """Incremental parser: feed raw bytes as they arrive, get complete ``data`` payloads back.

    Only ``data:`` fields matter for OpenAI streams; comments (``:``) and other fields
    (``event:``, ``id:``, ``retry:``) are skipped. Multi-line data is joined with ``\\n`` as the
    SSE spec says.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk
        held = b""
        if b"\r" in data:
            if data.endswith(b"\r"):
                # maybe the first half of a \r\n split across reads: decide with the next read
                data, held = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = data.split(b"\n\n")
        self._buffer = events.pop() + held
        return [p for p in (_payload(e) for e in events) if p is not None]

    def flush(self) -> list[bytes]:
        """Payload of a last event that was not closed by a blank line (a truncated stream)."""
        rest, self._buffer = self._buffer, b""
        payload = _payload(rest.replace(b"\r", b"\n").strip(b"\n"))
        return [payload] if payload is not None else []

    @property
    def pending(self) -> bytes:
        return self._buffer


def _payload(event: bytes) -> bytes | None:
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    if not lines:
        return None
    return b"\n".join(lines)


def parse_all(raw: bytes) -> list[bytes]:
    """All payloads of a complete stream body (convenience for tests and the replay harness)."""
    parser = SSEParser()
    return parser.feed(raw) + parser.flush()


def encode_all(payloads: Iterable[bytes]) -> bytes:
    return b"".join(frame(p) for p in payloads)
