"""Replay a trace against a running proxy and measure what each request got.

Two layers: pure functions that turn a response (JSON body or SSE payloads) into an
:class:`Answer`, and the asyncio loop that paces requests, bounds concurrency and the whole run,
and records one :class:`~proxy.bench.summary.RequestResult` per request sent. Summaries are made
from those results by :mod:`proxy.bench.summary`.

Only loopback targets are accepted: the harness can send thousands of requests quickly, and an
operator's benchmark should never hit someone else's server by a typo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson
from tqdm import tqdm

from proxy.bench.summary import RequestResult
from proxy.bench.trace import TraceRequest
from proxy.sse import DONE_PAYLOAD, SSEParser

PaceMode = Literal["fast", "rate", "timed"]

CACHE_HEADER = "x-frugal-cache"
ROUTE_HEADER = "x-frugal-route"
ROUTE_REASON_HEADER = "x-frugal-route-reason"
ENGINE_HEADER = "x-frugal-engine"

# A rough tokens-per-character ratio for English, used only when a response carries no usage.
CHARS_PER_TOKEN = 4


class NotLoopbackError(ValueError):
    """The target URL is not on this machine."""


def check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash if its host is a loopback address, else raise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopbackError(f"{url!r} is not an http(s) URL")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise NotLoopbackError(
                f"{url!r}: the replay harness only targets loopback (127.0.0.0/8, ::1, localhost)"
            )
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Answer:
    """The part of a completion the harness measures."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def digest(self) -> str | None:
        """Fingerprint of the answer text: a cache hit returns the same text as its producer."""
        if not self.text:
            return None
        return hashlib.sha256(self.text.encode()).hexdigest()[:20]


def _choice_text(choice: Mapping[str, Any]) -> str:
    for container in ("message", "delta"):
        part = choice.get(container)
        if isinstance(part, Mapping):
            content = part.get("content")
            return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _choice_index(choice: Mapping[str, Any], position: int) -> int:
    index = choice.get("index")
    return index if isinstance(index, int) else position


def _usage(obj: Mapping[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    if not isinstance(usage, Mapping):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def _join_choices(parts: Mapping[int, list[str]]) -> str:
    # Choices are joined in index order with a separator that cannot occur in one choice's text.
    return "\x1e".join("".join(parts[i]) for i in sorted(parts))


def answer_from_body(raw: bytes) -> Answer:
    """Answer of a non-streamed completion (chat or text)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Answer("", error="bad-json")
    if not isinstance(obj, dict):
        return Answer("", error="bad-json")
    if "error" in obj:
        return Answer("", error="error-body")
    parts: dict[int, list[str]] = {}
    for position, choice in enumerate(obj.get("choices") or []):
        if isinstance(choice, dict):
            parts.setdefault(_choice_index(choice, position), []).append(_choice_text(choice))
    prompt, completion = _usage(obj)
    return Answer(_join_choices(parts), prompt, completion)


def answer_from_stream(payloads: Iterable[bytes]) -> Answer:
    """Answer of a streamed completion from its SSE ``data`` payloads, in order.

    A stream must end with ``[DONE]``; an error event or a missing ``[DONE]`` marks the answer
    as failed (the proxy reports mid-stream failures that way because the status is already 200).
    """
    parts: dict[int, list[str]] = {}
    prompt: int | None = None
    completion: int | None = None
    done = False
    for payload in payloads:
        if payload.strip() == DONE_PAYLOAD:
            done = True
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return Answer(_join_choices(parts), prompt, completion, error="bad-sse-json")
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            return Answer(_join_choices(parts), prompt, completion, error="stream-error")
        for position, choice in enumerate(obj.get("choices") or []):
            if isinstance(choice, dict):
                parts.setdefault(_choice_index(choice, position), []).append(_choice_text(choice))
        chunk_prompt, chunk_completion = _usage(obj)
        prompt = chunk_prompt if chunk_prompt is not None else prompt
        completion = chunk_completion if chunk_completion is not None else completion
    return Answer(
        _join_choices(parts), prompt, completion, error=None if done else "truncated-stream"
    )


def prompt_chars(body: Mapping[str, Any]) -> int:
    """Characters of prompt text in a request body (for estimating missing usage)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(
                len(part.get("text", ""))
                for part in content
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return total


def schedule(
    requests: Sequence[TraceRequest], mode: PaceMode, rate: float | None = None, speed: float = 1.0
) -> list[float]:
    """Send time (seconds from start) of each request.

    ``timed`` follows the trace's ``t`` (divided by ``speed``; a line without ``t`` goes with the
    line before it), ``rate`` spaces requests evenly at ``rate`` per second, ``fast`` sends as soon
    as the concurrency limit allows.
    """
    if mode == "fast":
        return [0.0] * len(requests)
    if mode == "rate":
        if rate is None or rate <= 0:
            raise ValueError("rate mode needs a positive rate")
        return [i / rate for i in range(len(requests))]
    if speed <= 0:
        raise ValueError("speed must be positive")
    out: list[float] = []
    last = 0.0
    for request in requests:
        last = max(last, request.t / speed) if request.t is not None else last
        out.append(last)
    return out


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    url: str
    mode: PaceMode = "fast"
    rate: float | None = None
    speed: float = 1.0
    concurrency: int = 16
    api_key: str | None = None
    model: str | None = None
    timeout_s: float = 120.0
    max_duration_s: float = 1800.0
    progress: bool = True


@dataclass(frozen=True, slots=True)
class ReplayRun:
    results: list[RequestResult]
    duration_s: float
    not_sent: int
    cancelled: int
    interrupted: bool = False  # stopped by Ctrl-C: the results are what finished before it


def _result(
    request: TraceRequest, started_s: float, status: int | None, **fields: Any
) -> RequestResult:
    return RequestResult(
        index=request.index,
        status=status,
        started_s=started_s,
        stream=request.stream,
        endpoint=request.endpoint,
        group=request.group,
        kind=request.kind,
        sampled=request.sampled,
        ref=dict(request.ref),
        **fields,
    )


async def send_one(
    session: aiohttp.ClientSession,
    request: TraceRequest,
    options: ReplayOptions,
    run_start: float,
) -> RequestResult:
    """Send one request, read its whole answer, and measure it."""
    loop = asyncio.get_running_loop()
    body = dict(request.body)
    if options.model is not None:
        body["model"] = options.model
    if body.get("stream") is True and "stream_options" not in body:
        # Without it a stream carries no usage and tokens and cost would be guessed from the
        # text's length; the proxy's cache key leaves stream_options out, so nothing else moves.
        body["stream_options"] = {"include_usage": True}
    headers = {"content-type": "application/json"}
    key = request.api_key or options.api_key
    if key:
        headers["authorization"] = f"Bearer {key}"
    start = loop.time()
    started_s = start - run_start
    ttft: float | None = None
    try:
        async with session.post(
            options.url + request.path,
            data=orjson.dumps(body),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=options.timeout_s),
        ) as response:
            meta = {
                "cache": response.headers.get(CACHE_HEADER),
                "route": response.headers.get(ROUTE_HEADER),
                "route_reason": response.headers.get(ROUTE_REASON_HEADER),
                "engine": response.headers.get(ENGINE_HEADER),
            }
            if response.status != 200:
                await response.read()
                return _result(
                    request, started_s, response.status, latency_s=loop.time() - start, **meta
                )
            if response.content_type == "text/event-stream":
                parser = SSEParser()
                payloads: list[bytes] = []
                async for chunk in response.content.iter_any():
                    fresh = parser.feed(chunk)
                    if ttft is None and any(_has_text(p) for p in fresh):
                        ttft = loop.time() - start
                    payloads.extend(fresh)
                payloads.extend(parser.flush())
                answer = answer_from_stream(payloads)
            else:
                answer = answer_from_body(await response.read())
    except TimeoutError:
        return _result(request, started_s, None, latency_s=None, error="timeout")
    except aiohttp.ClientError as exc:
        return _result(request, started_s, None, latency_s=None, error=type(exc).__name__)
    estimated = answer.prompt_tokens is None or answer.completion_tokens is None
    return _result(
        request,
        started_s,
        200,
        latency_s=loop.time() - start,
        ttft_s=ttft,
        error=answer.error,
        prompt_tokens=answer.prompt_tokens
        if answer.prompt_tokens is not None
        else prompt_chars(body) // CHARS_PER_TOKEN,
        completion_tokens=answer.completion_tokens
        if answer.completion_tokens is not None
        else len(answer.text) // CHARS_PER_TOKEN,
        usage_estimated=estimated,
        answer_digest=answer.digest,
        **meta,
    )


def _has_text(payload: bytes) -> bool:
    """Does this SSE payload carry answer text (the first such one marks the TTFT)?"""
    if payload.strip() == DONE_PAYLOAD:
        return False
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    choices = obj.get("choices") if isinstance(obj, dict) else None
    return any(isinstance(c, dict) and _choice_text(c) for c in choices or [])


async def replay(requests: Sequence[TraceRequest], options: ReplayOptions) -> ReplayRun:
    """Replay ``requests`` in order; bounded by ``max_duration_s`` and per-request timeouts.

    Requests still in flight at the deadline are cancelled and left out; requests not yet sent
    are counted in ``not_sent``. Ctrl-C (``asyncio.run`` cancels this task) ends the run the same
    way, with ``interrupted`` set, so a long run stopped by hand keeps what it measured.
    """
    check_loopback(options.url)
    times = schedule(requests, options.mode, options.rate, options.speed)
    loop = asyncio.get_running_loop()
    results: list[RequestResult] = []
    slots = asyncio.Semaphore(max(1, options.concurrency))
    tasks: set[asyncio.Task[None]] = set()
    sent = 0
    interrupted = False
    bar = tqdm(total=len(requests), disable=not options.progress, unit="req", dynamic_ncols=True)

    async def run_one(session: aiohttp.ClientSession, request: TraceRequest, at: float) -> None:
        try:
            result = await send_one(session, request, options, run_start)
            if options.mode != "fast":  # with no plan there is nothing to be late for
                result = dataclasses.replace(result, lag_s=max(0.0, result.started_s - at))
        except Exception as exc:
            # One malformed response must not end the whole run: it is counted as a failed
            # request, named by the exception type.
            result = _result(
                request, loop.time() - run_start, None, latency_s=None, error=type(exc).__name__
            )
        finally:
            slots.release()
        results.append(result)
        bar.update(1)

    connector = aiohttp.TCPConnector(limit=max(1, options.concurrency))
    run_start = loop.time()
    deadline = run_start + options.max_duration_s
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with asyncio.timeout_at(deadline):
                for request, at in zip(requests, times, strict=True):
                    delay = run_start + at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await slots.acquire()
                    task = asyncio.create_task(run_one(session, request, at))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                if tasks:
                    await asyncio.gather(*tasks)
        except TimeoutError:
            await _cancel_all(tasks)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.uncancel() > 0:
                raise  # an outer cancellation besides the Ctrl-C one: not ours to swallow
            # Ctrl-C: keep what finished (asyncio.run returns this value instead of raising).
            interrupted = True
            await _cancel_all(tasks)
        finally:
            bar.close()
    duration = loop.time() - run_start
    results.sort(key=lambda r: r.index)
    return ReplayRun(results, duration, len(requests) - sent, sent - len(results), interrupted)


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
