"""Convert between a streamed answer (SSE JSON chunks) and one full response body. Pure.

``StreamAssembler`` folds the parsed chunks of a streamed ``/v1/chat/completions`` or
``/v1/completions`` answer (including the usage chunk) into the body the same request would have
received without ``stream``, so the cache stores one shape. ``replay`` does the reverse for a
cached answer served to a streamed request: per choice a role chunk, the text in pieces of a few
words, one chunk per tool call, a finish chunk, then a usage chunk when the request asked for
``stream_options.include_usage``. ``usage`` is the original answer's, never recomputed.

Merge rules (the same for every field, so unknown vLLM extras survive):
- delta/choice strings concatenate (``content``, ``reasoning_content``, ``refusal``, ``text``);
  ``role`` is set, not concatenated;
- ``tool_calls`` merge by ``index``: ``function.arguments`` concatenates, other fields are set;
- ``logprobs`` dicts merge by concatenating their lists (chat ``content``, completions
  ``tokens``/``token_logprobs``/...);
- list-valued extra choice fields concatenate (vLLM's ``token_ids``: each chunk's own tokens);
- other choice and top-level fields keep their last non-null value.

Round trip: ``assemble(replay(x, include_usage=True)) == normalise_response(x)``.
``normalise_response`` drops null message fields other than ``content`` and empty ``tool_calls``
(vLLM fills ``refusal``, ``audio``, ``function_call`` ... with nulls), and gives a tool call
without text ``content: null`` (see ``_tool_call_content``). ``replay`` keeps the stored
``id``, ``created`` and ``model``; a caller wanting fresh ones passes ``overrides``
(``replayed_identity``: what the proxy gives every answer it serves from the cache).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from proxy.cache.keys import Endpoint
from proxy.sse import DONE_EVENT, frame

_HEADER_FIELDS: Final = ("id", "created", "model")
_CHOICE_CORE: Final = frozenset({"index", "delta", "message", "text", "logprobs", "finish_reason"})
_WORD_PIECE = re.compile(r"\s*\S+")
WORDS_PER_CHUNK: Final = 4


class IncompleteStream(ValueError):
    """The stream did not end cleanly (no finish_reason, an error event): do not store it."""


def _merge_logprobs(old: Any, new: Any) -> Any:
    if new is None:
        return old
    if old is None or not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    merged = dict(old)
    for key, value in new.items():
        prev = merged.get(key)
        if isinstance(prev, list) and isinstance(value, list):
            merged[key] = prev + value
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


def _merge_tool_calls(calls: dict[int, dict[str, Any]], deltas: Sequence[Any]) -> None:
    for position, delta in enumerate(deltas):
        if not isinstance(delta, Mapping):
            continue
        index = delta.get("index", position)
        call = calls.setdefault(index, {})
        for key, value in delta.items():
            if key == "index":
                continue
            if key == "function" and isinstance(value, Mapping):
                function = call.setdefault("function", {})
                for fkey, fvalue in value.items():
                    if fkey == "arguments" and isinstance(fvalue, str):
                        function[fkey] = function.get(fkey, "") + fvalue
                    elif fvalue is not None or fkey not in function:
                        function[fkey] = fvalue
            elif value is not None or key not in call:
                call[key] = value


def _tool_call_content(message: dict[str, Any], finish_reason: Any) -> dict[str, Any]:
    """A call's message without text says ``content: null``, as a whole answer does.

    vLLM opens every streamed choice with ``content: ""`` in its role chunk; its whole answer to
    the same auto tool call (finish ``tool_calls``, OpenAI's too) has ``null``, and clients test
    ``content is None``. A named call (finish ``stop``) keeps vLLM's ``""``.
    """
    if finish_reason == "tool_calls" and message.get("tool_calls") and message["content"] == "":
        message["content"] = None
    return message


class _Choice:
    __slots__ = ("extras", "finish_reason", "index", "logprobs", "message", "tool_calls")

    def __init__(self, index: int) -> None:
        self.index = index
        self.message: dict[str, Any] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: Any = None
        self.finish_reason: str | None = None
        self.extras: dict[str, Any] = {}

    def add_fields(self, fields: Mapping[str, Any]) -> None:
        for key, value in fields.items():
            if key == "tool_calls":
                if isinstance(value, list):
                    _merge_tool_calls(self.tool_calls, value)
            elif key == "role":
                if value is not None:
                    self.message[key] = value
            elif isinstance(value, str):
                prev = self.message.get(key)
                self.message[key] = (prev if isinstance(prev, str) else "") + value
            elif value is not None or key not in self.message:
                self.message[key] = value

    def add_chunk_choice(self, choice: Mapping[str, Any], endpoint: Endpoint) -> None:
        if endpoint is Endpoint.CHAT:
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                self.add_fields(delta)
        else:
            text = choice.get("text")
            if isinstance(text, str):
                self.message["text"] = self.message.get("text", "") + text
        self.logprobs = _merge_logprobs(self.logprobs, choice.get("logprobs"))
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        for key, value in choice.items():
            if key in _CHOICE_CORE:
                continue
            prev = self.extras.get(key)
            if isinstance(prev, list) and isinstance(value, list):
                self.extras[key] = prev + value
            elif value is not None or key not in self.extras:
                self.extras[key] = value

    def build(self, endpoint: Endpoint) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index}
        if endpoint is Endpoint.CHAT:
            message = {"role": "assistant", "content": None, **self.message}
            if self.tool_calls:
                message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            body["message"] = _tool_call_content(message, self.finish_reason)
        else:
            body["text"] = self.message.get("text", "")
        body["logprobs"] = self.logprobs
        body["finish_reason"] = self.finish_reason
        body.update(self.extras)
        return body


class StreamAssembler:
    """Feed parsed chunks as they arrive; ``result()`` gives the full body after a clean end."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._header: dict[str, Any] = {}
        self._extras: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self.error: Any = None

    def add(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk["error"]
            return
        for key, value in chunk.items():
            if key in _HEADER_FIELDS:
                self._header.setdefault(key, value)
            elif key == "usage":
                if value is not None:
                    self._usage = value
            elif key not in ("choices", "object") and (
                value is not None or key not in self._extras
            ):
                self._extras[key] = value
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, Mapping):
                continue
            index = choice.get("index", position)
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice(index)
            state.add_chunk_choice(choice, self.endpoint)

    def add_payload(self, payload: bytes) -> None:
        """One SSE ``data`` payload (JSON bytes); ``[DONE]`` is ignored."""
        if payload.strip() == b"[DONE]":
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # an engine event that is not JSON: relayed as it came, but never stored
            self.error = {"message": "an event of the stream was not JSON"}
            return
        if isinstance(chunk, Mapping):
            self.add(chunk)

    @property
    def complete(self) -> bool:
        return (
            self.error is None
            and bool(self._choices)
            and all(c.finish_reason is not None for c in self._choices.values())
        )

    def result(self) -> dict[str, Any]:
        if not self.complete:
            raise IncompleteStream("stream ended without a clean finish")
        obj = "chat.completion" if self.endpoint is Endpoint.CHAT else "text_completion"
        body: dict[str, Any] = {**self._header, "object": obj}
        body["choices"] = [self._choices[i].build(self.endpoint) for i in sorted(self._choices)]
        body["usage"] = self._usage
        body.update(self._extras)
        return body


def assemble(endpoint: Endpoint, chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    assembler = StreamAssembler(endpoint)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()


def normalise_response(response: Mapping[str, Any]) -> dict[str, Any]:
    """The stored response in the form ``assemble`` produces (see the module docstring)."""
    body = dict(response)
    body.setdefault("usage", None)
    choices = []
    for choice in body.get("choices") or []:
        choice = dict(choice)
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if isinstance(message, Mapping):
            kept = {
                k: v
                for k, v in message.items()
                if (v is not None or k == "content") and not (k == "tool_calls" and not v)
            }
            kept.setdefault("content", None)
            if "tool_calls" in kept:
                kept["tool_calls"] = [
                    {k: v for k, v in call.items() if k != "index"} for call in kept["tool_calls"]
                ]
            choice["message"] = _tool_call_content(kept, choice.get("finish_reason"))
        choices.append(choice)
    body["choices"] = choices
    return body


def split_text(text: str, words: int = WORDS_PER_CHUNK) -> list[str]:
    """Pieces of a few words each (leading whitespace kept) that concatenate back to ``text``."""
    # The trailing blanks set apart first: \s*\S+ tried from every blank of a trailing run to
    # its end (n^2 on a cached answer that ends in thousands of newlines, at each replay on the
    # event loop); every other run of blanks is followed by a word, which the match takes.
    body = text.rstrip()
    tokens = _WORD_PIECE.findall(body)
    pieces = ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    tail = text[len(body) :]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces or [""]


def _chat_deltas(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    first: dict[str, Any] = {"role": message.get("role", "assistant")}
    texts: list[tuple[str, str]] = []
    tail: list[dict[str, Any]] = []
    for key, value in message.items():
        if key in ("role", "content") or value is None:
            continue
        if key == "tool_calls":
            tail.extend(
                {"tool_calls": [{"index": i, **call}]}
                for i, call in enumerate(value)
                if isinstance(call, Mapping)
            )
        elif isinstance(value, str):
            texts.append((key, value))
        else:
            first[key] = value
    content = message.get("content")
    if isinstance(content, str):
        texts.append(("content", content))  # reasoning and refusal before the answer text
    deltas = [first]
    deltas.extend({key: piece} for key, value in texts for piece in split_text(value))
    deltas.extend(tail)
    return deltas


def replayed_identity(endpoint: Endpoint, *, token: str, created: int) -> dict[str, Any]:
    """The ``id`` and ``created`` of a cached answer served again.

    Clients treat ``id`` as unique (chat frontends and tracing tools key messages by it) and
    ``created`` as when this response was made, so a replay gets its own of both, in the
    engine's id style; the headers say it came from the cache and how old the stored answer is.
    """
    prefix = "chatcmpl-" if endpoint is Endpoint.CHAT else "cmpl-"
    return {"id": prefix + token, "created": created}


def replay(
    endpoint: Endpoint,
    response: Mapping[str, Any],
    *,
    include_usage: bool,
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The chunks a streamed request would have received for ``response`` (without ``[DONE]``)."""
    body = normalise_response(response)
    header: dict[str, Any] = {k: body[k] for k in _HEADER_FIELDS if k in body}
    header.update(overrides or {})
    header["object"] = "chat.completion.chunk" if endpoint is Endpoint.CHAT else "text_completion"
    extras = {
        k: v for k, v in body.items() if k not in (*_HEADER_FIELDS, "object", "choices", "usage")
    }
    chunks: list[dict[str, Any]] = []

    def emit(choice: dict[str, Any]) -> None:
        chunk = {**header, "choices": [choice]}
        if not chunks:
            chunk.update(extras)
        chunks.append(chunk)

    for choice in body["choices"]:
        index = choice.get("index", 0)
        logprobs = choice.get("logprobs")
        finish = {k: v for k, v in choice.items() if k not in _CHOICE_CORE or k == "finish_reason"}
        if endpoint is Endpoint.CHAT:
            deltas = _chat_deltas(choice.get("message") or {})
            if logprobs is not None:
                # logprobs are per token: keep the text with them in one chunk
                merged: dict[str, Any] = {}
                for delta in deltas[1:]:
                    if "tool_calls" in delta:
                        continue
                    for key, value in delta.items():
                        merged[key] = merged.get(key, "") + value
                tools = [d for d in deltas[1:] if "tool_calls" in d]
                deltas = [deltas[0], merged, *tools]
            for n, delta in enumerate(deltas):
                lp = logprobs if n == 1 or (n == 0 and len(deltas) == 1) else None
                emit({"index": index, "delta": delta, "logprobs": lp, "finish_reason": None})
            emit({"index": index, "delta": {}, "logprobs": None, **finish})
        else:
            text = choice.get("text") or ""
            pieces = [text] if logprobs is not None else split_text(text)
            for n, piece in enumerate(pieces):
                emit(
                    {
                        "index": index,
                        "text": piece,
                        "logprobs": logprobs if n == 0 else None,
                        "finish_reason": None,
                    }
                )
            emit({"index": index, "text": "", "logprobs": None, **finish})
    if include_usage:
        chunks.append({**header, "choices": [], "usage": body.get("usage")})
    return chunks


def replay_sse(
    endpoint: Endpoint,
    response: Mapping[str, Any],
    *,
    include_usage: bool,
    overrides: Mapping[str, Any] | None = None,
) -> list[bytes]:
    """``replay`` framed as SSE events, ending with ``data: [DONE]``."""
    events = [
        frame(orjson.dumps(chunk))
        for chunk in replay(endpoint, response, include_usage=include_usage, overrides=overrides)
    ]
    events.append(DONE_EVENT)
    return events


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streamed request asked for the usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True
