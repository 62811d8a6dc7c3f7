"""A vLLM-shaped fake engine: the test double for integration tests and the benchmark target.

It speaks the parts of vLLM's OpenAI server that Frugal uses, with the same wire shapes:

- ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (SSE) or not, honouring
  ``max_tokens`` / ``max_completion_tokens``, ``n``, ``stop``, ``seed``, ``temperature`` and
  ``stream_options.include_usage``, and answering 400 for any of them of the wrong type; errors
  have vLLM's shape, ``{"error": {"message", "type", "param", "code"}}``;
- the output shapes a cache must replay faithfully (:class:`OutputShape`): a chat request with
  ``tools`` is answered with a tool call (vLLM's ``auto`` parser shape: ``content`` null and
  ``finish_reason`` ``tool_calls``; a named or ``required`` ``tool_choice``: ``content`` ``""``
  and the plain finish reason), streamed as vLLM streams it (``id``, ``type`` and
  ``function.name`` first, then ``function.arguments`` a token at a time, the closing piece in
  the finish chunk); ``logprobs`` / ``top_logprobs`` give per-token log-probabilities (chat's
  ``content`` list, completions' four lists); a completion's ``echo`` puts the prompt before the
  answer (without the prompt's log-probabilities);
- ``GET /v1/models`` (with ``root`` and ``max_model_len``), ``GET /health``, ``GET /metrics``
  (``vllm:num_requests_running`` / ``_waiting``, ``vllm:gpu_cache_usage_perc``,
  ``vllm:kv_cache_usage_perc``, token and request counters, labelled ``model_name``).

The generated text is deterministic for ``temperature == 0`` or a given ``seed``: a function of
the prompt (and seed, and choice index), so cache tests can tell answers apart. Otherwise it is
random.

Knobs for tests, settable at start (:class:`FakeEngineOptions`) and at run time with
``POST /fake/config`` (a JSON object of option fields; ``GET /fake/config`` reads them back):

- ``ttft_ms`` / ``tokens_per_s``: latency before the first token and between tokens, per
  choice (the ``n`` choices decode side by side), streamed or not;
- ``fail_status`` + ``fail_fraction``: answer that status (500/503, ...) to that fraction of
  completion requests;
- ``hang``: accept the request and send nothing until the client leaves or ``hang`` is turned off;
- ``end_after_chunks``: end a stream cleanly after that many SSE events, with no finish_reason and
  no ``[DONE]`` (as a load balancer that closes it early would); non-streamed requests are
  answered whole;
- ``abort_after_chunks``: close the connection abruptly after that many SSE events (non-streamed
  requests are cut before any byte);
- ``health_fail``: ``/health`` answers 503.

``GET /fake/requests`` returns what the engine received (method, path, headers with lower-case
names, body, outcome), the request count and how many requests ended because the client went
away (``aborted``), so tests can assert pass-through and upstream abort. ``POST /fake/reset``
clears them.

With no delay and no failure the hot path is plain orjson and one write per response: benchmarks
measure proxies against this engine, so it must cost as little as possible.

Usage::

    app = create_fake_engine_app(FakeEngineOptions(model="small", ttft_ms=20))
    run_fake_engine(FakeEngineOptions(model="small"), host="127.0.0.1", port=8101)
    # or: python -m proxy.engines.fake --port 8101 --model small --fail 503:0.2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import math
import random
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from proxy.cli import EXIT_RUNTIME, SERVER_EPILOG, ListenError, port_number
from proxy.sse import DONE_EVENT, frame

Endpoint = Literal["chat", "completions"]

# Fields of FakeEngineOptions that POST /fake/config may change; the rest shape the app's routes
# or identity and only make sense at start.
RUNTIME_FIELDS = frozenset(
    {
        "ttft_ms",
        "tokens_per_s",
        "completion_tokens",
        "fail_status",
        "fail_fraction",
        "hang",
        "abort_after_chunks",
        "end_after_chunks",
        "health_fail",
        "max_num_seqs",
    }
)

# A small vocabulary of whole words with their leading space, one word per "token".
# fmt: off
_VOCAB = (
    " the", " a", " an", " of", " to", " in", " on", " for", " with", " and", " or", " but",
    " not", " is", " are", " was", " be", " this", " that", " it", " as", " at", " by", " from",
    " cache", " answer", " model", " engine", " token", " stream", " fast", " slow", " small",
    " large", " route", " proxy", " request", " reply", " query", " result", " value", " number",
    " river", " mountain", " blue", " green", " red", " yellow", " paris", " london", " tokyo",
    " berlin", " seven", " eleven", " forty", " hundred", " first", " second", " last", " next",
    " before", " after", " always", " never",
)
# fmt: on


@dataclass(frozen=True, slots=True)
class FakeEngineOptions:
    """Everything that shapes the fake engine. Frozen: run-time changes replace the whole object."""

    model: str = "fake-model"
    root: str | None = None  # /v1/models "root" (vLLM: the model path); defaults to ``model``
    max_model_len: int = 4096
    completion_tokens: int = 16  # natural answer length when max_tokens allows it
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0  # per choice; 0 means no delay between tokens
    fail_status: int = 500
    fail_fraction: float = 0.0  # 1.0 fails every completion request
    hang: bool = False
    abort_after_chunks: int | None = None
    end_after_chunks: int | None = None
    health_fail: bool = False
    max_num_seqs: int = 256  # requests beyond it count as "waiting" in /metrics
    check_model: bool = True  # 404 for an unknown "model", like vLLM
    request_log_size: int = 1000
    rng_seed: int | None = None  # seeds failure draws and random text, for reproducible tests

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_fraction <= 1.0:
            raise ValueError(f"fail_fraction must be in [0, 1], got {self.fail_fraction}")
        # (NaN passes a ">= 0" test, and asyncio.sleep(nan) never wakes; inf is --fail hang)
        if not (0 <= self.ttft_ms < math.inf and 0 <= self.tokens_per_s < math.inf):
            raise ValueError("ttft_ms and tokens_per_s must be finite numbers >= 0")
        for name in ("hang", "health_fail"):
            if not isinstance(getattr(self, name), bool):  # POST /fake/config {"hang": "no"}
                raise ValueError(f"{name} must be true or false")
        for name in ("abort_after_chunks", "end_after_chunks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or null")
        if self.abort_after_chunks is not None and self.abort_after_chunks < 0:
            raise ValueError("abort_after_chunks must be >= 0")
        if self.end_after_chunks is not None and self.end_after_chunks < 0:
            raise ValueError("end_after_chunks must be >= 0")
        if self.completion_tokens < 1 or self.max_num_seqs < 1 or self.request_log_size < 0:
            raise ValueError("completion_tokens and max_num_seqs must be >= 1")

    @property
    def zero_delay(self) -> bool:
        return self.ttft_ms == 0 and self.tokens_per_s == 0


def parse_fail_spec(spec: str) -> dict[str, Any]:
    """Option overrides for a ``--fail`` value: comma-separated items, e.g. ``503:0.25,health``.

    - ``500`` / ``503`` (any status): fail every completion request with it; ``503:0.25`` a
      quarter of them;
    - ``hang``: never send the first byte;
    - ``abort:K``: cut the connection after K SSE events;
    - ``end:K``: end a stream cleanly after K SSE events, unfinished and without ``[DONE]``;
    - ``health``: ``/health`` fails.
    """
    overrides: dict[str, Any] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        head, _, arg = item.partition(":")
        if head.isdigit():
            if not 400 <= int(head) <= 599:
                raise ValueError(f"bad --fail item {item!r}: a failure status is 400-599")
            overrides["fail_status"] = int(head)
            overrides["fail_fraction"] = float(arg) if arg else 1.0
        elif head == "hang" and not arg:
            overrides["hang"] = True
        elif head == "abort" and arg.isdigit():
            overrides["abort_after_chunks"] = int(arg)
        elif head == "end" and arg.isdigit():
            overrides["end_after_chunks"] = int(arg)
        elif head == "health" and not arg:
            overrides["health_fail"] = True
        else:
            raise ValueError(
                f"bad --fail item {item!r}: expected STATUS[:FRACTION], hang, abort:K, end:K "
                "or health"
            )
    return overrides


def apply_overrides(options: FakeEngineOptions, overrides: dict[str, Any]) -> FakeEngineOptions:
    """``options`` with the run-time fields in ``overrides`` replaced; unknown fields are errors."""
    unknown = set(overrides) - RUNTIME_FIELDS
    if unknown:
        raise ValueError(f"fields not settable at run time: {sorted(unknown)}")
    return dataclasses.replace(options, **overrides)


# ---------------------------------------------------------------------------------------------
# Pure generation: prompt -> deterministic tokens


def prompt_texts(endpoint: Endpoint, body: dict[str, Any]) -> list[str]:
    """The texts the fake "reads", one per prompt: a completion may send several (an array of
    strings, or of token-id arrays), and vLLM answers each with ``n`` choices of its own."""
    prompt = body.get("prompt") if endpoint == "completions" else None
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [p if isinstance(p, str) else orjson.dumps(p).decode() for p in prompt]
    return [prompt_text(endpoint, body)]


def prompt_text(endpoint: Endpoint, body: dict[str, Any]) -> str:
    """The text the fake "reads": all message contents for chat, the prompt for completions."""
    if endpoint == "completions":
        prompt = body.get("prompt", "")
        return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
    parts: list[str] = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif content is not None:
            parts.append(orjson.dumps(content).decode())
    return "\n".join(parts)


def count_prompt_tokens(text: str) -> int:
    # A rough stand-in for a tokenizer: about four characters per token, at least one.
    return max(1, (len(text) + 3) // 4)


def is_deterministic(body: dict[str, Any]) -> bool:
    return body.get("seed") is not None or body.get("temperature") == 0


def generate_tokens(prompt: str, seed: int | None, index: int, length: int) -> list[str]:
    """``length`` word tokens, a pure function of (prompt, seed, choice index)."""
    digest = hashlib.blake2b(
        f"{seed}\x1f{index}\x1f{prompt}".encode(), digest_size=8, usedforsecurity=False
    ).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    return rng.choices(_VOCAB, k=length)


def apply_stop(tokens: list[str], stop: Sequence[str]) -> tuple[list[str], bool]:
    """Tokens up to (not including) the first one whose text completes a stop string.

    Rough, as the brief allows: the answer is cut at token granularity, not mid-token.
    """
    if not stop:
        return tokens, False
    text = ""
    for i, token in enumerate(tokens):
        text += token
        if any(s and s in text for s in stop):
            return tokens[:i], True
    return tokens, False


@dataclass(frozen=True, slots=True)
class Choice:
    tokens: list[str]
    finish_reason: str  # "stop" or "length"
    echo: str = ""  # a completion's prompt, when the request asked for ``echo``

    @property
    def text(self) -> str:
        return self.echo + "".join(self.tokens)


def plan_choices(
    body: dict[str, Any], prompt: str, options: FakeEngineOptions, rng: random.Random
) -> list[Choice]:
    """The answers to produce for one request (pure except for the ``rng`` of random answers).

    ``body`` has passed :func:`check_request`.
    """
    n = body.get("n") or 1
    # vLLM: max_completion_tokens wins, max_tokens is the older name.
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or options.completion_tokens
    length = min(limit, options.completion_tokens)
    natural_end = limit >= options.completion_tokens
    stop_field = body.get("stop")
    stop = [stop_field] if isinstance(stop_field, str) else list(stop_field or ())
    seed = body.get("seed")
    # vLLM's chat echo repeats an assistant turn's start; only the completion's is modelled
    echo = prompt if body.get("echo") is True and "prompt" in body else ""
    choices = []
    for index in range(n):
        if is_deterministic(body):
            tokens = generate_tokens(prompt, seed, index, length)
        else:
            tokens = rng.choices(_VOCAB, k=length)
        tokens, stopped = apply_stop(tokens, stop)
        choices.append(Choice(tokens, "stop" if stopped or natural_end else "length", echo))
    return choices


class BadRequest(ValueError):
    """A request the fake rejects with 400, like vLLM's validation errors; ``param`` names the
    field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_request(endpoint: Endpoint, body: Any) -> dict[str, Any]:
    """``body`` if every field the fake reads has a usable type, else :class:`BadRequest`.

    vLLM validates the request before generating and answers 400; a value of the wrong type must
    not reach generation and come back as a 500 (through the proxy, a 502 that counts against the
    replica). Stricter than vLLM's pydantic models, which also take ``"5"`` for an integer.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' is required and must be a list of objects", "messages")
    elif not isinstance(body.get("prompt"), (str, list)):
        raise BadRequest("'prompt' is required and must be a string or a list", "prompt")
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not _is_int(value) or value < 1):
            raise BadRequest(f"'{name}' must be an integer >= 1", name)
    if body.get("seed") is not None and not _is_int(body["seed"]):
        raise BadRequest("'seed' must be an integer", "seed")
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or temperature < 0):
        raise BadRequest("'temperature' must be a number >= 0", "temperature")
    stop = body.get("stop")
    if not (
        stop is None
        or isinstance(stop, str)
        or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not (
        isinstance(stream_options, dict)
        and isinstance(stream_options.get("include_usage", False), (bool, type(None)))
    ):
        message = "'stream_options' must be an object like {\"include_usage\": true}"
        raise BadRequest(message, "stream_options")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Pure rendering: vLLM wire shapes


@dataclass(frozen=True, slots=True)
class OutputShape:
    """What the request asks of the answer's shape besides its text (see the module doc)."""

    tool: str | None = None  # the function a chat answer calls
    auto_tool: bool = True  # vLLM's auto parser (else a named or required tool_choice)
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities

    @property
    def plain(self) -> bool:
        return self.tool is None and self.logprobs is None


PLAIN = OutputShape()


def output_shape(endpoint: Endpoint, body: dict[str, Any]) -> OutputShape:
    """The shape of the answer to ``body`` (lenient: a field it cannot read is left out)."""
    tool: str | None = None
    auto = True
    tools = body.get("tools") if endpoint == "chat" else None
    choice = body.get("tool_choice")
    if isinstance(tools, list) and tools and choice != "none":
        named = choice.get("function") if isinstance(choice, dict) else None
        if isinstance(named, dict) and isinstance(named.get("name"), str):
            tool, auto = named["name"], False
        else:
            first = tools[0].get("function") if isinstance(tools[0], dict) else None
            name = first.get("name") if isinstance(first, dict) else None
            tool, auto = (name if isinstance(name, str) else "tool"), choice != "required"
    logprobs: int | None = None
    if endpoint == "chat" and body.get("logprobs") is True:
        top = body.get("top_logprobs")
        logprobs = top if _is_int(top) else 0
    elif endpoint == "completions" and _is_int(body.get("logprobs")):
        logprobs = body["logprobs"]
    return OutputShape(tool, auto, logprobs)


_VOCAB_RANK = {word: rank for rank, word in enumerate(_VOCAB)}


def _logprob(token: str, rank: int = 0) -> float:
    # deterministic, distinct per token, lower for each alternative further down
    return -round(0.125 * (1 + _VOCAB_RANK.get(token, 0) % 7) + rank, 3)


def _alternatives(token: str, count: int) -> list[str]:
    start = _VOCAB_RANK.get(token, 0)
    return [token, *(_VOCAB[(start + k) % len(_VOCAB)] for k in range(1, count))][:count]


def chat_logprobs(tokens: Sequence[str], top: int) -> dict[str, Any]:
    """Chat's ``logprobs``: one entry per token, each with ``top`` alternatives."""

    def entry(token: str, rank: int = 0) -> dict[str, Any]:
        return {"token": token, "logprob": _logprob(token, rank), "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(t), "top_logprobs": [entry(a, r) for r, a in enumerate(_alternatives(t, top))]}
            for t in tokens
        ]
    }


def completion_logprobs(tokens: Sequence[str], top: int, offset: int) -> dict[str, Any]:
    """A completion's ``logprobs`` for ``tokens`` starting at character ``offset``."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": [_logprob(t) for t in tokens],
        "tokens": list(tokens),
        "top_logprobs": [
            {a: _logprob(t, r) for r, a in enumerate(_alternatives(t, top))} for t in tokens
        ],
    }


def tool_arguments(tokens: Sequence[str]) -> list[str]:
    """The call's ``arguments`` JSON in streamed pieces: one per token, then the closing one
    (vLLM flushes the arguments its parser held back in the finish chunk)."""
    pieces = [orjson.dumps(t).decode()[1:-1] for t in tokens]
    if pieces:
        pieces[0] = '{"text":"' + pieces[0]
    else:
        pieces.append('{"text":"')
    pieces[-1:] = [pieces[-1], '"}']
    return pieces


def tool_call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex  # random, as vLLM's are


def _finish_reason(choice: Choice, shape: OutputShape) -> str:
    # vLLM says tool_calls only when its auto parser found one; a named call ends as text does
    return "tool_calls" if shape.tool is not None and shape.auto_tool else choice.finish_reason


def usage(prompt_tokens: int, choices: Sequence[Choice]) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
    }


def render_response(
    endpoint: Endpoint,
    rid: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    used: Any,
    shape: OutputShape = PLAIN,
) -> bytes:
    top = shape.logprobs
    if endpoint == "chat":
        rendered: list[dict[str, Any]] = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {
                "role": "assistant",
                "reasoning_content": None,
                "content": c.text,
                "tool_calls": [],
            }
            if shape.tool is not None:
                arguments = "".join(tool_arguments(c.tokens))
                function = {"name": shape.tool, "arguments": arguments}
                call = {"id": tool_call_id(), "type": "function", "function": function}
                message.update(content=None if shape.auto_tool else "", tool_calls=[call])
            rendered.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": None if top is None else chat_logprobs(c.tokens, top),
                    "finish_reason": _finish_reason(c, shape),
                    "stop_reason": None,
                }
            )
        obj = "chat.completion"
    else:
        rendered = [
            {
                "index": i,
                "text": c.text,
                "logprobs": None
                if top is None
                else completion_logprobs(c.tokens, top, len(c.echo)),
                "finish_reason": c.finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            for i, c in enumerate(choices)
        ]
        obj = "text_completion"
    return orjson.dumps(
        {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": rendered,
            "usage": used,
            "prompt_logprobs": None,
        }
    )


def render_stream_events(
    endpoint: Endpoint,
    rid: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    used: dict[str, int] | None,
    shape: OutputShape = PLAIN,
) -> list[bytes]:
    """Every SSE event of a streamed answer, in vLLM's order, ``data: [DONE]`` included.

    Chat: a role chunk per choice (and for a tool call, a chunk naming it), one content (or
    arguments) chunk per token, a finish chunk per choice; then the usage chunk (``choices: []``)
    when asked for, then ``[DONE]``. Completions have no role chunk; an echoed prompt comes with
    the first token. Choices are interleaved token by token, as vLLM does for ``n > 1``.
    """
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    head = {"id": rid, "object": obj, "created": created, "model": model}
    top = shape.logprobs
    arguments = [tool_arguments(c.tokens) for c in choices] if shape.tool is not None else []
    offsets = [len(c.echo) for c in choices]

    def event(index: int, delta: Any, finish: str | None, logprobs: Any = None) -> bytes:
        choice: dict[str, Any]
        if endpoint == "chat":
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        return frame(orjson.dumps({**head, "choices": [choice]}))

    def token(index: int, position: int) -> bytes:
        text = choices[index].tokens[position]
        if endpoint == "completions":
            logprobs = None
            if top is not None:
                logprobs = completion_logprobs([text], top, offsets[index])
                offsets[index] += len(text)
            prefix = choices[index].echo if position == 0 else ""
            return event(index, prefix + text, None, logprobs)
        chat_lp = None if top is None else chat_logprobs([text], top)
        if shape.tool is None:
            return event(index, {"content": text}, None, chat_lp)
        piece = {"index": 0, "function": {"arguments": arguments[index][position]}}
        return event(index, {"tool_calls": [piece]}, None, chat_lp)

    def finish(index: int) -> bytes:
        c = choices[index]
        if endpoint == "completions":
            return event(index, "" if c.tokens else c.echo, c.finish_reason)
        delta: dict[str, Any] = {}
        if shape.tool is not None:
            rest = "".join(arguments[index][len(c.tokens) :])
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": rest}}]}
        return event(index, delta, _finish_reason(c, shape))

    events: list[bytes] = []
    if endpoint == "chat":
        events.extend(
            event(i, {"role": "assistant", "content": ""}, None) for i in range(len(choices))
        )
        if shape.tool is not None:
            function = {"name": shape.tool}
            named = [{"id": tool_call_id(), "type": "function", "index": 0, "function": function}]
            events.extend(event(i, {"tool_calls": named}, None) for i in range(len(choices)))
    longest = max((len(c.tokens) for c in choices), default=0)
    plain = shape.plain and endpoint == "chat"  # the benchmark's shape: no detour per token
    for position in range(longest):
        events.extend(
            (event(i, {"content": c.tokens[position]}, None) if plain else token(i, position))
            for i, c in enumerate(choices)
            if position < len(c.tokens)
        )
    events.extend(finish(i) for i in range(len(choices)))
    if used is not None:
        events.append(frame(orjson.dumps({**head, "choices": [], "usage": used})))
    events.append(DONE_EVENT)
    return events


def token_steps(
    endpoint: Endpoint, choices: Sequence[Choice], shape: OutputShape = PLAIN
) -> dict[int, int]:
    """Where :func:`render_stream_events` moves to the next token: event index -> token position,
    for positions after the first.

    A stream is paced by these alone: the choices' tokens at one position come out together (as
    from one decoding step), and role, finish and usage events add no wait, so a streamed answer
    takes as long as the non-streamed one.
    """
    heads = 0 if endpoint == "completions" else 1 if shape.tool is None else 2
    sent = heads * len(choices)  # the role (and tool name) chunks
    steps: dict[int, int] = {}
    for position in range(max((len(c.tokens) for c in choices), default=0)):
        if position:
            steps[sent] = position
        sent += sum(1 for c in choices if position < len(c.tokens))
    return steps


def error_body(message: str, kind: str, status: int, param: str | None = None) -> bytes:
    # vLLM 0.11's ErrorResponse: OpenAI's nesting, with vLLM's ``code`` (the HTTP status). Older
    # vLLM sent the fields flat; the proxy nests those itself (pipeline.openai_error_body).
    error = {"message": message, "type": kind, "param": param, "code": status}
    return orjson.dumps({"error": error})


def escape_label_value(value: str) -> str:
    """``value`` as the text format wants it between a label's quotes: a model name may hold any
    character, and a bare quote or newline made the whole exposition unparseable."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(
    model: str, running: int, waiting: int, max_num_seqs: int, counters: FakeCounters
) -> str:
    """Prometheus text with the vLLM series Frugal's health poller reads."""
    model = escape_label_value(model)
    label = f'{{model_name="{model}"}}'
    cache_usage = min(1.0, running / max_num_seqs)
    series = [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution.", running),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting.", waiting),
        ("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage (1 = 100%).", cache_usage),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage (1 = 100%).", cache_usage),
        ("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.", counters.prompt),
        ("vllm:generation_tokens_total", "counter", "Tokens generated.", counters.generated),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines.append(f"{name}{label} {float(value)}")
    name = "vllm:request_success_total"
    lines += [f"# HELP {name} Finished requests.", f"# TYPE {name} counter"]
    for reason in ("stop", "length", "abort"):
        value = counters.finished.get(reason, 0)
        lines.append(f'{name}{{finished_reason="{reason}",model_name="{model}"}} {float(value)}')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Run-time state


@dataclass(slots=True)
class FakeCounters:
    requests: int = 0  # completion requests received
    aborted: int = 0  # ended because the client went away before the end
    failed: int = 0  # answered with an injected error status
    cut: int = 0  # connection closed on purpose (abort_after_chunks)
    prompt: int = 0
    generated: int = 0
    finished: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class LoggedRequest:
    # Raw parts only: decoding waits for GET /fake/requests, off the hot path.
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    outcome: str = "in_flight"


class FakeEngineState:
    """The engine's mutable state, one per app (on ``app[FAKE_STATE]``)."""

    def __init__(self, options: FakeEngineOptions) -> None:
        self.options = options
        self.counters = FakeCounters()
        self.in_flight = 0
        self.log: deque[LoggedRequest] = deque(maxlen=options.request_log_size)
        self.rng = random.Random(options.rng_seed)
        self.created_at = int(time.time())
        self._unhang = asyncio.Event()

    def reconfigure(self, options: FakeEngineOptions) -> None:
        if self.options.hang and not options.hang:
            # Release requests that are hanging now; later ones see hang=False directly.
            self._unhang.set()
            self._unhang = asyncio.Event()
        self.options = options

    async def wait_unhang(self) -> None:
        await self._unhang.wait()

    def reset(self) -> None:
        self.counters = FakeCounters()
        self.log.clear()

    def finish(self, reason: str) -> None:
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1


FAKE_STATE = web.AppKey("fake_engine_state", FakeEngineState)


# ---------------------------------------------------------------------------------------------
# Handlers

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "completions")


async def _completion(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[FAKE_STATE]
    options = state.options
    raw = await request.read()
    headers = [(str(name), value) for name, value in request.headers.items()]
    entry = LoggedRequest(request.method, request.path, headers, raw)
    if options.request_log_size:
        state.log.append(entry)
    state.counters.requests += 1
    state.in_flight += 1
    try:
        response = await _answer(request, endpoint, raw, state, options, entry)
        if entry.outcome == "in_flight":
            entry.outcome = "ok"
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        # The client left (aiohttp cancels the handler, or a write fails): vLLM aborts the request.
        entry.outcome = "aborted"
        state.counters.aborted += 1
        state.finish("abort")
        raise
    finally:
        state.in_flight -= 1


async def _answer(
    request: web.Request,
    endpoint: Endpoint,
    raw: bytes,
    state: FakeEngineState,
    options: FakeEngineOptions,
    entry: LoggedRequest,
) -> web.StreamResponse:
    try:
        body = check_request(endpoint, orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        entry.outcome = "bad_request"
        return _error(f"invalid JSON: {exc}", "BadRequestError", 400)
    except BadRequest as exc:
        entry.outcome = "bad_request"
        return _error(str(exc), "BadRequestError", 400, exc.param)
    if options.check_model and body.get("model") != options.model:
        entry.outcome = "bad_request"
        message = f"The model `{body.get('model')}` does not exist."
        return _error(message, "NotFoundError", 404)

    if options.hang:
        await state.wait_unhang()
    if options.fail_fraction and state.rng.random() < options.fail_fraction:
        entry.outcome = "failed"
        state.counters.failed += 1
        return _error("injected failure", "InternalServerError", options.fail_status)

    prompts = prompt_texts(endpoint, body)
    # choice i * n + j is prompt i's j-th answer, as vLLM numbers them
    choices = [c for prompt in prompts for c in plan_choices(body, prompt, options, state.rng)]
    prompt_tokens = sum(count_prompt_tokens(prompt) for prompt in prompts)
    used = usage(prompt_tokens, choices)
    prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
    rid = prefix + uuid.uuid4().hex
    created = int(time.time())
    model = str(body["model"]) if "model" in body else options.model
    shape = output_shape(endpoint, body)

    if body.get("stream"):
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        events = render_stream_events(
            endpoint, rid, created, model, choices, used if include_usage else None, shape
        )
        steps = token_steps(endpoint, choices, shape) if options.tokens_per_s else {}
        response = await _stream(request, events, steps, state, options, entry)
    else:
        if options.abort_after_chunks is not None:
            _cut(request, state, entry)
            return web.Response(status=500)  # never sent: the transport is closed
        if options.ttft_ms:
            await asyncio.sleep(options.ttft_ms / 1000)
        if options.tokens_per_s:
            # As streamed: the first token at ttft, each later decoding step 1/tokens_per_s after.
            longest = max(len(c.tokens) for c in choices)
            await asyncio.sleep(max(0, longest - 1) / options.tokens_per_s)
        answer = render_response(endpoint, rid, created, model, choices, used, shape)
        response = web.Response(body=answer, content_type=_JSON)
    if entry.outcome not in ("cut", "ended"):
        state.counters.prompt += prompt_tokens
        state.counters.generated += used["completion_tokens"]
        for choice in choices:
            state.finish(choice.finish_reason)
    return response


async def _stream(
    request: web.Request,
    events: list[bytes],
    steps: dict[int, int],
    state: FakeEngineState,
    options: FakeEngineOptions,
    entry: LoggedRequest,
) -> web.StreamResponse:
    """Write ``events``; the ones in ``steps`` (see :func:`token_steps`) wait for their token."""
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    cut_at = options.abort_after_chunks
    end_at = options.end_after_chunks
    if options.zero_delay and cut_at is None and end_at is None:
        await response.write(b"".join(events))  # one write: the benchmark's fast path
        await response.write_eof()
        return response
    if options.ttft_ms:
        await asyncio.sleep(options.ttft_ms / 1000)
    loop = asyncio.get_running_loop()
    first_token_at = loop.time()
    for sent, event in enumerate(events):
        if cut_at is not None and sent >= cut_at:
            _cut(request, state, entry)
            return response
        if end_at is not None and sent >= end_at:
            entry.outcome = "ended"
            break
        position = steps.get(sent)
        if position:
            # Against the first token's time, so time spent writing does not add up per token.
            delay = first_token_at + position / options.tokens_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await response.write(event)
    await response.write_eof()
    return response


def _cut(request: web.Request, state: FakeEngineState, entry: LoggedRequest) -> None:
    """Close the connection abruptly, as a crashing engine would."""
    entry.outcome = "cut"
    state.counters.cut += 1
    transport = request.transport
    if transport is not None:
        transport.abort()


def _error(message: str, kind: str, status: int, param: str | None = None) -> web.Response:
    body = error_body(message, kind, status, param)
    return web.Response(status=status, body=body, content_type=_JSON)


async def models(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    options = state.options
    root = options.root or options.model
    card = {
        "id": options.model,
        "object": "model",
        "created": state.created_at,
        "owned_by": "vllm",
        "root": root,
        "parent": None,
        "max_model_len": options.max_model_len,
        "permission": [
            {
                "id": "modelperm-fake",
                "object": "model_permission",
                "created": state.created_at,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
    return web.Response(body=orjson.dumps({"object": "list", "data": [card]}), content_type=_JSON)


async def health(request: web.Request) -> web.Response:
    if request.app[FAKE_STATE].options.health_fail:
        return web.Response(status=503)
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    options = state.options
    running = min(state.in_flight, options.max_num_seqs)
    waiting = state.in_flight - running
    text = render_metrics(options.model, running, waiting, options.max_num_seqs, state.counters)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def get_config(request: web.Request) -> web.Response:
    options = request.app[FAKE_STATE].options
    return web.Response(body=orjson.dumps(dataclasses.asdict(options)), content_type=_JSON)


async def set_config(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    try:
        overrides = orjson.loads(await request.read())
        if not isinstance(overrides, dict):
            raise ValueError("expected a JSON object of option fields")
        state.reconfigure(apply_overrides(state.options, overrides))
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return _error(str(exc), "BadRequestError", 400)
    return await get_config(request)


async def get_requests(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    counters = state.counters
    logged = [_decode_logged(entry) for entry in state.log]
    report = {
        "count": counters.requests,
        "aborted": counters.aborted,
        "failed": counters.failed,
        "cut": counters.cut,
        "in_flight": state.in_flight,
        "requests": logged,
    }
    return web.Response(body=orjson.dumps(report), content_type=_JSON)


def _decode_logged(entry: LoggedRequest) -> dict[str, Any]:
    body: Any
    try:
        body = orjson.loads(entry.body)
    except orjson.JSONDecodeError:
        body = entry.body.decode(errors="replace")
    return {
        "method": entry.method,
        "path": entry.path,
        "headers": {name.lower(): value for name, value in entry.headers},
        "body": body,
        "outcome": entry.outcome,
    }


async def reset(request: web.Request) -> web.Response:
    request.app[FAKE_STATE].reset()
    return web.Response(status=204)


def create_fake_engine_app(options: FakeEngineOptions | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[FAKE_STATE] = FakeEngineState(options or FakeEngineOptions())
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/fake/config", get_config)
    app.router.add_post("/fake/config", set_config)
    app.router.add_get("/fake/requests", get_requests)
    app.router.add_post("/fake/reset", reset)
    return app


# ---------------------------------------------------------------------------------------------
# Serving


async def serve_fake_engine(options: FakeEngineOptions, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM. Handler cancellation on: a client that leaves aborts its
    request, as in vLLM, which the abort counter reports."""
    runner = web.AppRunner(
        create_fake_engine_app(options), access_log=None, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(host, port, exc) from None
    port = runner.addresses[0][1]  # the one the system chose for port 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake engine {options.model!r} on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_fake_engine(options: FakeEngineOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_fake_engine(options, host, port))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``frugal fake-engine`` flags (shared by ``python -m proxy.engines.fake``). The latency
    and failure knobs can also change at run time: ``POST /fake/config``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument(
        "--port",
        type=port_number,
        default=8000,
        help="port to listen on, 0: any free (%(default)s)",
    )
    parser.add_argument(
        "--model", default="fake-model", help="model served; others get 404 (%(default)s)"
    )
    parser.add_argument("--root", default=None, help="/v1/models root (default: the model name)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="context length reported by /v1/models, not enforced (%(default)s)",
    )
    parser.add_argument(
        "--completion-tokens",
        type=int,
        default=16,
        metavar="N",
        help="natural answer length in tokens, finish_reason stop; a smaller max_tokens cuts "
        "the answer with finish_reason length (%(default)s)",
    )
    parser.add_argument(
        "--ttft-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="wait before the first token (%(default)s)",
    )
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=0.0,
        metavar="RATE",
        help="tokens per second per choice after the first, streamed or not; 0 = no wait "
        "(%(default)s)",
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="SPEC",
        help="STATUS[:FRACTION], hang, abort:K, end:K or health (comma-separated or repeated)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeds the --fail FRACTION draws and the random answers to requests with no seed "
        "and a temperature other than 0 (default: unseeded)",
    )


def options_from_cli(args: argparse.Namespace) -> FakeEngineOptions:
    overrides: dict[str, Any] = {}
    for spec in args.fail:
        overrides.update(parse_fail_spec(spec))
    return FakeEngineOptions(
        model=args.model,
        root=args.root,
        max_model_len=args.max_model_len,
        completion_tokens=args.completion_tokens,
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        rng_seed=args.seed,
        **overrides,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fake-engine", description=__doc__.split("\n")[0], epilog=SERVER_EPILOG
    )
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    try:
        options = options_from_cli(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_fake_engine(options, args.host, args.port)
    except ListenError as exc:
        parser.exit(EXIT_RUNTIME, f"{parser.prog}: {exc}\n")


if __name__ == "__main__":
    main()
