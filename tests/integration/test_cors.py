"""Browser frontends: CORS preflights and headers, only for the origins the config allows."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.cors import allowed_origin
from tests.integration.conftest import StartFake, StartProxy, engine_config

APP = "https://chat.example.com"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def test_allowed_origin() -> None:
    assert allowed_origin(APP, [APP]) == APP
    assert allowed_origin("https://evil.example", [APP]) is None
    assert allowed_origin(APP, ["*"]) == "*"
    assert allowed_origin(None, ["*"]) is None  # not a browser's cross-origin request
    assert allowed_origin(APP, []) is None  # off


async def test_cors_is_off_unless_configured(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m")
    proxy = await start_proxy([engine_config("e", "m", [engine.url])])
    resp = await proxy.client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await proxy.client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("allow", [[APP], ["*"]], ids=["listed", "any"])
async def test_an_allowed_origin_gets_preflights_and_readable_answers(
    start_fake: StartFake, start_proxy: StartProxy, allow: list[str]
) -> None:
    engine = await start_fake("m")
    server: dict[str, Any] = {"cors": {"allow_origins": allow, "max_age_s": 300}}
    proxy = await start_proxy([engine_config("e", "m", [engine.url])], server=server)
    expected = "*" if allow == ["*"] else APP

    resp = await proxy.client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == expected
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert (
        resp.headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
    )
    assert resp.headers["Access-Control-Max-Age"] == "300"

    for stream in (False, True):
        body = {**CHAT, "stream": stream}
        resp = await proxy.client.post("/v1/chat/completions", json=body, headers={"Origin": APP})
        assert resp.status == 200
        await resp.read()
        assert resp.headers["Access-Control-Allow-Origin"] == expected
        exposed = resp.headers["Access-Control-Expose-Headers"]
        assert "x-frugal-cache" in exposed and "x-frugal-engine" in exposed
        assert "Retry-After" in exposed and "x-should-retry" in exposed  # the SDKs' retry hints
    # errors are readable too (a frontend shows the message), and the models list
    bad = await proxy.client.post("/v1/chat/completions", data=b"{", headers={"Origin": APP})
    assert bad.status == 400 and bad.headers["Access-Control-Allow-Origin"] == expected
    models = await proxy.client.get("/v1/models", headers={"Origin": APP})
    assert models.status == 200 and models.headers["Access-Control-Allow-Origin"] == expected


async def test_an_origin_not_listed_gets_no_cors_headers(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m")
    server = {"cors": {"allow_origins": [APP]}}
    proxy = await start_proxy([engine_config("e", "m", [engine.url])], server=server)
    other = {**PREFLIGHT, "Origin": "https://evil.example"}
    resp = await proxy.client.options("/v1/chat/completions", headers=other)
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    # like every refusal, OpenAI-shaped JSON
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    resp = await proxy.client.post(
        "/v1/chat/completions", json=CHAT, headers={"Origin": other["Origin"]}
    )
    # the request itself is served (CORS binds browsers, not servers), the browser gets no read
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
