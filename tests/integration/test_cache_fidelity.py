"""Cached answers as the official openai SDK sees them: a hit gives what the engine's own answer
gave, in the shape the request asked for (whole or streamed), for tool calls, log-probabilities,
several choices and echo; and requests that must not share an answer miss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from proxy.cache.keys import Endpoint
from proxy.cache.stream_codec import assemble, normalise_response
from proxy.sse import parse_all
from tests.integration.conftest import Proxy, StartFake, StartProxy
from tests.integration.test_cache_pipeline import GREEDY, cached_proxy

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    }
]
ASK = {
    "model": "m",
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "temperature": 0,
    "max_tokens": 8,
    "tools": TOOLS,
}


def sdk(proxy: Proxy) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(proxy.client.make_url("/v1")), api_key="unused", max_retries=0)


async def settle(proxy: Proxy) -> None:
    """Wait for the background stores of the answers so far."""
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()


async def whole(client: AsyncOpenAI, body: dict[str, Any]) -> tuple[str, ChatCompletion]:
    raw = await client.chat.completions.with_raw_response.create(**body)
    return raw.headers["x-frugal-cache"], raw.parse()


async def streamed(
    client: AsyncOpenAI, body: dict[str, Any]
) -> tuple[str, list[dict[str, Any]], Any]:
    """(cache header, each choice accumulated from its deltas as SDK users do, the usage)."""
    raw = await client.chat.completions.with_raw_response.create(**body, stream=True)
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    async for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            state = choices.setdefault(
                choice.index, {"content": None, "tool_calls": {}, "finish_reason": None}
            )
            delta = choice.delta
            if delta.content is not None:
                state["content"] = (state["content"] or "") + delta.content
            for call in delta.tool_calls or ():
                acc = state["tool_calls"].setdefault(call.index, {"arguments": ""})
                if call.id:
                    acc["id"] = call.id
                if call.function and call.function.name:
                    acc["name"] = call.function.name
                if call.function and call.function.arguments:
                    acc["arguments"] += call.function.arguments
            if choice.finish_reason is not None:
                state["finish_reason"] = choice.finish_reason
    return raw.headers["x-frugal-cache"], [choices[i] for i in sorted(choices)], usage


def calls_of(completion: ChatCompletion) -> list[list[dict[str, str]]]:
    return [
        [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or ()
            if c.type == "function"
        ]
        for choice in completion.choices
    ]


@pytest.mark.parametrize("first_streamed", [False, True])
async def test_a_tool_call_answer_is_cached_and_replayed_both_ways(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, first_streamed: bool
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    client = sdk(proxy)
    body = {**ASK, "n": 2}
    if first_streamed:
        cache, choices, _ = await streamed(client, body)
        calls = [[{"id": c["id"], "name": c["name"], "arguments": c["arguments"]}
                  for c in ch["tool_calls"].values()] for ch in choices]  # fmt: skip
    else:
        cache, completion = await whole(client, body)
        calls = calls_of(completion)
    assert cache == "miss"
    assert all(len(c) == 1 and c[0]["name"] == "get_weather" for c in calls)
    await settle(proxy)

    cache, completion = await whole(client, body)
    assert cache == "hit-exact"
    assert calls_of(completion) == calls
    assert [c.finish_reason for c in completion.choices] == ["tool_calls"] * 2
    # no text: null, as the engine's whole answer has it (also when stored from a stream)
    assert [c.message.content for c in completion.choices] == [None, None]

    cache, choices, usage = await streamed(
        client, {**body, "stream_options": {"include_usage": True}}
    )
    assert cache == "hit-exact"
    replayed = [
        [{"id": c["id"], "name": c["name"], "arguments": c["arguments"]}
         for c in ch["tool_calls"].values()] for ch in choices
    ]  # fmt: skip
    assert replayed == calls
    assert [c["finish_reason"] for c in choices] == ["tool_calls"] * 2
    assert not any(c["content"] for c in choices)
    assert usage is not None and usage.completion_tokens > 0
    assert engine.state.counters.requests == 1


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between any two answers (id, created) or between a whole
    answer and the same answer streamed (vLLM's null extras of a whole answer)."""
    body = normalise_response(body)
    for key in ("id", "created", "prompt_logprobs"):
        body.pop(key, None)
    for choice in body["choices"]:
        choice.pop("prompt_logprobs", None)
    return body


CASES = {
    "chat logprobs, n=2": (
        Endpoint.CHAT,
        {**GREEDY, "n": 2, "logprobs": True, "top_logprobs": 2},
    ),
    "chat json, stop": (
        Endpoint.CHAT,
        {**GREEDY, "response_format": {"type": "json_object"}, "stop": [" the"], "seed": 3},
    ),
    "completion logprobs, echo, n=2": (
        Endpoint.COMPLETIONS,
        {"model": "m", "prompt": "Say hi", "temperature": 0, "max_tokens": 6, "n": 2,
         "logprobs": 2, "echo": True},
    ),
}  # fmt: skip


@pytest.mark.parametrize("first_streamed", [False, True])
@pytest.mark.parametrize("case", list(CASES))
async def test_hits_give_the_engines_answer_whole_and_streamed(
    start_fake: StartFake,
    start_proxy: StartProxy,
    tmp_path: Path,
    case: str,
    first_streamed: bool,
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    endpoint, body = CASES[case]
    path = "/v1/chat/completions" if endpoint is Endpoint.CHAT else "/v1/completions"
    async with proxy.client.session.post(engine.url + path, json=body) as direct:
        expected = comparable(await direct.json())  # the engine's own answer
    first = await proxy.client.post(path, json={**body, "stream": first_streamed})
    assert first.headers["x-frugal-cache"] == "miss"
    await first.read()
    await settle(proxy)

    hit = await proxy.client.post(path, json=body)
    assert hit.headers["x-frugal-cache"] == "hit-exact"
    assert comparable(await hit.json()) == expected

    for include_usage in (True, False):
        options = {"stream_options": {"include_usage": include_usage}}
        replay = await proxy.client.post(path, json={**body, "stream": True, **options})
        assert replay.headers["x-frugal-cache"] == "hit-exact"
        chunks = [orjson.loads(p) for p in parse_all(await replay.read())[:-1]]
        usages = [c for c in chunks if c.get("usage")]
        assert len(usages) == include_usage  # usage exactly when asked
        if not include_usage:
            chunks.append({"choices": [], "usage": expected["usage"]})
        assert comparable(assemble(endpoint, chunks)) == expected
    assert engine.state.counters.requests == 2  # the direct one, and the first through the proxy


SEPARATE = {
    "tools": [{**TOOLS[0], "function": {**TOOLS[0]["function"], "name": "get_time"}}],
    "tool_choice": "required",
    "response_format": {"type": "json_object"},
    "logprobs": True,
    "n": 2,
    "seed": 5,
    "stop": ["x"],
    "repetition_penalty": 1.2,  # a vLLM extra sampling field
}
SHARED: list[dict[str, Any]] = [
    {"stream": True},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"user": "someone-else"},  # the tenant scope: not per user
]


async def test_only_requests_that_cannot_differ_share_an_answer(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    engine, proxy = await cached_proxy(start_fake, start_proxy, tmp_path)
    base = {**ASK, "tool_choice": "auto"}
    await (await proxy.client.post("/v1/chat/completions", json=base)).read()
    variants = [({field: value}, "miss") for field, value in SEPARATE.items()]
    variants += [(fields, "hit-exact") for fields in SHARED]
    for fields, expected in variants:
        await settle(proxy)
        resp = await proxy.client.post("/v1/chat/completions", json={**base, **fields})
        await resp.read()
        assert resp.status == 200
        assert resp.headers["x-frugal-cache"] == expected, fields
    assert engine.state.counters.requests == 1 + len(SEPARATE)
