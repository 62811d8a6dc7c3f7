"""The cache key contract: which request fields shape an answer, and how they are hashed.

Every request field is either hashed or deliberately excluded. ``EXCLUDED_FIELDS`` lists the
fields left out, each with its reason, as data; everything else is hashed, including fields this
module has never heard of (a newer client's or vLLM's extra field might change the answer, so an
unknown field costs at worst a miss, never a wrong hit). ``HASHED_FIELDS`` documents the known
fields that are hashed; a unit test fails when a known OpenAI/vLLM field is in neither list.

Keys are sha256 digests over length-prefixed parts (a version tag, the key kind, the endpoint, the
engine, its model version, the partition id, then the canonical body), so the encoding is
prefix-free: no two different part lists give the same byte string. The body is canonical orjson
with sorted keys: key order and whitespace of the client's JSON never change a key, and neither does
``1.0`` vs ``1`` in a top-level field (``temperature``, ``max_tokens``: the engine parses both to
the same number). Deeper down the two stay apart: a tool schema or a response format is written
into the prompt or the grammar as the client wrote it (``"minimum": 0.0`` is not ``0``). A
``null`` field is not the same as an absent one either: vLLM defaults some fields only when they
are absent (``tool_choice`` becomes ``auto`` beside ``tools``, but stays unset when ``null``).

The *context key* hashes the same parts except the text of the last user turn (for
``/v1/completions``: the prompt). Two requests with equal context keys differ at most in that text,
so a semantic hit between them is only a question of whether the two texts ask the same thing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

KEY_FORMAT_VERSION: Final = b"frugal-cache-key/1"

# Fields left out of the key, with the reason. Keep this list short: leaving a field out is a claim
# that it never changes the answer.
EXCLUDED_FIELDS: Final[Mapping[str, str]] = {
    "model": "the routed engine and its model version are explicit key parts; the alias the "
    "client asked for (which routing maps to an engine) does not shape the answer by itself",
    "stream": "a stored answer is served either way: replayed as SSE for streamed requests",
    "stream_options": "only controls whether a usage chunk is sent; the replay honours it",
    "user": "an end-user id for abuse tracking; with the user scope it is the partition id",
    "store": "OpenAI stored-completions flag; does not change the generated text",
    "metadata": "tags for OpenAI stored completions; does not change the generated text",
    "service_tier": "scheduling/billing class, not generation",
    "priority": "vLLM scheduling priority, not generation",
    "request_id": "vLLM tracing id, unique per request (hashing it would make every lookup miss)",
    "prompt_cache_key": "provider prefix-cache routing hint, not generation",
    "safety_identifier": "end-user id for abuse tracking, like `user`",
    "kv_transfer_params": "vLLM disaggregated-prefill plumbing, unique per request",
    "ec_transfer_params": "vLLM encoder-cache transfer plumbing, like kv_transfer_params",
    "session_id": "vLLM session identity for routing and cache reuse across related requests, "
    "not generation",
    "stream_interval": "vLLM tokens per streamed chunk; a stored answer is replayed in its own "
    "chunks",
}

# Known fields that are hashed (documentation and the completeness test; anything not excluded is
# hashed whether it is listed here or not).
HASHED_FIELDS: Final[Mapping[str, str]] = {
    # what is asked
    "messages": "the conversation",
    "prompt": "completions prompt",
    "suffix": "completions insertion suffix",
    "echo": "prompt echoed into the answer",
    "tools": "tool schemas the model may call",
    "tool_choice": "forces or forbids tool calls",
    "parallel_tool_calls": "allows several tool calls",
    "functions": "legacy tools",
    "function_call": "legacy tool_choice",
    "response_format": "JSON mode / schema",
    "modalities": "output modalities",
    "audio": "audio output parameters",
    "prediction": "predicted output",
    "reasoning_effort": "reasoning budget",
    "verbosity": "answer length hint",
    "web_search_options": "search tool parameters",
    "documents": "vLLM RAG documents for the chat template",
    "chat_template": "vLLM chat template override",
    "chat_template_kwargs": "vLLM chat template arguments",
    "add_generation_prompt": "vLLM template flag",
    "continue_final_message": "vLLM template flag",
    "add_special_tokens": "vLLM tokenisation flag",
    "mm_processor_kwargs": "vLLM multimodal preprocessing",
    "prompt_embeds": "vLLM completions prompt as embeddings",
    "truncate_prompt_tokens": "vLLM prompt truncation",
    "truncation_side": "vLLM prompt truncation side",
    "media_io_kwargs": "vLLM multimodal input loading",
    # sampling
    "temperature": "sampling",
    "top_p": "sampling",
    "top_k": "sampling",
    "min_p": "sampling",
    "seed": "sampling",
    "n": "number of choices",
    "best_of": "completions candidates",
    "use_beam_search": "vLLM beam search",
    "length_penalty": "vLLM beam search",
    "max_tokens": "length limit",
    "max_completion_tokens": "length limit",
    "min_tokens": "vLLM length floor",
    "stop": "stop strings",
    "stop_token_ids": "vLLM stop tokens",
    "include_stop_str_in_output": "vLLM output shape",
    "ignore_eos": "vLLM length behaviour",
    "presence_penalty": "sampling",
    "frequency_penalty": "sampling",
    "repetition_penalty": "vLLM sampling",
    "logit_bias": "sampling",
    "allowed_token_ids": "vLLM sampling",
    "bad_words": "vLLM sampling",
    "logits_processors": "vLLM sampling",
    "vllm_xargs": "vLLM extension arguments",
    "thinking_token_budget": "vLLM reasoning budget",
    "include_reasoning": "vLLM reasoning output",
    "watermarking": "vLLM watermarked sampling",
    "repetition_detection": "vLLM early stop on repeated n-grams",
    # output shape
    "logprobs": "log-probabilities in the answer",
    "top_logprobs": "log-probabilities in the answer",
    "prompt_logprobs": "vLLM prompt log-probabilities",
    "skip_special_tokens": "vLLM detokenisation",
    "spaces_between_special_tokens": "vLLM detokenisation",
    "return_tokens_as_token_ids": "vLLM output shape",
    "return_token_ids": "vLLM output shape",
    "return_prompt_text": "vLLM: the templated prompt in the answer",
    "return_token_offsets": "vLLM render output shape",
    "logprob_token_ids": "vLLM log-probabilities of chosen tokens",
    "routed_experts_prompt_start": "vLLM routed-expert output shape",
    "mm_payload": "vLLM render output shape",
    "return_mm_kwargs": "vLLM render output shape (deprecated alias of mm_payload)",
    # structured output
    "guided_json": "vLLM structured output",
    "guided_regex": "vLLM structured output",
    "guided_choice": "vLLM structured output",
    "guided_grammar": "vLLM structured output",
    "guided_decoding_backend": "vLLM structured output",
    "guided_whitespace_pattern": "vLLM structured output",
    "structural_tag": "vLLM structured output",
    "structured_outputs": "vLLM structured output",
    "cache_salt": "vLLM prefix-cache isolation; kept since it marks a wish for isolation",
}


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"


class Scope(StrEnum):
    """Who may share an entry. Partitions of different scopes or owners never see each other."""

    GLOBAL = "global"
    TIER = "tier"
    TENANT = "tenant"
    USER = "user"


@dataclass(frozen=True, slots=True)
class Partition:
    """A hard cache partition: the scope plus the owner within it (tier name, tenant, user)."""

    scope: Scope
    owner: tuple[str, ...] = ()
    # JSON array: unambiguous whatever characters the owner names contain. Made once: every
    # key and every entry of a request reads it.
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", orjson.dumps([self.scope.value, *self.owner]).decode())

    @classmethod
    def for_request(cls, scope: Scope, *, tier: str, tenant: str, user: str | None) -> Partition:
        """The partition a request belongs to under ``scope``.

        User ids are only unique within a tenant, so the user partition names both. A request
        without a ``user`` field under the user scope gets the tenant's user-less partition.
        """
        match scope:
            case Scope.GLOBAL:
                return _shared_partition(scope, ())
            case Scope.TIER:
                return _shared_partition(scope, (tier,))
            case Scope.TENANT:
                return _shared_partition(scope, (tenant,))
            case Scope.USER:
                return cls(scope, (tenant, user or ""))


@functools.lru_cache(maxsize=4096)
def _shared_partition(scope: Scope, owner: tuple[str, ...]) -> Partition:
    """A global, tier or tenant partition, made once (a partition is immutable, and every
    request asks for its own): as many as the configuration names, kept up to a bound all the
    same. (Not a user's: there is one per user.)"""
    return Partition(scope, owner)


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """Everything the cache needs to know about one request, computed once."""

    endpoint: Endpoint
    engine: str
    version: str
    partition: Partition
    exact: str
    # None when the request has no last user text to compare semantically.
    context: str | None
    query_text: str | None


_EXACT_FLOAT_INT: Final = 2**53
_I64_MIN: Final = -(2**63)
_U64_MAX: Final = 2**64 - 1


def canonical(value: Any) -> Any:
    """The value as orjson can write it for a key: string keys, lists for tuples, integers beyond
    64 bits as ``{"$bigint": "..."}``. Numbers keep their type (see the module doc)."""
    kind = type(value)
    # The common shapes first, by exact type (an ABC isinstance check costs far more).
    if kind is str or kind is bool or kind is float or value is None:
        return value
    if kind is dict:
        return {str(k): canonical(v) for k, v in value.items()}
    if kind is list:
        return [canonical(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not _I64_MIN <= value <= _U64_MAX:
        return {"$bigint": str(value)}  # orjson writes 64-bit integers only
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def canonical_field(value: Any) -> Any:
    """A top-level field's value: an integral float as the int (``"max_tokens": 16.0`` is 16 to
    the engine), anything else as :func:`canonical` writes it."""
    # only where int and float agree exactly
    if type(value) is float and value.is_integer() and abs(value) <= _EXACT_FLOAT_INT:
        return int(value)
    return canonical(value)


def keyed_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body's fields that go into the key: every one that is not excluded (``null`` ones
    too: see the module doc)."""
    return {k: canonical_field(v) for k, v in body.items() if k not in EXCLUDED_FIELDS}


_CANONICAL: Final = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=_CANONICAL)


# orjson refuses (rather than converts) everything but plain JSON types, tuples and a few it
# writes as canonical() leaves them (enums, UUIDs): str keys only, no subclasses, no dataclass
# or datetime, no integer beyond 64 bits.
_PLAIN_JSON: Final = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


def _plain_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """``keyed_fields`` without :func:`canonical` below the top level (integral floats become
    ints there as in ``canonical_field``)."""
    return {
        k: int(v) if type(v) is float and v.is_integer() and abs(v) <= _EXACT_FLOAT_INT else v
        for k, v in body.items()
        if k not in EXCLUDED_FIELDS
    }


def _framed(parts: Sequence[bytes]) -> bytes:
    """The parts, each after its length (8 bytes, big-endian), without the part count."""
    out: list[bytes] = []
    for part in parts:
        out += (len(part).to_bytes(8, "big"), part)
    return b"".join(out)


def digest(parts: Sequence[bytes]) -> str:
    """sha256 over length-prefixed parts: a prefix-free encoding of the part list."""
    # (one update over the joined bytes: the same digest as an update per piece, in a third
    # of the time)
    return hashlib.sha256(len(parts).to_bytes(4, "big") + _framed(parts)).hexdigest()


# The leading parts of each kind of key, framed as ``digest`` frames them, with the count of
# the parts the key has: the version tag, its kind, the four head parts, the body.
_KEY_PARTS: Final = 7
_EXACT_PREFIX: Final = _KEY_PARTS.to_bytes(4, "big") + _framed([KEY_FORMAT_VERSION, b"exact"])
_CONTEXT_PREFIX: Final = _KEY_PARTS.to_bytes(4, "big") + _framed([KEY_FORMAT_VERSION, b"context"])


@functools.lru_cache(maxsize=4096)
def _framed_head(endpoint: Endpoint, engine: str, version: str, partition_id: str) -> bytes:
    """The head parts framed: every request of a partition to an engine version shares them
    (kept up to a bound: the user scope has a partition per user)."""
    parts = [endpoint.value.encode(), engine.encode(), version.encode(), partition_id.encode()]
    return _framed(parts)


def _key(prefix: bytes, head: bytes, body: bytes) -> str:
    """``digest([KEY_FORMAT_VERSION, kind, *head parts, body])`` from the framed prefix (which
    names the kind) and the framed head."""
    return hashlib.sha256(b"".join((prefix, head, len(body).to_bytes(8, "big"), body))).hexdigest()


def last_user_index(messages: Sequence[Any]) -> int | None:
    """Index of the last message, when it is a user turn (otherwise there is no open question)."""
    if not messages:
        return None
    last = messages[-1]
    if isinstance(last, Mapping) and last.get("role") == "user":
        return len(messages) - 1
    return None


def message_text(content: Any) -> str | None:
    """Plain text of a message content: a string, or text parts only (None if other parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):  # (a tuple: as canonical() would make it a list)
        texts: list[str] = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                return None  # images/audio: not comparable by text embedding
            text = part.get("text")
            if not isinstance(text, str):
                return None
            texts.append(text)
        return "\n".join(texts)
    return None


def echoes_prompt(fields: Mapping[str, Any]) -> bool:
    """Whether the answer carries the prompt itself (``echo``, the prompt's log-probabilities,
    token ids or templated text): such an answer belongs to its exact prompt, never to one that
    means the same."""
    # prompt_logprobs is a count: 0 still returns the prompt tokens' own log-probabilities
    return (
        bool(fields.get("echo"))
        or bool(fields.get("return_token_ids"))
        or bool(fields.get("return_prompt_text"))
        or fields.get("prompt_logprobs") is not None
    )


def split_query(endpoint: Endpoint, fields: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(fields with the query text blanked, the query text), or None when there is none or the
    answer repeats the prompt (matched exactly only)."""
    if echoes_prompt(fields):
        return None
    if endpoint is Endpoint.CHAT:
        messages = fields.get("messages")
        if not isinstance(messages, list | tuple):  # (a tuple: as canonical() makes a list)
            return None
        index = last_user_index(messages)
        if index is None:
            return None
        text = message_text(messages[index].get("content"))
        if text is None:
            return None
        last = {**messages[index], "content": None}
        return {**fields, "messages": [*messages[:index], last]}, text
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        return None  # token ids or a batch of prompts
    return {**fields, "prompt": None}, prompt


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """What a request's keys hash apart from the engine, version and partition: its canonical
    fields (and with the query text blanked), serialised once however many engines it is keyed
    for."""

    endpoint: Endpoint
    fields_json: bytes
    context_json: bytes | None
    query_text: str | None


def key_material(
    endpoint: Endpoint, body: Mapping[str, Any], *, semantic: bool = True
) -> KeyMaterial:
    """``semantic=False``: the exact key's material only. Without a semantic lookup there is no
    use for a context key (an entry stored without an embedding is never indexed), and it costs
    a second serialisation and a digest per engine on every request."""
    fields = _plain_fields(body)
    option = _PLAIN_JSON
    try:
        # A body of plain JSON (every request's, parsed from JSON) is written as it is: the
        # same bytes as its canonical() form, without walking it in Python.
        fields_json = orjson.dumps(fields, option=option)
    except TypeError:  # (orjson.JSONEncodeError is one)
        fields = keyed_fields(body)
        option = _CANONICAL
        fields_json = orjson.dumps(fields, option=option)
    split = split_query(endpoint, fields) if semantic else None
    if split is None:
        return KeyMaterial(endpoint, fields_json, None, None)
    blanked, query = split
    return KeyMaterial(endpoint, fields_json, orjson.dumps(blanked, option=option), query)


def keys_from_material(
    material: KeyMaterial, *, engine: str, version: str, partition: Partition
) -> CacheKeys:
    endpoint = material.endpoint
    head = _framed_head(endpoint, engine, version, partition.id)  # (shared by both keys)
    exact = _key(_EXACT_PREFIX, head, material.fields_json)
    context: str | None = None
    if material.context_json is not None:
        context = _key(_CONTEXT_PREFIX, head, material.context_json)
    return CacheKeys(endpoint, engine, version, partition, exact, context, material.query_text)


def make_keys(
    endpoint: Endpoint,
    body: Mapping[str, Any],
    *,
    engine: str,
    version: str,
    partition: Partition,
) -> CacheKeys:
    """Exact key, context key and query text of one request for one engine version."""
    return keys_from_material(
        key_material(endpoint, body), engine=engine, version=version, partition=partition
    )


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Whether the same request gives the same answer: greedy (temperature 0), beam search, or
    sampling with a fixed seed. A missing temperature means the engine default (sampling)."""
    temperature = body.get("temperature")
    if (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
    ):
        return True
    if body.get("use_beam_search") is True:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def is_cacheable_request(body: Mapping[str, Any], *, allow_sampled: bool) -> bool:
    """Deterministic requests are cacheable; sampled ones only where the tier allows it."""
    return allow_sampled or is_deterministic(body)


# A tool call is a whole answer too: the model chose to call, the client runs it (agents send the
# same turn with the same tools again and again).
STORABLE_FINISH_REASONS: Final = frozenset({"stop", "length", "tool_calls"})


def is_storable_response(status: int, response: Mapping[str, Any]) -> bool:
    """Only complete 2xx answers whose every choice ended with stop, length or tool calls are
    stored (not ``abort``, ``error``, ``content_filter`` or an unfinished choice)."""
    if not 200 <= status < 300:
        return False
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for c in choices:  # (a loop, not all() over a generator: this runs on every miss)
        if not (type(c) is dict or isinstance(c, Mapping)):  # (exact type first: cheaper)
            return False
        if c.get("finish_reason") not in STORABLE_FINISH_REASONS:
            return False
    return True
