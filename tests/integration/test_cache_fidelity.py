"""Cached answers as the official openai SDK sees them: a hit gives what the engine's own answer
gave, in the shape the request asked for (whole or streamed), for tool calls, log-probabilities,
several choices and echo; and requests that must not share an answer miss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from tests.integration.conftest import Proxy, StartFake, StartProxy
from tests.integration.test_cache_pipeline import cached_proxy

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
