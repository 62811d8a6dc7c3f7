"""Structured logging: structlog with JSON lines (orjson) by default, a console renderer for people.

    configure_logging(json=True, level="INFO")
    log = structlog.get_logger("frugal.access")
    log.info("request", **access_log_fields(request_id="r1", ...))

One access line per request, event ``"request"``, with the fields of ``access_log_fields``.
Prompts and answers never reach a log line above DEBUG: ``drop_content`` removes keys named like
request or response text (``prompt``, ``messages``, ``content``, ``answer``, ...) at INFO and
above, at any depth of nested dicts and lists. At DEBUG they pass, for local troubleshooting.

Library loggers (aiohttp, asyncio, ...) go through the same renderer via the stdlib root handler.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Mapping, MutableMapping
from typing import IO, Any, BinaryIO, Final, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

CONTENT_KEYS: Final = frozenset(
    {"prompt", "prompts", "messages", "content", "answer", "completion", "choices", "input"}
)
ACCESS_EVENT: Final = "request"

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


def level_number(level: str) -> int:
    """``"info"`` / ``"INFO"`` -> ``logging.INFO``; unknown names raise ValueError."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}") from None


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _without_keys(value: Any, keys: Collection[str]) -> Any:
    if type(value) in _SCALARS:
        return value
    if isinstance(value, Mapping):
        return {k: _without_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list | tuple):
        return [_without_keys(v, keys) for v in value]
    return value


def _needs_scrub(value: Any) -> bool:
    # Exact-type fast path: an isinstance check against the Mapping ABC costs ~10 µs per line.
    if type(value) in _SCALARS:
        return False
    return isinstance(value, Mapping | list | tuple)


class DropContent:
    """structlog processor: drop prompt/answer keys from events logged at ``min_level`` or above.

    Nested dicts and lists are rebuilt without those keys too (only when a value is a container,
    so flat access lines cost one set lookup per key).
    """

    def __init__(
        self, *, min_level: int = logging.INFO, keys: Collection[str] = CONTENT_KEYS
    ) -> None:
        self.min_level = min_level
        self.keys = frozenset(keys)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if _LEVELS.get(method_name, logging.CRITICAL) < self.min_level:
            return event_dict
        for key in self.keys.intersection(event_dict):
            del event_dict[key]
        for key, value in event_dict.items():
            if type(value) not in _SCALARS and _needs_scrub(value):
                event_dict[key] = _without_keys(value, self.keys)
        return event_dict


drop_content: Final = DropContent()


def _orjson_dumps(event_dict: MutableMapping[str, Any], **_: Any) -> bytes:
    # default=str: a stray non-JSON value (a Path, an exception) must not kill the log line.
    return orjson.dumps(event_dict, default=str)


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_content,
    ]


def configure_logging(
    *, json: bool = True, level: str = "INFO", stream: IO[Any] | None = None
) -> None:
    """Configure structlog (and the stdlib root logger) once, at process start.

    ``json=True`` writes one orjson-encoded line per event to ``stream`` (a binary stream;
    default stdout's buffer). ``json=False`` renders readable, coloured lines when ``stream`` is a
    terminal (text stream; default stderr).
    """
    threshold = level_number(level)
    shared = _shared_processors()
    renderer: Processor
    logger_factory: Any
    if json:
        out = stream if stream is not None else sys.stdout.buffer
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        # Tracebacks without each frame's local variables: those hold prompts and answers.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        tail: list[Processor] = [tracebacks, renderer]
        logger_factory = structlog.BytesLoggerFactory(cast(BinaryIO, out))
    else:
        out = stream if stream is not None else sys.stderr
        colors = bool(getattr(out, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
        tail = [renderer]
        logger_factory = structlog.PrintLoggerFactory(cast(TextIO, out))

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(shared, threshold, json=json, stream=out)


def _route_stdlib_logging(
    shared: list[Processor], threshold: int, *, json: bool, stream: IO[Any]
) -> None:
    """Send library log records through the same processors and renderer."""
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    formatter = structlog.stdlib.ProcessorFormatter(
        # ExtraAdder: a stdlib record's ``extra=`` fields (why a backend is down, which engine, the
        # retry delay) become fields of the line, and drop_content still sees them
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            *shared,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(_TextView(stream) if json else stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(threshold)


def _orjson_text_dumps(event_dict: MutableMapping[str, Any], **_: Any) -> str:
    return orjson.dumps(event_dict, default=str).decode()


class _TextView:
    """A text ``write`` onto a binary stream, for the stdlib handler in JSON mode."""

    def __init__(self, binary: IO[Any]) -> None:
        self._binary = binary

    def write(self, text: str) -> int:
        return int(self._binary.write(text.encode()))

    def flush(self) -> None:
        self._binary.flush()


def access_log_fields(
    *,
    request_id: str,
    method: str,
    path: str,
    status: int,
    tier: str,
    engine: str,
    model_version: str,
    cache: str,
    route_reason: str,
    route_score: float | None,
    tokens_in: int,
    tokens_out: int,
    latency_s: float,
    ttft_s: float | None,
    overhead_s: float | None,
    cost_usd: float,
    saved_usd: float,
    stream: bool,
    error: str | None = None,
) -> dict[str, Any]:
    """The fields of the one access line per request (log it as event ``ACCESS_EVENT``).

    ``engine`` is where the answer came from (the routed engine, also for cache hits);
    ``cache`` is the outcome (``hit_exact``, ``hit_semantic``, ``miss``, ``bypass``, ...);
    ``route_reason``/``route_score`` are the router's decision. Times are in milliseconds.
    No prompt or answer text: those never go into access lines.
    """
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": status,
        "tier": tier,
        "engine": engine,
        "model_version": model_version,
        "cache": cache,
        "route_reason": route_reason,
        "route_score": None if route_score is None else round(route_score, 4),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "latency_ms": round(latency_s * 1000.0, 2),
        "ttft_ms": None if ttft_s is None else round(ttft_s * 1000.0, 2),
        "overhead_ms": None if overhead_s is None else round(overhead_s * 1000.0, 3),
        "cost_usd": round(cost_usd, 8),
        "saved_usd": round(saved_usd, 8),
        "stream": stream,
    }
    if error is not None:
        fields["error"] = error
    return fields
