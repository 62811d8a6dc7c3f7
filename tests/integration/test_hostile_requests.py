"""Requests a tenant could send to hurt the proxy: each is a bounded OpenAI-shaped 4xx, never a
500, a hang, or an echo as large as what was sent. The engine sees none of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import StartFake, StartProxy, engine_config
from tests.integration.test_policy_pipeline import FREE_KEY, auth, tier, write_policies


async def _budgeted_proxy(start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path) -> Any:
    # A budget makes the proxy write the body again (it sends the tier's max_tokens cap) and
    # bound the prompt's tokens: the steps that re-encode what the client sent.
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 5.0}))
    engine = await start_fake("small-model")
    proxy = await start_proxy(
        [engine_config("small", "small-model", [engine.url])], policies=str(folder)
    )
    return engine, proxy


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "body",
    [
        # a field the proxy passes through untouched, and a content part's extra field
        '{"model":"small-model","messages":[{"role":"user","content":"hi"}],"metadata":{"x":%s}}',
        '{"model":"small-model","messages":[{"role":"user","content":'
        '[{"type":"text","text":"hi","x":%s}]}]}',
    ],
)
async def test_a_body_nested_deeper_than_the_proxy_can_write_is_a_400(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, body: str
) -> None:
    engine, proxy = await _budgeted_proxy(start_fake, start_proxy, tmp_path)
    resp = await proxy.client.post(
        "/v1/chat/completions",
        data=body % _nested(300),
        headers={**auth(FREE_KEY), "Content-Type": "application/json"},
    )
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "nest" in error["message"]
    assert engine.state.counters.requests == 0
    # shallower nesting passes on to the engine as before
    ok = await proxy.client.post(
        "/v1/chat/completions",
        data=body % _nested(100),
        headers={**auth(FREE_KEY), "Content-Type": "application/json"},
    )
    assert ok.status == 200


async def test_an_unknown_model_s_name_is_not_echoed_whole(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, proxy = await _budgeted_proxy(start_fake, start_proxy, tmp_path)
    name = "m" * 1_000_000
    resp = await proxy.client.post(
        "/v1/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(FREE_KEY),
    )
    assert resp.status == 404
    body = await resp.read()
    assert len(body) < 1000
    assert "1000000 characters" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [("n", 129), ("n", 100_000)])
async def test_n_beyond_openai_s_maximum_is_a_400(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, field: str, value: int
) -> None:
    # n multiplies the engine's work; max_tokens: 1 made 100,000 choices fit any budget.
    engine, proxy = await _budgeted_proxy(start_fake, start_proxy, tmp_path)
    resp = await proxy.client.post(
        "/v1/chat/completions",
        json={
            "model": "small-model",
            "messages": [{"role": "user", "content": "hi"}],
            field: value,
            "max_tokens": 1,
        },
        headers=auth(FREE_KEY),
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == field
    assert "128" in error["message"]
    assert engine.state.counters.requests == 0
