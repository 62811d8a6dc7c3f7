"""Tier policies in the request path: keys, models, limits, budgets, clamping, hot reload,
admin endpoints."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from proxy.observability.access import AccessLog
from proxy.observability.metrics import iter_samples
from proxy.policy.keys import hash_key
from proxy.policy.limits import LocalCounters
from tests.integration.conftest import Proxy, StartFake, StartProxy, engine_config, wait_until

FREE_KEY = "sk-frugal-free-0001"
PRO_KEY = "sk-frugal-pro-0001"
ADMIN_KEY = "sk-admin-0001"


def tier(name: str, keys: list[str], **overrides: Any) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "tier": name,
        "keys": [{"hash": hash_key(k), "tenant": f"{name}-tenant"} for k in keys],
        "models": ["auto", "small-model"],
        "limits": {"requests_per_minute": 1000, "concurrent": 8, "max_tokens": 64},
        "routing": {"score_threshold": 0.5},
        "latency": {"ttft_p95_ms": 3000},
        "cache": {"scope": "tenant"},
        "priority": 1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = value
    return policy


def write_policies(folder: Path, *policies: dict[str, Any]) -> Path:
    folder.mkdir(exist_ok=True)
    for policy in policies:
        (folder / f"{policy['tier']}.yaml").write_text(yaml.safe_dump(policy))
    return folder


async def proxy_with(
    start_fake: StartFake, start_proxy: StartProxy, folder: Path, **sections: Any
) -> Proxy:
    small = await start_fake("small-model")
    large = await start_fake("large-model")
    engines = [
        engine_config("small", "small-model", [small.url]),
        engine_config("large", "large-model", [large.url]),
    ]
    return await start_proxy(engines, policies=str(folder), **sections)


def chat(model: str = "small-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_required_once_any_tier_has_one(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder)
    missing = await proxy.client.post("/v1/chat/completions", json=chat())
    assert missing.status == 401
    assert (await missing.json())["error"]["type"] == "authentication_error"
    wrong = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth("sk-x"))
    assert wrong.status == 401
    assert (await wrong.json())["error"]["code"] == "invalid_api_key"
    ok = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
    assert ok.status == 200
    # The key is checked before the body: without a valid one, a malformed body is still a 401
    # (the caller learns nothing about what the proxy would accept).
    for headers in ({}, auth("sk-x")):
        junk = await proxy.client.post("/v1/chat/completions", data=b"{not json", headers=headers)
        assert junk.status == 401, await junk.text()


async def test_models_outside_the_tier_are_forbidden(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder)
    resp = await proxy.client.post(
        "/v1/chat/completions", json=chat("large-model"), headers=auth(FREE_KEY)
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "model_not_allowed"
    # `auto` is allowed: the router picks among all engines (no classifier here: the cheapest).
    resp = await proxy.client.post(
        "/v1/chat/completions", json=chat("auto"), headers=auth(FREE_KEY)
    )
    assert resp.status == 200
    assert resp.headers["x-frugal-route"] == "small"


async def test_rate_limit_is_429_with_retry_after(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(
        tmp_path / "p", tier("free", [FREE_KEY], limits={"requests_per_minute": 3})
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    statuses = []
    for _ in range(8):
        resp = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    assert statuses[0] == 200
    assert 429 in statuses


async def test_concurrency_limit(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY], limits={"concurrent": 2}))
    small = await start_fake("small-model", ttft_ms=300)
    proxy = await start_proxy(
        [engine_config("small", "small-model", [small.url])], policies=str(folder)
    )
    body = chat()
    responses = await asyncio.gather(
        *(
            proxy.client.post(
                "/v1/chat/completions",
                json={**body, "messages": [{"role": "user", "content": f"q{i}"}]},
                headers=auth(FREE_KEY),
            )
            for i in range(5)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 2
    assert statuses.count(429) == 3


async def test_budget_is_spent_then_insufficient_quota(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Each answer costs about (prompt + 16 output tokens) at $0.1/$0.2 per Mtok: reservations of
    # the worst case (64 tokens) fit a few times into a tiny budget.
    folder = write_policies(
        tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 0.00005})
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    statuses = []
    for i in range(40):
        body = {**chat(), "messages": [{"role": "user", "content": f"q{i}"}]}
        resp = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
        statuses.append(resp.status)
        if resp.status == 429:
            error = (await resp.json())["error"]
            assert error["code"] == "insufficient_quota"
            assert error["type"] == "insufficient_quota"
            # The worst case (64 tokens) no longer fits what is left: no wait helps, so no
            # Retry-After; the message says to ask for fewer tokens.
            assert "ask for fewer tokens" in error["message"], error
            assert "Retry-After" not in resp.headers
            assert resp.headers["x-should-retry"] == "false"  # the OpenAI SDKs do not retry it
            break
    assert statuses[0] == 200
    assert statuses[-1] == 429


async def test_the_budget_reservation_covers_every_choice(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """n choices can each use max_tokens: the worst case reserved before the engine call is n
    times the output, or requests running at once could overshoot the budget."""
    # worst case with n=1: about 30 prompt tokens at $0.1/Mtok + 64 output at $0.2/Mtok = $1.6e-5
    folder = write_policies(
        tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 0.00003})
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    many = await proxy.client.post("/v1/chat/completions", json=chat(n=4), headers=auth(FREE_KEY))
    # (before: $1.6e-5 reserved for a request that may cost $5.4e-5)
    assert many.status == 429
    assert (await many.json())["error"]["code"] == "insufficient_quota"
    one = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
    assert one.status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "small-model", "prompt": "hello"}),
        ("/v1/chat/completions", chat()),  # (vLLM's extra sampling fields on chat)
    ],
)
async def test_the_budget_reservation_covers_every_sequence_best_of_generates(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path, path: str, body: dict[str, Any]
) -> None:
    """The engine generates max(n, best_of) sequences, each up to max_tokens, and returns the n
    best: the worst case reserved counts the ones it discards too."""
    folder = write_policies(
        tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 0.00003})
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    many = await proxy.client.post(path, json={**body, "best_of": 4}, headers=auth(FREE_KEY))
    # (before: the worst case of one sequence, $1.6e-5, reserved for four)
    assert many.status == 429, await many.text()
    error = (await many.json())["error"]
    assert error["code"] == "insufficient_quota"
    assert "best_of" in error["message"]
    one = await proxy.client.post(path, json={**body, "best_of": 1}, headers=auth(FREE_KEY))
    assert one.status == 200, await one.text()


async def test_the_openai_sdk_does_not_retry_a_request_too_large_for_the_budget(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(
        tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 0.00003})
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    client = openai.AsyncOpenAI(
        base_url=str(proxy.client.make_url("/v1")), api_key=FREE_KEY, max_retries=2
    )
    with pytest.raises(openai.RateLimitError, match="ask for fewer tokens"):
        await client.chat.completions.create(**chat(n=4))
    await client.close()
    answered = [
        sample.labels["status"]
        for sample in iter_samples(proxy.services.metrics.registry)
        if sample.name == "frugal_requests_total"
        for _ in range(int(sample.value))
    ]
    assert answered == ["429"]  # asked once: no retry could have made it fit


async def test_max_tokens_above_the_cap_is_clamped_or_refused(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(
        tmp_path / "p",
        tier("free", [FREE_KEY]),
        tier("strict", [PRO_KEY], limits={"on_max_tokens": "reject"}),
    )
    small = await start_fake("small-model")
    proxy = await start_proxy(
        [engine_config("small", "small-model", [small.url])], policies=str(folder)
    )
    resp = await proxy.client.post(
        "/v1/chat/completions", json=chat(max_tokens=500), headers=auth(FREE_KEY)
    )
    assert resp.status == 200
    assert resp.headers["x-frugal-max-tokens-clamped"] == "64"
    import orjson

    assert orjson.loads(small.state.log[-1].body)["max_tokens"] == 64
    resp = await proxy.client.post(
        "/v1/chat/completions", json=chat(max_tokens=500), headers=auth(PRO_KEY)
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "max_tokens"
    # the refusal names the field the request used
    resp = await proxy.client.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=500), headers=auth(PRO_KEY)
    )
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "max_completion_tokens", error
    assert error["message"].startswith("max_completion_tokens 500 ")


async def test_a_completions_max_tokens_is_clamped_under_its_own_name(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """/v1/completions reads only max_tokens (vLLM's completion request has no
    max_completion_tokens): the clamp must land there, whatever other field the body carries."""
    import orjson

    folder = write_policies(
        tmp_path / "p",
        tier("free", [FREE_KEY]),
        tier("budget", [PRO_KEY], budget={"usd_per_day": 10.0}),
    )
    small = await start_fake("small-model")
    proxy = await start_proxy(
        [engine_config("small", "small-model", [small.url])], policies=str(folder)
    )
    body = {"model": "small-model", "prompt": "hi", "max_tokens": 500, "max_completion_tokens": 1}
    resp = await proxy.client.post("/v1/completions", json=body, headers=auth(FREE_KEY))
    assert resp.status == 200
    assert resp.headers["x-frugal-max-tokens-clamped"] == "64"
    # (before: max_completion_tokens became 64 and the engine read max_tokens 500)
    assert orjson.loads(small.state.log[-1].body)["max_tokens"] == 64
    # a budgeted tier's cap sent for a request that sets none goes to max_tokens too
    del body["max_tokens"]
    resp = await proxy.client.post("/v1/completions", json=body, headers=auth(PRO_KEY))
    assert resp.status == 200
    assert orjson.loads(small.state.log[-1].body)["max_tokens"] == 64


async def test_policy_files_reload_on_change_and_bad_edits_are_rejected(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder)
    new_key = "sk-frugal-new-0002"
    write_policies(folder, tier("free", [FREE_KEY, new_key]))
    reload = await proxy.client.post("/admin/policies/reload")
    assert reload.status == 200
    resp = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(new_key))
    assert resp.status == 200
    (folder / "free.yaml").write_text("tier: free\nkeys: []\nmodels: [auto]\nlimts: {}\n")
    reload = await proxy.client.post("/admin/policies/reload")
    assert reload.status == 422
    refused = await reload.json()
    errors = refused["errors"]
    assert any("free.yaml" in e for e in errors)
    # an admin error is OpenAI-shaped like every other (before: only applied/errors/tiers)
    assert refused["error"]["type"] == "invalid_request_error"
    assert refused["error"]["code"] == "invalid_policies"
    assert errors[0] in refused["error"]["message"]
    # The previous set stays in force.
    resp = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(new_key))
    assert resp.status == 200


async def test_a_reload_cannot_open_a_proxy_on_a_public_address(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Start-up refuses a keyless folder on a non-loopback host; a reload that removed the last
    key was applied, and the proxy served anyone without a key (before)."""
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder, server={"host": "0.0.0.0"})
    write_policies(folder, tier("free", []))
    reload = await proxy.client.post("/admin/policies/reload")
    assert reload.status == 422
    [error] = (await reload.json())["errors"]
    assert error.startswith(f"{folder}: no policy file defines an API key")
    assert "server.host 0.0.0.0" in error and "server.allow_open" in error
    keyless = await proxy.client.post("/v1/chat/completions", json=chat())
    assert keyless.status == 401
    ok = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
    assert ok.status == 200


async def test_a_reload_naming_a_model_no_engine_serves_is_refused(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder)
    write_policies(folder, tier("free", [FREE_KEY], models=["auto", "smal-model"]))
    reload = await proxy.client.post("/admin/policies/reload")
    assert reload.status == 422
    [error] = (await reload.json())["errors"]
    assert "free.yaml:" in error and "models.1: 'smal-model' is not served by any engine" in error
    ok = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
    assert ok.status == 200  # small-model: the previous set


async def test_admin_endpoints_need_the_admin_key(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder, admin={"keys": [hash_key(ADMIN_KEY)]})
    denied = await proxy.client.get("/admin/engines", headers=auth(FREE_KEY))
    assert denied.status == 401
    ok = await proxy.client.get("/admin/engines", headers=auth(ADMIN_KEY))
    assert ok.status == 200
    assert set(await ok.json()) == {"small", "large"}


async def test_invalid_policy_folder_stops_start_up(tmp_path: Path) -> None:
    import pytest

    from proxy.app import create_app
    from proxy.settings import ConfigError, Settings

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "free.yaml").write_text("tier: free\nmodels: [auto]\npriority: high\n")
    settings = Settings.model_validate(
        {
            "engines": [engine_config("small", "small-model", ["http://127.0.0.1:9"])],
            "policies": str(folder),
        }
    )
    with pytest.raises(ConfigError) as err:
        create_app(settings)
    assert "free.yaml:3" in str(err.value)
    assert "priority" in str(err.value)


async def test_a_policy_naming_a_model_no_engine_serves_stops_start_up(tmp_path: Path) -> None:
    # (before: a warning, and `frugal policy check --config` said exit 1 for the same folder)
    from proxy.app import create_app
    from proxy.settings import ConfigError, Settings

    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY], models=["auto", "smal"]))
    settings = Settings.model_validate(
        {
            "engines": [engine_config("small", "small-model", ["http://127.0.0.1:9"])],
            "policies": str(folder),
        }
    )
    with pytest.raises(ConfigError) as err:
        create_app(settings)
    assert "free.yaml:" in str(err.value)
    assert "models.1: 'smal' is not served by any engine" in str(err.value)


async def test_a_tier_is_never_served_an_entry_older_than_its_own_ttl(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Both tiers share the global scope; pro keeps answers a day, free only two seconds.
    folder = write_policies(
        tmp_path / "p",
        tier("free", [FREE_KEY], cache={"scope": "global", "ttl_seconds": 2}),
        tier("pro", [PRO_KEY], cache={"scope": "global", "ttl_seconds": 86400}),
    )
    proxy = await proxy_with(
        start_fake, start_proxy, folder, cache={"enabled": True, "data_dir": str(tmp_path / "c")}
    )
    body = chat(temperature=0)
    first = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(PRO_KEY))
    assert first.headers["x-frugal-cache"] == "miss"
    # The store is written behind the answer: wait for it. (Asking before it lands would be a
    # free-tier miss whose answer, stored with free's TTL, replaces pro's entry.)
    assert proxy.services.cache is not None
    await proxy.services.cache.drain()
    again = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
    assert again.headers["x-frugal-cache"] == "hit-exact"  # shared while young enough for both
    await asyncio.sleep(2.1)
    pro = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(PRO_KEY))
    assert pro.headers["x-frugal-cache"] == "hit-exact"
    free = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
    assert free.headers["x-frugal-cache"] == "miss"


async def test_the_model_list_shows_the_models_the_key_may_use(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """A chat frontend fills its model picker from /v1/models: a model the key's tier may not
    use must not be offered there (it would only answer 403)."""
    folder = write_policies(
        tmp_path / "p",
        tier("free", [FREE_KEY]),
        tier("pro", [PRO_KEY], models=["small-model", "large-model"]),
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)

    async def listed(key: str) -> list[str]:
        resp = await proxy.client.get("/v1/models", headers=auth(key))
        assert resp.status == 200
        return [m["id"] for m in (await resp.json())["data"]]

    assert await listed(FREE_KEY) == ["auto", "small-model"]
    assert await listed(PRO_KEY) == ["small-model", "large-model"]
    ok = await proxy.client.get("/v1/models/small-model", headers=auth(FREE_KEY))
    assert ok.status == 200 and (await ok.json())["id"] == "small-model"
    hidden = await proxy.client.get("/v1/models/large-model", headers=auth(FREE_KEY))
    assert hidden.status == 404
    assert (await hidden.json())["error"]["code"] == "model_not_found"
    # a misspelt model's 404 offers the models the key may use, not another tier's
    body = {"model": "smal-model", "messages": [{"role": "user", "content": "hi"}]}
    typo = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
    assert typo.status == 404
    message = (await typo.json())["error"]["message"]
    assert message.endswith("Available: auto, small-model") and "large-model" not in message
    typo = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(PRO_KEY))
    assert (await typo.json())["error"]["message"].endswith("Available: small-model, large-model")
    # like the completions, the list needs a valid key once keys are configured
    for headers in ({}, auth("sk-x")):
        for path in ("/v1/models", "/v1/models/small-model"):
            resp = await proxy.client.get(path, headers=headers)
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"


async def test_an_api_key_that_is_not_utf8_is_a_401_not_a_500(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """aiohttp decodes a header's non-UTF-8 bytes to surrogates; hashing such a key must not
    crash the request (it cannot be a valid key: issued keys are ASCII)."""
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder, admin={"keys": [hash_key(ADMIN_KEY)]})
    server = proxy.client.server
    body = b'{"model": "small-model", "messages": [{"role": "user", "content": "hi"}]}'
    for request in (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % len(body),
        b"GET /v1/models HTTP/1.1\r\n",
        b"GET /admin/engines HTTP/1.1\r\n",
    ):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            request
            + b"Host: x\r\nConnection: close\r\nAuthorization: Bearer sk-\xff\xfe\r\n\r\n"
            + (body if request.startswith(b"POST") else b"")
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), answer
        error = json.loads(payload)["error"]
        assert error["type"] == "authentication_error"


async def test_a_stream_the_client_leaves_is_charged_for_what_it_was_sent(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The engine's usage chunk comes last; a client that reads most of an answer and then
    hangs up must not get those tokens free of its budget (nor leak the reservation)."""
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY], budget={"usd_per_day": 1.0}))
    small = await start_fake("small-model", tokens_per_s=50, completion_tokens=60)
    proxy = await start_proxy(
        [engine_config("small", "small-model", [small.url])], policies=str(folder)
    )
    body = chat(stream=True, max_tokens=64)
    resp = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
    assert resp.status == 200
    received = b""
    while received.count(b"data: ") < 10:
        received += await resp.content.readany()
    resp.close()  # the client leaves with about 10 of the 60 tokens
    principal = proxy.services.policies.current.authenticate(FREE_KEY)
    limiter = proxy.services.limiter

    async def settled() -> bool:
        return (await limiter.budget_status(principal))[0].reserved_usd == 0

    await wait_until(settled)
    spent = (await limiter.budget_status(principal))[0]
    assert spent.reserved_usd == 0
    # at least the tokens it was sent, at $0.2 per million
    assert spent.spent_usd >= 8 * 0.2e-6, spent


async def test_a_stream_the_client_leaves_is_charged_for_its_prompt_too(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The engine read the whole prompt before its first token: a client that leaves before the
    usage chunk is charged an estimate of it (not 0, nor the byte-count bound), and the budget,
    tokens/minute, metrics and access line all say the same tokens. A finished stream is charged
    the engine's own counts."""
    folder = write_policies(
        tmp_path / "p",
        tier("free", [FREE_KEY], budget={"usd_per_day": 1.0}, limits={"tokens_per_minute": 10**6}),
    )
    small = await start_fake("small-model", completion_tokens=60)
    proxy = await start_proxy(
        [engine_config("small", "small-model", [small.url])], policies=str(folder)
    )
    services = proxy.services
    buffer = io.BytesIO()
    services.access_log = AccessLog(json=True, stream=buffer)
    tpm: list[float] = []  # every tokens/minute charge: the estimate at admission, then the rest
    assert type(services.limiter.backend) is LocalCounters

    class CountedCounters(LocalCounters):
        """In-process counters that note each tokens/minute charge. (A subclass: the compiled
        build's objects take no patched methods; and a subclass is charged through ``rate``.)"""

        async def rate(
            self, key: str, cost: float, per_minute: int, *, debt: bool = False
        ) -> float:
            if key.endswith(":tpm"):
                tpm.append(cost)
            return await super().rate(key, cost, per_minute, debt=debt)

    services.limiter.backend = CountedCounters()
    services.limiter._local = None  # (its in-process shortcut is for LocalCounters itself)
    principal = services.policies.current.authenticate(FREE_KEY)
    prompt = "the quick brown fox jumps over the lazy dog " * 40  # 1,760 bytes
    body = {**chat(stream=True, max_tokens=64), "messages": [{"role": "user", "content": prompt}]}

    async def settled() -> bool:
        return (await services.limiter.budget_status(principal))[0].reserved_usd == 0

    async def charged() -> tuple[dict[str, Any], float, float]:
        """The request's access line, its budget spend and its net tokens/minute charge."""
        await wait_until(lambda: buffer.getvalue().endswith(b"\n"))
        await wait_until(settled)
        line = json.loads(buffer.getvalue().splitlines()[-1])
        buffer.seek(0)
        buffer.truncate()
        spent = (await services.limiter.budget_status(principal))[0].spent_usd
        net_tpm = sum(tpm)
        tpm.clear()
        return line, spent, net_tpm

    # A finished stream: the engine's usage, as before.
    resp = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
    assert resp.status == 200
    await resp.read()
    line, spent, net_tpm = await charged()
    counted = small.state.counters.prompt  # the engine's own count of the prompt
    assert (line["status"], line["tokens_in"], line["tokens_out"]) == (200, counted, 60)
    assert net_tpm == counted + 60
    assert spent == pytest.approx((counted * 0.1 + 60 * 0.2) / 1e6)
    assert line["cost_usd"] == pytest.approx(spent)

    # The client leaves after about 10 tokens, seconds before the usage chunk.
    small.configure(tokens_per_s=20)
    resp = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
    assert resp.status == 200
    received = b""
    while received.count(b"data: ") < 10:
        received += await resp.content.readany()
    resp.close()
    line, spent_after, net_tpm = await charged()
    assert line["status"] == 499
    tokens_in, tokens_out = line["tokens_in"], line["tokens_out"]
    assert 8 <= tokens_out < 60
    # Near the engine's count: not 0, and not the bound's one token a byte (4 times as many).
    assert counted * 0.75 <= tokens_in <= counted * 1.5, (tokens_in, counted)
    assert net_tpm == tokens_in + tokens_out
    cost = (tokens_in * 0.1 + tokens_out * 0.2) / 1e6
    assert line["cost_usd"] == pytest.approx(cost)
    assert spent_after - spent == pytest.approx(cost)
    registry = services.metrics.registry
    labels = {"tier": "free", "engine": "small"}
    assert registry.get_sample_value("frugal_tokens_in_total", labels) == counted + tokens_in
    assert registry.get_sample_value("frugal_tokens_out_total", labels) == 60 + tokens_out
    assert registry.get_sample_value("frugal_cost_usd_total", labels) == pytest.approx(spent_after)


async def test_budget_gauges_follow_the_spend_and_the_policy(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The budget alerts and the dashboard read frugal_budget_spent_usd/_limit_usd."""
    folder = write_policies(
        tmp_path / "p",
        tier("free", [FREE_KEY], budget={"usd_per_day": 0.5}),
        tier("pro", [PRO_KEY]),  # no budget: no budget series
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    metrics = proxy.services.metrics
    registry = metrics.registry

    def gauge(name: str, tier_name: str) -> float | None:
        return registry.get_sample_value(name, {"tier": tier_name})

    await wait_until(lambda: gauge("frugal_budget_limit_usd", "free") == 0.5)
    assert gauge("frugal_budget_limit_usd", "free") == 0.5
    assert gauge("frugal_budget_spent_usd", "free") == 0.0
    assert gauge("frugal_budget_limit_usd", "pro") is None
    for i in range(3):
        body = {**chat(), "messages": [{"role": "user", "content": f"q{i}"}]}
        resp = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
        assert resp.status == 200
    await wait_until(lambda: (gauge("frugal_budget_spent_usd", "free") or 0.0) > 0)
    spent = gauge("frugal_budget_spent_usd", "free")
    billed = registry.get_sample_value("frugal_cost_usd_total", {"tier": "free", "engine": "small"})
    assert spent == pytest.approx(billed, abs=1e-9)  # what the requests cost
    assert metrics.snapshot()["tiers"]["free"]["budget_spent_usd"] == spent
    # A reload that takes the budget away takes its series away too.
    write_policies(folder, tier("free", [FREE_KEY]))
    assert (await proxy.client.post("/admin/policies/reload")).status == 200
    await wait_until(lambda: gauge("frugal_budget_limit_usd", "free") is None)
    assert gauge("frugal_budget_limit_usd", "free") is None
    assert gauge("frugal_budget_spent_usd", "free") is None


async def test_policy_refusals_are_counted_by_tier_and_reason(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The policy-refusal alert, the Grafana panel and the dashboard read this counter."""
    folder = write_policies(
        tmp_path / "p", tier("free", [FREE_KEY], limits={"requests_per_minute": 1})
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    post = proxy.client.post
    assert (await post("/v1/chat/completions", json=chat())).status == 401
    refused_model = await post(
        "/v1/chat/completions", json=chat("large-model"), headers=auth(FREE_KEY)
    )
    assert refused_model.status == 403
    assert (await post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))).status == 200
    assert (await post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))).status == 429
    registry = proxy.services.metrics.registry
    counted = {
        (s.labels["tier"], s.labels["reason"]): s.value
        for s in iter_samples(registry)
        if s.name == "frugal_policy_rejected_total"
    }
    assert counted == {
        ("-", "missing_api_key"): 1,
        ("free", "model_not_allowed"): 1,
        ("free", "rate_limit_exceeded"): 1,
    }
    assert proxy.services.metrics.snapshot()["rejections"]["policy"] == 3


async def test_the_access_line_names_the_keys_tenant(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    folder = write_policies(tmp_path / "p", tier("free", [FREE_KEY]))
    proxy = await proxy_with(start_fake, start_proxy, folder)
    buffer = io.BytesIO()
    proxy.services.access_log = AccessLog(json=True, stream=buffer)
    resp = await proxy.client.post("/v1/chat/completions", json=chat(), headers=auth(FREE_KEY))
    assert resp.status == 200
    await wait_until(lambda: b"\n" in buffer.getvalue())
    line = json.loads(buffer.getvalue().splitlines()[0])
    assert (line["tier"], line["tenant"]) == ("free", "free-tenant")
    assert FREE_KEY not in buffer.getvalue().decode()  # the key itself never
