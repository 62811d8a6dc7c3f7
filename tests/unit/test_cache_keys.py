"""The cache key contract: completeness, canonical form, sensitivity, partitions, prefix-freedom."""

from __future__ import annotations

import ast
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.keys import (
    EXCLUDED_FIELDS,
    HASHED_FIELDS,
    Endpoint,
    Partition,
    Scope,
    digest,
    is_cacheable_request,
    is_deterministic,
    is_storable_response,
    key_material,
    keys_from_material,
    make_keys,
)

# Request fields of OpenAI's chat/completions APIs and vLLM's extra parameters, written out
# independently of keys.py: each must be either hashed or excluded there.
_KNOWN_FIELDS_TEXT = """
messages model frequency_penalty logit_bias logprobs top_logprobs max_tokens
max_completion_tokens n presence_penalty response_format seed stop stream stream_options
temperature top_p tools tool_choice parallel_tool_calls user functions function_call store
metadata modalities audio prediction reasoning_effort service_tier web_search_options
prompt_cache_key safety_identifier verbosity
prompt best_of echo suffix
use_beam_search top_k min_p repetition_penalty length_penalty stop_token_ids
include_stop_str_in_output ignore_eos min_tokens skip_special_tokens
spaces_between_special_tokens truncate_prompt_tokens prompt_logprobs allowed_token_ids
bad_words add_generation_prompt continue_final_message add_special_tokens documents
chat_template chat_template_kwargs mm_processor_kwargs guided_json guided_regex guided_choice
guided_grammar structural_tag guided_decoding_backend guided_whitespace_pattern
structured_outputs priority request_id logits_processors return_tokens_as_token_ids
return_token_ids cache_salt kv_transfer_params vllm_xargs prompt_embeds
watermarking truncation_side logprob_token_ids media_io_kwargs session_id
routed_experts_prompt_start return_token_offsets return_prompt_text mm_payload return_mm_kwargs
ec_transfer_params repetition_detection stream_interval
"""
KNOWN_REQUEST_FIELDS = _KNOWN_FIELDS_TEXT.split()

ENGINE = {"engine": "large", "version": "v1", "partition": Partition(Scope.GLOBAL)}

BASE: dict[str, Any] = {
    "model": "auto",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "temperature": 0,
    "max_tokens": 64,
}


def chat_keys(body: dict[str, Any], **overrides: Any):  # type: ignore[no-untyped-def]
    return make_keys(Endpoint.CHAT, body, **{**ENGINE, **overrides})


def test_every_known_field_is_hashed_or_excluded() -> None:
    undecided = [
        f for f in KNOWN_REQUEST_FIELDS if f not in HASHED_FIELDS and f not in EXCLUDED_FIELDS
    ]
    assert undecided == []


def _installed_vllm_request_fields() -> dict[str, set[str]]:
    """The fields of the chat and completion request models of the vLLM the demo engines run
    (read from its source: vLLM lives in a venv of its own, see proxy/demo/vllm_env.py), by
    model; empty when no such venv is installed here."""
    from proxy.demo.vllm_env import venv_dir
    from proxy.settings import default_data_dir

    found: dict[str, set[str]] = {}
    root = venv_dir(default_data_dir())
    for source in sorted(
        root.glob("lib/python*/site-packages/vllm/entrypoints/openai/*/protocol.py")
    ):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in (
                "ChatCompletionRequest",
                "CompletionRequest",
            ):
                found.setdefault(node.name, set()).update(
                    statement.target.id
                    for statement in node.body
                    if isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)
                    and not statement.target.id.startswith("_")
                    and statement.target.id != "model_config"
                )
    return found


def test_every_field_of_the_installed_vllm_requests_is_hashed_or_excluded() -> None:
    """The hand-written list above dates; the engines' own request models say what a request can
    carry today (a new field that echoes the prompt must not go unnoticed)."""
    models = _installed_vllm_request_fields()
    if not models:
        pytest.skip("no vLLM venv in the data directory (scripts/up or scripts/test makes one)")
    assert set(models) == {"ChatCompletionRequest", "CompletionRequest"}
    undecided = {
        name: sorted(f for f in fields if f not in HASHED_FIELDS and f not in EXCLUDED_FIELDS)
        for name, fields in models.items()
    }
    assert undecided == {"ChatCompletionRequest": [], "CompletionRequest": []}


def test_hashed_and_excluded_do_not_overlap() -> None:
    assert set(HASHED_FIELDS) & set(EXCLUDED_FIELDS) == set()
    assert all(reason.strip() for reason in EXCLUDED_FIELDS.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


@given(
    extra=st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4),
    seed=st.integers(),
)
def test_key_ignores_key_order_and_whitespace(extra: dict[str, Any], seed: int) -> None:
    body = {**BASE, **extra}
    rng = random.Random(seed)
    rewritten = json.loads(json.dumps(shuffled(body, rng), indent=rng.choice([None, 1, 4])))
    assert chat_keys(body) == chat_keys(rewritten)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", 0.5),
        ("top_p", 0.9),
        ("top_k", 5),
        ("min_p", 0.1),
        ("seed", 7),
        ("max_tokens", 65),
        ("max_completion_tokens", 10),
        ("stop", ["\n"]),
        ("presence_penalty", 0.1),
        ("frequency_penalty", 0.1),
        ("repetition_penalty", 1.1),
        ("logit_bias", {"50256": -100}),
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "none"),
        ("response_format", {"type": "json_object"}),
        ("guided_json", {"type": "object"}),
        ("some_future_vllm_field", 1),  # unknown fields are in the key
    ],
)
def test_answer_shaping_fields_change_the_key(field: str, value: Any) -> None:
    assert chat_keys({**BASE, field: value}).exact != chat_keys(BASE).exact


@pytest.mark.parametrize("field", sorted(EXCLUDED_FIELDS))
def test_excluded_fields_do_not_change_the_key(field: str) -> None:
    assert chat_keys({**BASE, field: {"anything": 1}}) == chat_keys(BASE)


def test_integral_floats_are_canonical_in_top_level_fields() -> None:
    assert chat_keys({**BASE, "temperature": 0.0, "max_tokens": 64.0}) == chat_keys(BASE)
    assert chat_keys({**BASE, "temperature": True}) != chat_keys({**BASE, "temperature": 1})


@pytest.mark.parametrize(
    "field,as_int,as_float",
    [
        # written into the prompt by the chat template's tojson, as the client wrote them
        (
            "tools",
            [{"type": "function", "function": {"name": "f", "parameters": {"minimum": 0}}}],
            [{"type": "function", "function": {"name": "f", "parameters": {"minimum": 0.0}}}],
        ),
        # a grammar that allows 1 is not one that allows 1.0
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"schema": {"enum": [1]}}},
            {"type": "json_schema", "json_schema": {"schema": {"enum": [1.0]}}},
        ),
        ("guided_choice", [1], [1.0]),
    ],
)
def test_nested_numbers_keep_their_type(field: str, as_int: Any, as_float: Any) -> None:
    assert chat_keys({**BASE, field: as_int}).exact != chat_keys({**BASE, field: as_float}).exact


def test_a_null_field_is_not_an_absent_one() -> None:
    # vLLM makes tool_choice "auto" beside tools only when it is absent; null leaves it unset
    tools = [{"type": "function", "function": {"name": "f"}}]
    absent = chat_keys({**BASE, "tools": tools})
    assert chat_keys({**BASE, "tools": tools, "tool_choice": None}).exact != absent.exact
    assert chat_keys({**BASE, "stop": None}).exact != chat_keys(BASE).exact


@pytest.mark.parametrize(
    "endpoint,extra",
    [
        (Endpoint.COMPLETIONS, {"echo": True}),
        (Endpoint.COMPLETIONS, {"prompt_logprobs": 0}),
        (Endpoint.CHAT, {"prompt_logprobs": 1}),
        (Endpoint.CHAT, {"return_token_ids": True}),
        (Endpoint.CHAT, {"return_prompt_text": True}),
        (Endpoint.COMPLETIONS, {"return_prompt_text": True}),
        (Endpoint.CHAT, {"echo": True}),
    ],
)
def test_answers_that_repeat_the_prompt_are_matched_exactly_only(
    endpoint: Endpoint, extra: dict[str, Any]
) -> None:
    prompt = {"prompt": "capital city of France"} if endpoint is Endpoint.COMPLETIONS else {}
    body = {**BASE, **prompt}
    assert make_keys(endpoint, body, **ENGINE).context is not None
    keys = make_keys(endpoint, {**body, **extra}, **ENGINE)
    assert keys.context is None and keys.query_text is None
    off = {k: False if v is True else None for k, v in extra.items()}
    assert make_keys(endpoint, {**body, **off}, **ENGINE).context is not None


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [(Endpoint.CHAT, BASE), (Endpoint.COMPLETIONS, {"prompt": "capital of France", "n": 2})],
)
def test_without_a_semantic_lookup_only_the_exact_key_is_made(
    endpoint: Endpoint, body: dict[str, Any]
) -> None:
    both = keys_from_material(key_material(endpoint, body), **ENGINE)
    exact_only = keys_from_material(key_material(endpoint, body, semantic=False), **ENGINE)
    assert both.context is not None and both.query_text is not None
    assert exact_only.exact == both.exact  # the same entry is found and stored either way
    assert exact_only.context is None and exact_only.query_text is None


def test_engine_and_version_are_key_parts() -> None:
    base = chat_keys(BASE)
    for other in (chat_keys(BASE, engine="small"), chat_keys(BASE, version="v2")):
        assert other.exact != base.exact
        assert other.context != base.context


def test_context_key_ignores_only_the_last_user_text() -> None:
    base = chat_keys(BASE)
    reworded = {**BASE, "messages": [BASE["messages"][0], {"role": "user", "content": "2+2=?"}]}
    assert chat_keys(reworded).exact != base.exact
    assert chat_keys(reworded).context == base.context
    assert chat_keys(reworded).query_text == "2+2=?"
    other_system = {
        **BASE,
        "messages": [{"role": "system", "content": "You are verbose."}, BASE["messages"][1]],
    }
    assert chat_keys(other_system).context != base.context
    assert chat_keys({**BASE, "temperature": 0.2}).context != base.context
    assert chat_keys({**BASE, "tools": []}).context != base.context
    longer = {
        **BASE,
        "messages": [
            BASE["messages"][0],
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            BASE["messages"][1],
        ],
    }
    assert chat_keys(longer).context != base.context


def test_no_semantic_context_without_a_final_user_text() -> None:
    ends_with_assistant = {
        **BASE,
        "messages": [*BASE["messages"], {"role": "assistant", "content": "4"}],
    }
    assert chat_keys(ends_with_assistant).context is None
    image = {
        **BASE,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ],
    }
    assert chat_keys(image).context is None
    parts = {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert chat_keys(parts).query_text == "a"


def test_completions_prompt_is_the_query() -> None:
    a = make_keys(Endpoint.COMPLETIONS, {"prompt": "one", "temperature": 0}, **ENGINE)
    b = make_keys(Endpoint.COMPLETIONS, {"prompt": "two", "temperature": 0}, **ENGINE)
    assert a.exact != b.exact and a.context == b.context and a.query_text == "one"
    tokens = make_keys(Endpoint.COMPLETIONS, {"prompt": [1, 2], "temperature": 0}, **ENGINE)
    assert tokens.context is None
    chat_shaped = make_keys(Endpoint.CHAT, {"prompt": "one", "temperature": 0}, **ENGINE)
    assert chat_shaped.exact != a.exact


@given(st.lists(st.binary(max_size=6), max_size=4), st.lists(st.binary(max_size=6), max_size=4))
def test_digest_is_prefix_free(a: list[bytes], b: list[bytes]) -> None:
    assert (digest(a) == digest(b)) == (a == b)


owners = st.lists(st.text(alphabet='ab",[]\\ ', max_size=4), min_size=0, max_size=2).map(tuple)
partitions = st.builds(Partition, st.sampled_from(list(Scope)), owners)


@given(partitions, partitions)
def test_partition_ids_are_injective(a: Partition, b: Partition) -> None:
    assert (a.id == b.id) == (a == b)


@settings(max_examples=50)
@given(partitions, partitions)
def test_partition_is_part_of_every_key(a: Partition, b: Partition) -> None:
    ka, kb = chat_keys(BASE, partition=a), chat_keys(BASE, partition=b)
    assert (ka.exact == kb.exact) == (a == b)
    assert (ka.context == kb.context) == (a == b)


def test_partition_for_request() -> None:
    args = {"tier": "free", "tenant": "acme", "user": "u1"}
    assert Partition.for_request(Scope.GLOBAL, **args) == Partition(Scope.GLOBAL)
    assert Partition.for_request(Scope.TIER, **args).owner == ("free",)
    assert Partition.for_request(Scope.TENANT, **args).owner == ("acme",)
    # user ids are only unique within a tenant
    assert Partition.for_request(Scope.USER, **args).owner == ("acme", "u1")
    other_tenant = Partition.for_request(Scope.USER, tier="free", tenant="other", user="u1")
    assert other_tenant != Partition.for_request(Scope.USER, **args)
    assert Partition.for_request(Scope.USER, tier="t", tenant="acme", user=None).owner == (
        "acme",
        "",
    )


@pytest.mark.parametrize(
    "body,expected",
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7, "seed": 3}, True),
        ({"seed": 3}, True),
        ({"temperature": 0.7}, False),
        ({}, False),
        ({"temperature": False}, False),
        ({"seed": True}, False),
        ({"temperature": 1, "use_beam_search": True}, True),
    ],
)
def test_is_deterministic(body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(body) is expected
    assert is_cacheable_request(body, allow_sampled=False) is expected
    assert is_cacheable_request(body, allow_sampled=True)


def _resp(*reasons: str | None) -> dict[str, Any]:
    return {"choices": [{"index": i, "finish_reason": r} for i, r in enumerate(reasons)]}


@pytest.mark.parametrize(
    "status,response,expected",
    [
        (200, _resp("stop"), True),
        (200, _resp("stop", "length"), True),
        (200, _resp("stop", None), False),
        (200, _resp("tool_calls"), True),
        (200, _resp("stop", "tool_calls"), True),
        (200, _resp("abort"), False),
        (200, {"choices": []}, False),
        (500, _resp("stop"), False),
        (429, _resp("stop"), False),
        (200, {"error": {"message": "x"}}, False),
    ],
)
def test_is_storable_response(status: int, response: dict[str, Any], expected: bool) -> None:
    assert is_storable_response(status, response) is expected


def test_huge_numbers_do_not_break_the_key() -> None:
    huge_float = chat_keys({**BASE, "seed": 1.2345678901234568e29})
    huge_int = chat_keys({**BASE, "seed": 2**70})
    assert huge_float.exact != huge_int.exact != chat_keys(BASE).exact
    assert chat_keys({**BASE, "seed": 2**70}) == huge_int


def test_key_bytes_are_pinned() -> None:
    """Keys already stored (on disk, in Redis) must still be found: these digests were made by
    the key code as it stood when entries were first written; a change to how a key is hashed
    (or to what goes into it) fails here first."""
    assert digest([]) == "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
    assert digest([b"a", b""]) == "cd49e20aaef0191f3e2382961457ec742cea16987a60dd3182cbdeb96316641b"
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2? é"},
        ],
        "temperature": 0,
        "max_tokens": 64.0,
        "user": "u1",
        "tools": [{"x": 1.0}],
    }
    partition = Partition(Scope.USER, ("acme", "u1"))
    chat = make_keys(Endpoint.CHAT, body, engine="large", version="v1", partition=partition)
    assert partition.id == '["user","acme","u1"]'
    assert chat.exact == "27e8ef2119b3370f5bfcd54111ac9207b32c2f498d0565de46a149b05f8f8008"
    assert chat.context == "4ea4de19cbe086d60fac46af24161012933cc8cd0a31a31558e1aa7106518f53"
    prompt = {"prompt": "Once upon", "temperature": 0, "seed": 3}
    completion = make_keys(
        Endpoint.COMPLETIONS,
        prompt,
        engine="small",
        version="bench-small-1",
        partition=Partition(Scope.GLOBAL),
    )
    assert completion.exact == "19aab916f7be93f27faf46f327952307b60aa652418513a96eae1a768f195415"
    assert completion.context == "a74d7698a3a25c1ba265e9a380f7a550320fae61ebe648363c6a0d45e49d0002"


def test_partitions_are_made_once_per_tier_and_tenant_not_per_user() -> None:
    args = {"tier": "free", "tenant": "acme", "user": "u1"}
    for scope in (Scope.GLOBAL, Scope.TIER, Scope.TENANT):
        first = Partition.for_request(scope, **args)
        assert Partition.for_request(scope, **args) is first
    assert Partition.for_request(Scope.TENANT, **{**args, "tenant": "other"}).owner == ("other",)
    assert Partition.for_request(Scope.TIER, **{**args, "tier": "paid"}).owner == ("paid",)
    assert Partition.for_request(Scope.GLOBAL, **{**args, "tier": "paid"}) == Partition(
        Scope.GLOBAL
    )
    one = Partition.for_request(Scope.USER, **args)
    other = Partition.for_request(Scope.USER, **{**args, "user": "u2"})
    assert one.owner == ("acme", "u1") and other.owner == ("acme", "u2")
