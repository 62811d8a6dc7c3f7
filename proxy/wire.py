"""The OpenAI request as the proxy sees it: the few fields it reads, validated; the rest untouched.

Everything the proxy does not need to read passes through to the engine unchanged (n, tools,
logprobs, response_format, vLLM's extra sampling fields, ...). Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from proxy.errors import InvalidRequest

Kind = Literal["chat", "completion"]


@dataclass(slots=True)
class CompletionRequest:
    kind: Kind
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    # Set when the proxy changes the body (model rewrite, clamp): it then re-encodes it.
    modified: bool = field(default=False)

    def set(self, key: str, value: Any) -> None:
        self.body[key] = value
        self.modified = True

    def encoded(self) -> bytes:
        return orjson.dumps(self.body) if self.modified else self.raw

    @property
    def temperature(self) -> float:
        value = self.body.get("temperature")
        # OpenAI's default temperature is 1: an unset temperature is sampling.
        return 1.0 if value is None else float(value)

    @property
    def seed(self) -> int | None:
        value = self.body.get("seed")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: greedy decoding, or sampling with a fixed seed."""
        return self.temperature == 0.0 or self.seed is not None

    @property
    def user(self) -> str | None:
        """The end user the request is for: ``user``, or OpenAI's newer ``safety_identifier``
        (which replaces it) when the request has no ``user``."""
        for name in ("user", "safety_identifier"):
            value = self.body.get(name)
            if isinstance(value, str) and value:
                return value
        return None


_BOM: Final = b"\xef\xbb\xbf"
# orjson reads 1,024 levels of nested arrays and objects but writes only 254, and the proxy writes
# a body again (a max_tokens clamp, the cache key, the budget's token bound): deeper, it was a 500.
MAX_NESTING: Final = 254
# OpenAI's own maximum: n multiplies the engine's work, and with max_tokens 1 any n fit a budget.
MAX_N: Final = 128


def parse_request(raw: bytes, kind: Kind) -> CompletionRequest:
    # A UTF-8 byte order mark (a JSON file saved by a Windows editor) is no part of the JSON:
    # vLLM's parser skips it (RFC 8259 lets a parser ignore it), so it is dropped here too.
    raw = raw.removeprefix(_BOM)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # (counting brackets is a few ns a request; only a body with that many writes itself again)
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and not _writable(body):
        raise InvalidRequest(
            f"The request body nests arrays and objects too deeply (at most {MAX_NESTING} levels)."
        )

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "you must provide a model parameter" if model is None else "'model' must be a string.",
            param="model",
        )
    if kind == "chat":
        _check_messages(body.get("messages"))
    else:
        _check_prompt(body.get("prompt"))

    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            # bool("false") is True: a string must not turn usage on.
            raise InvalidRequest(
                "stream_options.include_usage must be a boolean.",
                param="stream_options.include_usage",
            )
        include_usage = bool(usage)

    max_tokens = _max_tokens(body, kind)
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InvalidRequest("'n' must be a positive integer.", param="n")
    if n is not None and n > MAX_N:
        raise InvalidRequest(f"'n' must be at most {MAX_N}, got {n}.", param="n")
    _check_best_of(body.get("best_of"), n or 1)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidRequest("'seed' must be an integer.", param="seed")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        # The engine would refuse it too, but with its own validator's dump as the message.
        raise InvalidRequest("'stop' must be a string or an array of strings.", param="stop")
    for name in ("user", "safety_identifier"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{name}' must be a string.", param=name)

    return CompletionRequest(
        kind=kind,
        body=body,
        raw=raw,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
    )


def _writable(body: dict[str, Any]) -> bool:
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        return False
    return True


def _optional(body: dict[str, Any], key: str, typ: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, typ):
        raise InvalidRequest(f"'{key}' must be {_type_name(typ)}.", param=key)
    return value


def _type_name(typ: type) -> str:
    return {bool: "a boolean", dict: "an object", list: "an array", str: "a string"}.get(
        typ, f"a {typ.__name__}"
    )


_CONTENT_REQUIRED: Final = frozenset({"system", "developer", "user"})


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(
                f"messages[{i}].role must be a string.", param=f"messages[{i}].role"
            )
        content = message.get("content")
        if content is None and role in _CONTENT_REQUIRED:
            # (an assistant turn may carry only tool_calls; a tool or other role is the engine's)
            raise InvalidRequest(
                f"Missing required parameter: 'messages[{i}].content'.",
                param=f"messages[{i}].content",
            )
        _check_content(content, f"messages[{i}].content")


def _check_content(content: Any, where: str) -> None:
    """A string, or content parts each naming its type; a text part's text is a string (the
    proxy reads it). Other parts (images, audio, ...) are the engine's to judge."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts.", param=where)
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequest(f"{where}[{j}] must be an object.", param=f"{where}[{j}]")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest(f"{where}[{j}].type must be a string.", param=f"{where}[{j}].type")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}[{j}].text must be a string.", param=f"{where}[{j}].text")


def _check_prompt(prompt: Any) -> None:
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt) or _token_ids(prompt):
            return
        if all(isinstance(p, list) and p and _token_ids(p) for p in prompt):
            return
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings, an array of token ids, or an array "
        "of arrays of token ids.",
        param="prompt",
    )


def _token_ids(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _max_tokens(body: dict[str, Any], kind: Kind) -> int | None:
    """The output cap: chat's max_completion_tokens before its older name max_tokens. Both are
    checked, the one not read too (the engine reads it)."""
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    cap = None
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"'{key}' must be a positive integer.", param=key)
        if cap is None:
            cap = value
    return cap


def _check_best_of(best_of: Any, n: int) -> None:
    """vLLM's ``best_of``: the engine samples that many sequences and returns the ``n`` best, so
    it multiplies the engine's work as ``n`` does, and is bounded the same way."""
    if best_of is None:
        return
    if not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < 1:
        raise InvalidRequest("'best_of' must be a positive integer.", param="best_of")
    if best_of < n:
        raise InvalidRequest(
            f"'best_of' must be at least 'n' ({n}), got {best_of}.", param="best_of"
        )
    if best_of > MAX_N:
        raise InvalidRequest(f"'best_of' must be at most {MAX_N}, got {best_of}.", param="best_of")


def _check_number(body: dict[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be a number.", param=key)
    if not low <= value <= high:
        raise InvalidRequest(f"'{key}' must be between {low:g} and {high:g}.", param=key)


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Only string texts: parse_request rejects others, but this must not be what breaks.
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(request: CompletionRequest) -> str | None:
    """The text compared by meaning (semantic cache) and scored (router)."""
    if request.kind == "completion":
        prompt = request.body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        return None
    for message in reversed(request.body["messages"]):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return None


def expected_choices(request: CompletionRequest) -> int:
    """How many choices the answer has: ``n`` per prompt (a completion may send several)."""
    return int(request.body.get("n") or 1) * _prompts(request)


def generated_sequences(request: CompletionRequest) -> int:
    """How many sequences the engine may generate, each up to max_tokens: ``max(n, best_of)``
    per prompt (vLLM samples ``best_of`` and returns the ``n`` best; parse_request has checked
    that best_of is at least n)."""
    n = int(request.body.get("n") or 1)
    return max(n, int(request.body.get("best_of") or n)) * _prompts(request)


def _prompts(request: CompletionRequest) -> int:
    if request.kind == "completion":
        prompt = request.body.get("prompt")
        if isinstance(prompt, list) and prompt and not _token_ids(prompt):
            return len(prompt)  # strings, or lists of token ids: one prompt each
    return 1


def conversation_prefix(request: CompletionRequest) -> bytes:
    """What identifies a conversation: its messages up to and including the first user turn.

    Every later turn of the same conversation starts with them, so all its requests hash to the
    same replica (reusing vLLM's prefix cache there) and find the engine that served it before.
    """
    if request.kind == "completion":
        prompt = request.body.get("prompt")
        return orjson.dumps(prompt)[:512]
    messages = request.body["messages"]
    end = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
    return orjson.dumps(messages[: end + 1])
