"""The rollout's pure parts: the sticky split, the state machine and its start-up rule, the judge,
the shadow comparison, and the canary's configuration."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rollout.judge import Bounds, Window, judge, quantile_bounds, z_score
from proxy.rollout.shadow import agree, answer_text, is_deterministic, shadow_body, token_overlap
from proxy.rollout.split import goes_to_canary, split_bucket
from proxy.rollout.state import (
    ConfiguredRollout,
    ReplicaSet,
    RolloutConflict,
    RolloutState,
    from_config,
    resolve_at_startup,
)
from proxy.settings import ConfigError, parse_settings
from proxy.stats import wilson_interval

# -- split ------------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=20), st.binary(max_size=200))
def test_bucket_is_in_unit_interval_and_deterministic(engine: str, conversation: bytes) -> None:
    bucket = split_bucket(engine, conversation)
    assert 0.0 <= bucket < 1.0
    assert split_bucket(engine, conversation) == bucket


@given(
    st.text(min_size=1, max_size=20),
    st.binary(max_size=200),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_raising_the_share_never_moves_a_conversation_back_to_stable(
    engine: str, conversation: bytes, a: float, b: float
) -> None:
    low, high = sorted((a, b))
    if goes_to_canary(engine, conversation, low):
        assert goes_to_canary(engine, conversation, high)


@given(st.binary(max_size=100))
def test_share_zero_and_one_are_absolute(conversation: bytes) -> None:
    assert not goes_to_canary("e", conversation, 0.0)
    assert goes_to_canary("e", conversation, 1.0)


def test_split_share_is_close_to_the_target_over_many_conversations() -> None:
    rng = random.Random(7)
    conversations = [rng.randbytes(24) for _ in range(20_000)]
    share = sum(goes_to_canary("small", c, 0.1) for c in conversations) / len(conversations)
    assert abs(share - 0.1) < 0.01


def test_split_depends_on_the_engine_name() -> None:
    rng = random.Random(3)
    conversations = [rng.randbytes(24) for _ in range(2_000)]
    a = [goes_to_canary("small", c, 0.5) for c in conversations]
    b = [goes_to_canary("large", c, 0.5) for c in conversations]
    assert a != b  # two engines' canaries do not take the very same conversations


# -- state machine ----------------------------------------------------------------------------

STABLE = ReplicaSet("v1", ("http://a:1",), "m")
CANARY = ReplicaSet("v2", ("http://b:1",), "m")
CONFIG = ConfiguredRollout("small", STABLE, CANARY, 0.1)


def test_from_config_with_and_without_a_canary() -> None:
    state = from_config(CONFIG, now=1.0)
    assert (state.status, state.share, state.canary) == ("canary", 0.1, CANARY)
    plain = from_config(dataclasses.replace(CONFIG, canary=None), now=1.0)
    assert (plain.status, plain.canary, plain.share) == ("none", None, 0.0)


def test_promote_makes_the_canary_stable() -> None:
    state = from_config(CONFIG, now=1.0).promote(now=2.0)
    assert state.stable == CANARY and state.canary is None
    assert (state.status, state.previous, state.rev, state.changed_at) == ("promoted", "v1", 1, 2.0)
    assert state.served_versions() == {"v2"}
    with pytest.raises(RolloutConflict):
        state.promote(now=3.0)
    with pytest.raises(RolloutConflict):
        state.rollback(now=3.0)


def test_rollback_removes_the_canary() -> None:
    state = from_config(CONFIG, now=1.0).rollback(now=2.0, reason="auto: error_rate")
    assert state.stable == STABLE and state.canary is None
    assert (state.status, state.previous, state.reason) == ("rolled_back", "v2", "auto: error_rate")
    with pytest.raises(RolloutConflict):
        state.with_share(0.5, now=3.0)


def test_share_changes_only_the_share() -> None:
    state = from_config(CONFIG, now=1.0).with_share(0.5, now=2.0)
    assert (state.share, state.status, state.rev) == (0.5, "canary", 1)
    with pytest.raises(ValueError, match="share"):
        state.with_share(1.5, now=2.0)


@given(st.lists(st.sampled_from(["promote", "rollback", "share"]), max_size=6))
def test_state_json_round_trips_after_any_transitions(actions: list[str]) -> None:
    state = from_config(CONFIG, now=1.0)
    for i, action in enumerate(actions):
        try:
            if action == "promote":
                state = state.promote(now=float(i))
            elif action == "rollback":
                state = state.rollback(now=float(i))
            else:
                state = state.with_share(0.3, now=float(i))
        except RolloutConflict:
            assert state.status != "canary"
    assert RolloutState.from_json(state.to_json()) == state


@pytest.mark.parametrize(
    "change",
    [{"share": 5}, {"share": -0.5}, {"status": "canary", "canary": None}, {"status": "paused"}],
)
def test_a_persisted_state_that_cannot_be_is_refused(change: dict[str, object]) -> None:
    # A hand-edited rollout.json (or another build's Redis entry) must not put a share of 5 or
    # a canary with no replicas into service: the store logs it and the config decides.
    raw = {**from_config(CONFIG, now=1.0).to_json(), **change}
    with pytest.raises(ValueError):
        RolloutState.from_json(raw)


def test_startup_keeps_a_promotion_when_the_config_is_unchanged() -> None:
    promoted = from_config(CONFIG, now=1.0).promote(now=2.0)
    assert resolve_at_startup(CONFIG, promoted, now=3.0) == promoted
    rolled_back = from_config(CONFIG, now=1.0).rollback(now=2.0)
    assert resolve_at_startup(CONFIG, rolled_back, now=3.0) == rolled_back
    shared = from_config(CONFIG, now=1.0).with_share(0.4, now=2.0)
    assert resolve_at_startup(CONFIG, shared, now=3.0).share == 0.4


def test_startup_follows_a_config_whose_stable_changed() -> None:
    promoted = from_config(CONFIG, now=1.0).promote(now=2.0)
    new_config = ConfiguredRollout("small", CANARY, None, 0.0)  # the operator wrote v2 in
    state = resolve_at_startup(new_config, promoted, now=3.0)
    assert (state.stable, state.canary, state.status) == (CANARY, None, "none")
    assert state.rev > promoted.rev


def test_startup_starts_a_new_canary_on_top_of_a_promotion() -> None:
    promoted = from_config(CONFIG, now=1.0).promote(now=2.0)
    v3 = ReplicaSet("v3", ("http://c:1",), "m")
    state = resolve_at_startup(dataclasses.replace(CONFIG, canary=v3), promoted, now=3.0)
    assert (state.stable, state.canary, state.status, state.share) == (CANARY, v3, "canary", 0.1)


def test_startup_follows_a_share_changed_in_the_config() -> None:
    # The operator edits the canary's share in the config and restarts: the new share applies,
    # on a canary running with the configured share or one an admin set since.
    for running in (
        from_config(CONFIG, now=1.0),
        from_config(CONFIG, now=1.0).with_share(0.4, now=2.0),
    ):
        state = resolve_at_startup(dataclasses.replace(CONFIG, share=0.3), running, now=3.0)
        assert (state.status, state.canary, state.share) == ("canary", CANARY, 0.3)
        assert state.rev > running.rev
        # ... and the next restart with that config keeps it, or an admin's share set after it.
        assert resolve_at_startup(dataclasses.replace(CONFIG, share=0.3), state, now=4.0) == state
        later = state.with_share(0.6, now=5.0)
        assert resolve_at_startup(dataclasses.replace(CONFIG, share=0.3), later, now=6.0) == later
    # A share edit does not bring back a canary that was rolled back or promoted.
    for done in (
        from_config(CONFIG, now=1.0).rollback(now=2.0),
        from_config(CONFIG, now=1.0).promote(now=2.0),
    ):
        state = resolve_at_startup(dataclasses.replace(CONFIG, share=0.3), done, now=3.0)
        assert (state.status, state.canary, state.stable) == (done.status, None, done.stable)


def test_startup_drops_a_canary_removed_from_the_config() -> None:
    running = from_config(CONFIG, now=1.0)
    state = resolve_at_startup(dataclasses.replace(CONFIG, canary=None), running, now=2.0)
    assert (state.canary, state.status, state.stable) == (None, "none", STABLE)


# -- judge ------------------------------------------------------------------------------------


def test_wilson_interval_contains_the_rate_and_narrows_with_n() -> None:
    z = z_score(0.99)
    wide, narrow = wilson_interval(5, 100, z), wilson_interval(50, 1000, z)
    assert wide.low < 0.05 < wide.high
    assert narrow.high - narrow.low < wide.high - wide.low
    assert (wilson_interval(0, 0, z).low, wilson_interval(0, 0, z).high) == (0.0, 1.0)


@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_bounds_are_ordered_and_in_range(errors: int, n: int) -> None:
    errors = min(errors, n)
    interval = wilson_interval(errors, n, z_score(0.95))
    assert 0.0 <= interval.low <= errors / n + 1e-12
    assert errors / n - 1e-12 <= interval.high <= 1.0


def test_quantile_bounds_bracket_the_sample_quantile() -> None:
    values = [i / 1000 for i in range(1000)]
    low, high = quantile_bounds(values, 0.95, z_score(0.99))
    assert low < 0.95 < high
    assert high - low < 0.05


BOUNDS = Bounds(min_requests=100, max_error_rate_delta=0.02, max_latency_ratio=1.5)


def window(n: int, errors: int, latency: float = 0.1) -> Window:
    return Window(n, errors, [latency * (1 + i / (n * 10)) for i in range(n - errors)])


def test_judge_trips_on_an_erroring_canary() -> None:
    verdict = judge(window(200, 60), window(2000, 10), BOUNDS)
    assert verdict is not None and verdict.reason == "error_rate"


def test_judge_needs_enough_requests() -> None:
    assert judge(window(50, 50), window(2000, 0), BOUNDS) is None
    assert judge(window(200, 200), window(50, 0), BOUNDS) is None


def test_judge_leaves_a_healthy_or_slightly_worse_canary_alone() -> None:
    assert judge(window(200, 0), window(2000, 0), BOUNDS) is None
    assert judge(window(200, 2), window(2000, 10), BOUNDS) is None  # 1% vs 0.5%: inside bounds


def test_judge_trips_on_a_slow_canary_only_beyond_the_ratio() -> None:
    slow = judge(window(300, 0, latency=0.5), window(2000, 0, latency=0.1), BOUNDS)
    assert slow is not None and slow.reason == "latency"
    assert judge(window(300, 0, latency=0.12), window(2000, 0, latency=0.1), BOUNDS) is None


@given(st.integers(100, 400), st.integers(100, 400), st.floats(0, 0.2))
def test_judge_never_trips_when_canary_equals_stable(n_c: int, n_s: int, rate: float) -> None:
    canary = window(n_c, math.floor(n_c * rate))
    stable = window(n_s, math.floor(n_s * rate))
    assert judge(canary, stable, BOUNDS) is None


# -- shadow comparison ------------------------------------------------------------------------


def test_answer_text_of_chat_and_completion_bodies() -> None:
    assert answer_text(b'{"choices":[{"message":{"content":"hi"}}]}') == "hi"
    assert answer_text(b'{"choices":[{"text":"yo"}]}') == "yo"
    assert answer_text(b'{"error":{}}') is None
    assert answer_text(b"not json") is None


def test_agreement_is_exact_for_deterministic_requests_and_overlap_otherwise() -> None:
    assert is_deterministic({"temperature": 0}) and not is_deterministic({})
    assert agree("Paris.", "Paris.", deterministic=True, overlap_agree=0.6)
    assert not agree("Paris.", "paris", deterministic=True, overlap_agree=0.6)
    assert agree("Paris.", "paris", deterministic=False, overlap_agree=0.6)
    assert token_overlap("a b c d", "a b c e") == pytest.approx(3 / 5)
    assert not agree("a b c d", "a b x y", deterministic=False, overlap_agree=0.6)


def test_shadow_body_is_not_streamed_and_names_the_other_model() -> None:
    body = shadow_body({"model": "m", "stream": True, "stream_options": {}, "n": 1}, "m2")
    assert body == b'{"model":"m2","n":1}'


# -- configuration ----------------------------------------------------------------------------

ENGINE = "engines:\n  - name: small\n    model: m\n    version: v1\n    urls: [http://a:1]\n"


def test_canary_config_parses_with_defaults() -> None:
    settings = parse_settings(
        ENGINE + "    canary: {version: v2, urls: ['http://b:1/'], share: 0.05}\n"
    )
    canary = settings.engines[0].canary
    assert canary is not None and canary.urls == ["http://b:1"]
    assert canary.auto_rollback.enabled and canary.quality.share == 0.0


@pytest.mark.parametrize(
    ("canary", "field", "message"),
    [
        ("{version: v2, urls: [http://b:1], share: 1.5}", "canary.share", "less than or equal"),
        ("{version: auto, urls: [http://b:1], share: 0.1}", "canary.version", "fixed version"),
        ("{version: v1, urls: [http://b:1], share: 0.1}", "engines.0", "must differ"),
        ("{version: v2, urls: [http://a:1], share: 0.1}", "engines.0", "repeat"),
        ("{version: v2, urls: [http://b:1], share: 0.1, shares: 1}", "canary.shares", "unknown"),
        (
            "{version: v2, urls: [http://b:1], share: 0.1, auto_rollback: {min_requests: 1}}",
            "canary.auto_rollback.min_requests",
            "greater than or equal",
        ),
    ],
)
def test_canary_config_errors_name_the_field(canary: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(ENGINE + f"    canary: {canary}\n", source="c.yaml")
    text = str(info.value)
    assert field in text and message in text and "c.yaml:" in text


# -- per-version window -----------------------------------------------------------------------


def test_window_figures_count_engine_answers_and_forget_old_samples() -> None:
    from proxy.rollout.stats import VersionWindow

    window = VersionWindow(window_s=60)
    for i in range(100):
        window.record(at=float(i), from_cache=False, error=i % 10 == 0, latency_s=i / 100,
                      tokens_out=10, cost_usd=0.001)  # fmt: skip
    window.record(at=99.0, from_cache=True, error=False, latency_s=0.0, tokens_out=10, cost_usd=0)
    figures = window.figures(now=100.0)  # samples at 40..99 are inside the last 60 s
    assert figures["requests"] == 61 and figures["cache_hits"] == 1
    assert figures["engine_answers"] == 60 and figures["errors"] == 6
    assert figures["error_rate"] == pytest.approx(0.1)
    assert figures["latency_ms"]["p50"] == pytest.approx(700.0)  # between 0.69 and 0.71
    assert figures["tokens_per_answer"] == 10.0
    judged = window.judged(now=100.0, window_s=30)
    assert (judged.requests, judged.errors, len(judged.latencies)) == (30, 3, 27)
    assert list(judged.latencies) == sorted(judged.latencies)


def test_window_rate_is_over_the_time_watched_not_since_the_first_request() -> None:
    from proxy.rollout.stats import VersionWindow

    # Watched since t=0: a canary's first request at t=100 is one request in 100 s, not one
    # in the 1 ms since it came (which read as 1000 req/s on the dashboard).
    window = VersionWindow(window_s=300, started=0.0)
    window.record(at=100.0, from_cache=False, error=False, latency_s=0.1, tokens_out=1,
                  cost_usd=0)  # fmt: skip
    assert window.figures(now=100.001)["request_rate_per_s"] == pytest.approx(1 / 100.001)
    # Watched longer than the window: the rate is over the window.
    window.record(at=999.0, from_cache=False, error=False, latency_s=0.1, tokens_out=1,
                  cost_usd=0)  # fmt: skip
    assert window.figures(now=1000.0)["request_rate_per_s"] == pytest.approx(1 / 300)


def test_status_report_has_one_row_per_version() -> None:
    from proxy.rollout.commands import format_status

    figures = {"request_rate_per_s": 2.0, "error_rate": 0.05, "tokens_per_answer": 12.0,
               "latency_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0}, "cost_usd": 0.5,
               "shadow_agreement": 0.9}  # fmt: skip
    text = format_status(
        {
            "engine": "small",
            "status": "canary",
            "share": 0.1,
            "reason": "configured",
            "stable_version": "v1",
            "canary_version": "v2",
            "previous": None,
            "versions": {
                "v1": {"role": "stable", "figures": figures},
                "v2": {"role": "canary", "figures": None},
            },
        }
    )
    lines = text.splitlines()
    assert lines[0] == "engine small: canary (canary share 10.0%), reason: configured"
    v1 = next(line for line in lines if line.startswith("v1"))
    assert "5.0" in v1 and "20.0" in v1 and "90%" in v1
    v2 = next(line for line in lines if line.startswith("v2")).split()
    assert v2[2] == "-" and v2[-1] == "-"  # no agreement measured: a dash, not "-%"


async def test_shadow_calls_are_dropped_when_busy_or_at_the_concurrency_cap() -> None:
    import asyncio

    from proxy.engines.client import EngineCaller, UpstreamRequest
    from proxy.engines.pool import Engine
    from proxy.rollout.shadow import ShadowComparer
    from proxy.settings import CanaryQualitySettings, EngineSettings

    release = asyncio.Event()
    sent: list[UpstreamRequest] = []

    class Answer:
        status = 200
        headers: dict[str, str] = {}

        async def read(self) -> bytes:
            return b'{"choices":[{"message":{"content":"same"}}]}'

        def release(self) -> None: ...

        def close(self) -> None: ...

    async def transport(request: UpstreamRequest) -> Answer:
        sent.append(request)
        await release.wait()
        return Answer()

    other = Engine.from_settings(EngineSettings(name="e", model="m", urls=["http://b:1"]))
    other.upstream_model = "m2"
    shadow = ShadowComparer(EngineCaller(transport))  # type: ignore[arg-type]
    quality = CanaryQualitySettings(share=1.0, max_concurrency=2)
    outcomes: list[str] = []
    primary = b'{"choices":[{"message":{"content":"same"}}]}'

    def start(busy: bool) -> None:
        shadow.start(other=other, path="/v1/chat/completions", body={"model": "m", "stream": True},
                     affinity=None, primary_answer=primary, quality=quality, busy=busy,
                     report=outcomes.append)  # fmt: skip

    start(busy=True)
    for _ in range(3):
        start(busy=False)
    assert outcomes == ["dropped", "dropped"]  # busy, then the third over the cap of 2
    release.set()
    await shadow.drain()
    assert outcomes == ["dropped", "dropped", "agree", "agree"]
    assert all(b'"model":"m2"' in r.body and b"stream" not in r.body for r in sent)
