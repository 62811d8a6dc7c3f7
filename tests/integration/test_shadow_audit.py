"""Cache audits and the self-tuned cut-off in the request path, against a fake engine.

The stand-in embedder is a bag of words and the cache's verifier a plain cosine (threshold 0.92),
so which questions hit is easy to see: 20 shared words plus one more (or one swapped) is a
paraphrase with cosine 0.95-0.98. The fake engine's answer is a function of the prompt, so the
answer to a paraphrase differs from the cached one: an audit disagrees.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from aiohttp.test_utils import TestClient

from proxy.app import SERVICES, create_app
from proxy.services import Services
from proxy.settings import Settings
from proxy.shadow import audit
from tests.integration.conftest import StartFake, engine_config, wait_until
from tests.integration.test_cache_pipeline import bag_of_words
from tests.integration.test_policy_pipeline import FREE_KEY, auth, tier, write_policies

WORDS = " ".join(f"w{i}" for i in range(20))  # the cached question
PARAPHRASES = [f"{WORDS} extra{i}" for i in range(6)]  # cosine 20/sqrt(420) = 0.976
SWAPPED = " ".join(f"w{i}" for i in range(19)) + " other"  # cosine 19/20 = 0.95


def ask(text: str) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 8,
    }


async def start(
    aiohttp_client: Any,
    tmp_path: Path,
    engine_url: str,
    *,
    audit: dict[str, Any] | None = None,
    **policy: Any,
) -> TestClient[Any, Any]:
    folder = write_policies(
        tmp_path / "policies",
        tier("free", [FREE_KEY], models=["m"], **{"cache": {"scope": "tier"}, **policy}),
    )
    settings = Settings.model_validate(
        {
            "engines": [engine_config("e", "m", [engine_url])],
            "policies": str(folder),
            "data_dir": str(tmp_path / "data"),
            "health": {"interval_s": 0.1},
            # (off: the engine's requests counted here are the audits' own, with no user's
            # request sent beside its lookup and closed on the hit)
            "cache": {
                "enabled": True,
                "semantic": True,
                "audit": audit or {},
                "lookup_beside_engine": False,
            },
            "routing": {"enabled": False},
            # Audits are what is tested, not shedding: on a loaded box a paraphrase must still
            # be embedded (and hit), however long the encoder's queue looks.
            "embeddings": {"max_queue_ms": None},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    return await aiohttp_client(create_app(settings, encode=bag_of_words, access_log=False))


def services_of(client: TestClient[Any, Any]) -> Services:
    assert client.server.app is not None
    return client.server.app[SERVICES]


async def post(client: TestClient[Any, Any], text: str) -> Any:
    resp = await client.post("/v1/chat/completions", json=ask(text), headers=auth(FREE_KEY))
    assert resp.status == 200, await resp.text()
    return resp


async def store(client: TestClient[Any, Any], text: str = WORDS) -> None:
    first = await post(client, text)
    assert first.headers["x-frugal-cache"] == "miss"
    cache = services_of(client).cache
    assert cache is not None
    await cache.drain()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_an_audited_hit_asks_the_engine_once_in_the_background_and_is_not_billed(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0},
        limits={"requests_per_minute": 1000, "concurrent": 1, "max_tokens": 64},
        budget={"usd_per_day": 1.0},
    )
    services = services_of(client)
    assert services.auditor is not None
    await store(client)
    assert engine.state.counters.requests == 1
    limiter, principal = services.limiter, services.policies.current.authenticate(FREE_KEY)
    spent_before = (await limiter.budget_status(principal))[0].spent_usd

    # The engine stops answering: the user's semantic hit must come back anyway, with the
    # audit still waiting on the engine.
    engine.configure(hang=True)
    hit = await post(client, PARAPHRASES[0])
    assert hit.headers["x-frugal-cache"] == "hit-semantic"
    await wait_until(lambda: engine.state.counters.requests == 2)
    assert engine.state.counters.requests == 2
    assert services.auditor.in_flight == 1
    audit_request = engine.state.log[-1]
    assert ("x-frugal-audit", "1") in [(k.lower(), v) for k, v in audit_request.headers]
    assert b'"stream":false' in audit_request.body

    # The tier allows one request at a time: the audit in flight does not take that slot.
    another = await post(client, PARAPHRASES[1])
    assert another.headers["x-frugal-cache"] == "hit-semantic"  # (its own audit is sampled too)

    engine.configure(hang=False)
    await services.auditor.drain()
    assert engine.state.counters.requests == 3  # one audit per audited hit, nothing else
    assert (await limiter.budget_status(principal))[0].spent_usd == spent_before
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="disagree") == 2
    assert (metric(text, "frugal_cache_audit_cost_usd_total", tier="free", engine="e") or 0) > 0
    assert metric(text, "frugal_cache_audit_disagreement_rate", tier="free") == 1.0
    low = metric(text, "frugal_cache_audit_disagreement_rate_low", tier="free")
    assert low is not None and 0 < low < 1


async def test_disagreement_rate_moves_with_what_the_audits_find(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    # Every answer counts as agreeing when any embedding cosine does (bound -1) ...
    client = await start(
        aiohttp_client, tmp_path, engine.url, audit={"share": 1.0, "similarity_bound": -1.0}
    )
    services = services_of(client)
    assert services.auditor is not None
    await store(client)
    for text in PARAPHRASES[:4]:
        assert (await post(client, text)).headers["x-frugal-cache"] == "hit-semantic"
        # one audit at a time: a hit no longer waits for the previous hit's audit (its answers
        # are embedded off the request queue), and a third audit in flight would be dropped
        await services.auditor.drain()
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="agree") == 4
    assert metric(text, "frugal_cache_audit_disagreement_rate", tier="free") == 0.0
    high = metric(text, "frugal_cache_audit_disagreement_rate_high", tier="free")
    assert high is not None and 0 < high < 1
    stats = await (await client.get("/admin/cache/stats")).json()
    assert stats["audits"]["free"]["audits"] == 4
    assert stats["audits"]["free"]["disagreements"] == 0


async def test_the_tuner_raises_a_tier_cutoff_when_audits_disagree(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0, "compare": "exact"},
        cache={
            "scope": "tier",
            "verifier_cutoff": 0.92,
            "audit": {"target": 0.02},
            "tune": {
                "enabled": True,
                "rule": "step",
                "min": 0.92,
                "max": 0.99,
                "step": 0.05,
                "min_audits": 3,
            },
        },
    )
    services = services_of(client)
    assert services.auditor is not None and services.tuner is not None
    await store(client)
    # A one-word swap (cosine 0.95) is a hit at the starting cut-off ...
    assert (await post(client, SWAPPED)).headers["x-frugal-cache"] == "hit-semantic"
    await services.auditor.drain()
    with structlog.testing.capture_logs() as logs:
        for paraphrase in PARAPHRASES[:2]:
            assert (await post(client, paraphrase)).headers["x-frugal-cache"] == "hit-semantic"
            await services.auditor.drain()
    # ... three disagreeing audits later the tier's cut-off has moved to its maximum ...
    moves = [e for e in logs if e["event"] == "cache cut-off tuned"]
    assert len(moves) == 1
    assert moves[0]["tier"] == "free" and moves[0]["reason"] == "disagreement_above_target"
    raised = moves[0]["new"]
    assert moves[0]["old"] == 0.92 and 0.95 < raised < 0.99  # 4 steps in logit space
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_threshold", tier="free", kind="cache_cutoff") == raised
    changes = metric(
        text,
        "frugal_threshold_changes_total",
        tier="free",
        kind="cache_cutoff",
        reason="disagreement_above_target",
    )
    assert changes == 1
    # ... and the lookups use it: the same kind of paraphrase is now a miss.
    swapped_again = " ".join(f"w{i}" for i in range(19)) + " another"
    assert (await post(client, swapped_again)).headers["x-frugal-cache"] == "miss"


async def test_audits_and_tuning_switched_off(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0},
        cache={"scope": "tier", "audit": {"share": 0.0}, "tune": {"enabled": False}},
    )
    services = services_of(client)
    assert services.auditor is not None and services.tuner is not None
    await store(client)
    for text in PARAPHRASES:
        assert (await post(client, text)).headers["x-frugal-cache"] == "hit-semantic"
    await services.auditor.drain()
    assert engine.state.counters.requests == 1  # the tier's share 0 wins over the config's 1
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="disagree") is None
    assert metric(text, "frugal_threshold", tier="free", kind="cache_cutoff") is None


async def test_tuning_off_keeps_the_cutoff_while_audits_still_measure(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0, "compare": "exact"},
        cache={"scope": "tier", "tune": {"enabled": False, "min_audits": 1}},
    )
    services = services_of(client)
    assert services.auditor is not None
    await store(client)
    for text in PARAPHRASES:
        assert (await post(client, text)).headers["x-frugal-cache"] == "hit-semantic"
        await services.auditor.drain()
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="disagree") == 6
    assert metric(text, "frugal_threshold_changes_total", tier="free") is None
    assert (await post(client, SWAPPED)).headers["x-frugal-cache"] == "hit-semantic"


async def test_audits_beyond_the_concurrency_bound_are_dropped(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    client = await start(
        aiohttp_client, tmp_path, engine.url, audit={"share": 1.0, "max_concurrent": 1}
    )
    services = services_of(client)
    assert services.auditor is not None
    await store(client)
    engine.configure(hang=True)
    for text in PARAPHRASES[:3]:
        assert (await post(client, text)).headers["x-frugal-cache"] == "hit-semantic"
    assert services.auditor.in_flight == 1
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="dropped") == 2
    engine.configure(hang=False)
    await services.auditor.drain()
    assert engine.state.counters.requests == 2


async def test_strong_share_follows_an_overrun_budget(
    start_fake: StartFake, start_proxy: Any, tmp_path: Path
) -> None:
    from tests.integration.test_policy_pipeline import proxy_with

    folder = write_policies(
        tmp_path / "p",
        tier(
            "free",
            [FREE_KEY],
            budget={"usd_per_day": 0.01},
            routing={
                "score_threshold": None,
                "strong_share": 0.3,
                "follow_budget": {"enabled": True, "window_s": 0.3, "min_share": 0.1, "step": 0.1},
            },
        ),
    )
    proxy = await proxy_with(start_fake, start_proxy, folder)
    proxy.services.router.budget.every_s = 0.0  # re-evaluate on every request

    async def share_moved() -> bool:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
        resp = await proxy.client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
        assert resp.status == 200
        text = await (await proxy.client.get("/metrics")).text()
        return metric(text, "frugal_threshold", tier="free", kind="strong_share") is not None

    # A few answers a second is thousands of times this budget's pace: the share must drop.
    await wait_until(share_moved)
    text = await (await proxy.client.get("/metrics")).text()
    share = metric(text, "frugal_threshold", tier="free", kind="strong_share")
    assert share is not None and 0.1 <= share < 0.3
    reason = "spend_above_budget"
    assert metric(text, "frugal_threshold_changes_total", tier="free", reason=reason)


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [("engine fails", "error"), ("answers never embedded", "dropped")],
)
async def test_an_audit_that_cannot_conclude_is_counted_and_moves_nothing(
    start_fake: StartFake,
    aiohttp_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
    outcome: str,
) -> None:
    # Audits embed at the lowest CPU priority; under sustained load that may not happen for a
    # long time: the audit gives up its slot after EMBED_WAIT_S instead of holding it.
    monkeypatch.setattr(audit, "EMBED_WAIT_S", 0.05)
    engine = await start_fake("m")
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0},
        cache={"scope": "tier", "tune": {"enabled": True, "min_audits": 1}},
    )
    services = services_of(client)
    assert services.auditor is not None and services.tuner is not None
    await store(client)

    async def never(text: str) -> np.ndarray:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    if failure == "engine fails":
        engine.configure(fail_fraction=1.0, fail_status=500)
    else:
        services.auditor._embedder = lambda: never
    before = services.tuner.report()
    hit = await post(client, PARAPHRASES[0])
    assert hit.headers["x-frugal-cache"] == "hit-semantic"
    await asyncio.wait_for(services.auditor.drain(), timeout=10)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome=outcome) == 1
    assert services.tuner.report() == before  # no outcome, no move


def counterfactual_policy(**audit: Any) -> dict[str, Any]:
    """A tier tightened to its max (0.99): paraphrases at cosine 0.976 are refused by the cut-off
    alone, so every such miss is a counterfactual audit (share 1)."""
    return {
        "scope": "tier",
        "verifier_cutoff": 0.99,
        "audit": {"target": 0.5, **audit},
        "tune": {"enabled": True, "rule": "evidence", "min": 0.9, "max": 0.99, "min_audits": 3},
    }


async def test_counterfactual_audits_relax_a_tier_that_serves_nothing(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    # Every answer "agrees" (embedding cosine >= -1): the refused paraphrases would have been
    # right, and the evidence rule must come down from its maximum on that alone.
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0, "compare": "embedding", "similarity_bound": -1.0},
        cache=counterfactual_policy(),
    )
    services = services_of(client)
    assert services.auditor is not None and services.tuner is not None
    await store(client)
    with structlog.testing.capture_logs() as logs:
        for paraphrase in PARAPHRASES[:2]:
            assert (await post(client, paraphrase)).headers["x-frugal-cache"] == "miss"
            await services.auditor.drain()
        # A streamed miss is audited from its assembled answer.
        body = {**ask(PARAPHRASES[2]), "stream": True}
        resp = await client.post("/v1/chat/completions", json=body, headers=auth(FREE_KEY))
        assert resp.status == 200 and resp.headers["x-frugal-cache"] == "miss"
        assert "[DONE]" in await resp.text()
        await wait_until(lambda: services.auditor is not None and services.auditor.in_flight == 0)
        await services.auditor.drain()
    # No extra engine call: one answer per user request, the audits compared stored answers.
    assert engine.state.counters.requests == 4
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="would_agree") == 3
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="agree") is None
    moves = [e for e in logs if e["event"] == "cache cut-off tuned"]
    assert [(m["old"], m["new"], m["reason"]) for m in moves] == [
        (0.99, 0.9, "relaxed_on_evidence")
    ]
    # The published hit-audit estimate is untouched: these were not hits.
    assert services.tuner.report()["free"]["audits"] == 0
    # The relaxed cut-off serves the next paraphrase.
    assert (await post(client, PARAPHRASES[3])).headers["x-frugal-cache"] == "hit-semantic"


async def test_counterfactual_audits_that_disagree_keep_the_tier_tight(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    # The fake's answer depends on the prompt: exact comparison says every paraphrase disagrees.
    client = await start(
        aiohttp_client,
        tmp_path,
        engine.url,
        audit={"share": 1.0, "compare": "exact"},
        cache=counterfactual_policy(),
    )
    services = services_of(client)
    assert services.auditor is not None and services.tuner is not None
    await store(client)
    for paraphrase in PARAPHRASES[:4]:
        assert (await post(client, paraphrase)).headers["x-frugal-cache"] == "miss"
        await services.auditor.drain()
    assert engine.state.counters.requests == 5
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="would_disagree") == 4
    policy = services.policies.current.authenticate(FREE_KEY).policy
    assert services.tuner.cutoff("free", policy.cache) == 0.99
    assert (await post(client, PARAPHRASES[4])).headers["x-frugal-cache"] == "miss"


async def test_no_counterfactual_audits_without_the_evidence_rule(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = await start_fake("m")
    policy = counterfactual_policy()
    policy["tune"] = {**policy["tune"], "counterfactual": False}
    client = await start(aiohttp_client, tmp_path, engine.url, audit={"share": 1.0}, cache=policy)
    services = services_of(client)
    assert services.auditor is not None
    await store(client)
    for paraphrase in PARAPHRASES[:3]:
        assert (await post(client, paraphrase)).headers["x-frugal-cache"] == "miss"
    await services.auditor.drain()
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="would_disagree") is None
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="would_agree") is None


async def test_an_audit_of_a_canary_hit_asks_the_canary_for_its_own_model(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    # A canary serving another model name answers 404 to the engine's client-facing name: the
    # audit of a hit the canary stored must send the name the canary serves, as requests do.
    stable = await start_fake("m")
    canary = await start_fake("m-canary")
    folder = write_policies(
        tmp_path / "policies",
        tier("free", [FREE_KEY], models=["m"], cache={"scope": "tier"}),
    )
    engine = engine_config(
        "e",
        "m",
        [stable.url],
        version="v1",
        canary={"version": "v2", "urls": [canary.url], "share": 1.0, "model": "m-canary"},
    )
    settings = Settings.model_validate(
        {
            "engines": [engine],
            "policies": str(folder),
            "data_dir": str(tmp_path / "data"),
            "health": {"interval_s": 0.1},
            "cache": {
                "enabled": True,
                "semantic": True,
                "audit": {"share": 1.0},
                "lookup_beside_engine": False,  # (as in start())
            },
            "routing": {"enabled": False},
            "logging": {"level": "warning", "format": "console"},
        }
    )
    client = await aiohttp_client(create_app(settings, encode=bag_of_words, access_log=False))
    services = services_of(client)
    assert services.auditor is not None
    await store(client)
    hit = await post(client, PARAPHRASES[0])
    assert hit.headers["x-frugal-cache"] == "hit-semantic"
    assert hit.headers["x-frugal-model-version"] == "v2"
    await services.auditor.drain()
    assert canary.state.counters.requests == 2 and stable.state.counters.requests == 0
    assert b'"model":"m-canary"' in canary.state.log[-1].body
    text = await (await client.get("/metrics")).text()
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="error") is None
    assert metric(text, "frugal_cache_audit_total", tier="free", outcome="disagree") == 1
