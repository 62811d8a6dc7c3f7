"""The replay trace: one JSON object per line, an OpenAI request body plus metadata.

A line::

    {"id": "r000042", "t": 12.345, "endpoint": "chat", "body": {"model": "auto", "messages": [...]},
     "api_key": "sk-gold", "group": "q:1234", "kind": "paraphrase",
     "ref": {"weak": 0.0, "strong": 1.0}}

Only ``body`` is required. ``endpoint`` is ``chat`` or ``completions`` (inferred from the body
when absent); ``t`` is the arrival time in seconds from the start; ``group`` (alias ``label``)
names the question a request asks, so paraphrases share it and a cache hit across groups is a
false hit; ``ref`` holds reference quality scores per engine role or engine name. Other keys are
kept untouched in ``extra`` for whoever reads the trace next.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

Endpoint = Literal["chat", "completions"]

ENDPOINT_PATHS: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
}

_KNOWN_KEYS = frozenset({"id", "t", "endpoint", "body", "api_key", "group", "label", "kind", "ref"})


class TraceError(ValueError):
    """A malformed trace line; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    body: dict[str, Any]
    endpoint: Endpoint = "chat"
    id: str = ""
    t: float | None = None
    api_key: str | None = None
    group: str | None = None
    kind: str | None = None
    ref: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS[self.endpoint]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream", False))

    @property
    def sampled(self) -> bool:
        """Sampling makes an answer one draw among many: such requests should not be cache hits."""
        # OpenAI's default temperature is 1, so a body without one samples.
        temperature = self.body.get("temperature", 1.0)
        return isinstance(temperature, int | float) and temperature > 0


def parse_line(raw: str | bytes, index: int, where: str = "<trace>") -> TraceRequest:
    """Parse one trace line; ``where`` (file:line) goes into error messages."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Only the column: the decoder's own "line 2" (past the line's newline) would contradict
        # the file's line number in ``where``.
        column = min(exc.colno if exc.lineno == 1 else exc.pos + 1, len(raw.rstrip()) + 1)
        raise TraceError(f"{where}: not JSON ({exc.msg} at column {column})") from exc
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise TraceError(f"{where}: field 'body' must be an object (the OpenAI request body)")
    endpoint_raw = obj.get("endpoint") or _infer_endpoint(body)
    if endpoint_raw not in ("chat", "completions"):
        raise TraceError(f"{where}: field 'endpoint' must be 'chat' or 'completions'")
    endpoint: Endpoint = "chat" if endpoint_raw == "chat" else "completions"
    t = obj.get("t")
    if t is not None and (
        not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0
    ):
        raise TraceError(f"{where}: field 't' must be a non-negative number of seconds")
    ref_raw = obj.get("ref") or {}
    if not isinstance(ref_raw, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in ref_raw.values()
    ):
        raise TraceError(f"{where}: field 'ref' must map engine roles/names to numbers")
    group = obj.get("group", obj.get("label"))
    api_key = obj.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise TraceError(f"{where}: field 'api_key' must be a string")
    return TraceRequest(
        index=index,
        body=body,
        endpoint=endpoint,
        id=str(obj.get("id", index)),
        t=float(t) if t is not None else None,
        api_key=api_key,
        group=None if group is None else str(group),
        kind=None if obj.get("kind") is None else str(obj["kind"]),
        ref={str(k): float(v) for k, v in ref_raw.items()},
        extra={k: v for k, v in obj.items() if k not in _KNOWN_KEYS},
    )


def _infer_endpoint(body: dict[str, Any]) -> str:
    return "completions" if "prompt" in body and "messages" not in body else "chat"


def parse_lines(lines: Iterable[str | bytes], where: str = "<trace>") -> Iterator[TraceRequest]:
    index = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        yield parse_line(raw, index, f"{where}:{number}")
        index += 1


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a whole trace file (optionally only its first ``limit`` requests)."""
    out: list[TraceRequest] = []
    with path.open("rb") as handle:
        for request in parse_lines(handle, str(path)):
            if limit is not None and len(out) >= limit:
                break
            out.append(request)
    return out


def dump_line(request: TraceRequest) -> bytes:
    """The inverse of :func:`parse_line` (used by the trace generator and tests)."""
    obj: dict[str, Any] = {"id": request.id}
    if request.t is not None:
        obj["t"] = round(request.t, 4)
    obj["endpoint"] = request.endpoint
    obj["body"] = request.body
    if request.api_key is not None:
        obj["api_key"] = request.api_key
    if request.group is not None:
        obj["group"] = request.group
    if request.kind is not None:
        obj["kind"] = request.kind
    if request.ref:
        obj["ref"] = request.ref
    obj.update(request.extra)
    return orjson.dumps(obj)
