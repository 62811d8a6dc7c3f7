"""Rate, token, concurrency and budget limits on the in-process backend (clock injected)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Sequence

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.errors import (
    BudgetExhausted,
    ConcurrencyLimitExceeded,
    LimitsUnavailable,
    RateLimitExceeded,
)
from proxy.policy.limits import (
    IN_FLIGHT_RETRY_S,
    NANO,
    UNLIMITED,
    WINDOW_S,
    CounterBackendError,
    Limiter,
    LocalCounters,
    ReserveOutcome,
    gcra,
    prompt_token_bound,
    prompt_token_estimate,
    seconds_to_utc_midnight,
    worst_case_usd,
)
from proxy.policy.policyset import Principal
from proxy.policy.schema import TierPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Price:
    def usd(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * 0.5 + tokens_out * 1.5) / 1e6


DAY = dt.datetime(2026, 11, 28, 18, 0, tzinfo=dt.UTC)


def principal(tenant: str = "acme", **overrides: object) -> Principal:
    raw: dict[str, object] = {
        "tier": "free",
        "models": ["auto"],
        "limits": {"max_tokens": 512},
        "routing": {"strong_share": 0.1},
        "latency": {"ttft_p95_ms": 3000},
        "priority": 1,
    }
    raw.update(overrides)
    return Principal("free", tenant, TierPolicy.model_validate(raw), "sha256:" + "1" * 64)


def limiter(clock: Clock, day: dt.datetime = DAY) -> Limiter:
    return Limiter(LocalCounters(clock), wall_clock=lambda: day, reservation_ttl_s=60)


# --- GCRA, the pure step ----------------------------------------------------------------------


@settings(max_examples=200)
@given(
    per_minute=st.integers(min_value=1, max_value=120),
    gaps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=300),
)
def test_gcra_bounds_any_window_and_retry_after_is_exact(
    per_minute: int, gaps: list[float]
) -> None:
    """In any window of W seconds at most per_minute + W x rate requests pass (a full minute's
    burst plus the steady rate), and retrying after the returned wait always succeeds."""
    tat, now, admitted = 0.0, 0.0, []
    for gap in gaps:
        now += gap
        wait, new_tat = gcra(tat, now, 1, per_minute)
        if wait == 0:
            tat = new_tat
            admitted.append(now)
        else:
            assert wait > 0 and new_tat == tat
            retry_wait, _ = gcra(tat, now + wait + 1e-9, 1, per_minute)
            assert retry_wait == 0
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - start
            assert j - i + 1 <= per_minute + window * per_minute / WINDOW_S + 1e-6


def test_gcra_retry_after_the_wait_is_not_refused_by_rounding() -> None:
    # Found by Hypothesis: the retry's wait came out as 7.1e-15 s instead of 0.
    now = 1.0919748153562105
    _, tat = gcra(0.0, now, 1, 1)
    wait, _ = gcra(tat, now, 1, 1)
    assert wait == 60.0
    retry_wait, _ = gcra(tat, now + wait + 1e-9, 1, 1)
    assert retry_wait == 0


def test_gcra_steady_client_at_the_rate_is_never_refused() -> None:
    tat = 0.0
    for step in range(1000):
        wait, tat = gcra(tat, step * 1.0, 1, 60)
        assert wait == 0


def test_gcra_oversized_charge_passes_only_when_idle() -> None:
    wait, tat = gcra(0.0, 100.0, 5000, 1000)  # 5 minutes' worth at once, idle counter
    assert wait == 0 and tat == pytest.approx(400.0)
    wait, _ = gcra(tat, 101.0, 5000, 1000)
    assert wait == pytest.approx(299.0)


# --- limiter on the local backend ---------------------------------------------------------------


async def test_requests_per_minute_per_tenant_with_retry_after() -> None:
    clock = Clock()
    limits = limiter(clock)
    acme = principal(limits={"max_tokens": 8, "requests_per_minute": 3})
    for _ in range(3):
        await limits.check_rate(acme, prompt_tokens=0)
    with pytest.raises(RateLimitExceeded) as refused:
        await limits.check_rate(acme, prompt_tokens=0)
    assert refused.value.retry_after == pytest.approx(20.0)
    assert refused.value.retry_after_header == "20"
    await limits.check_rate(
        principal("other", limits={"max_tokens": 8, "requests_per_minute": 3}), 0
    )
    clock.now += 20.0
    await limits.check_rate(acme, prompt_tokens=0)


async def test_tokens_per_minute_charges_estimate_then_usage() -> None:
    clock = Clock()
    limits = limiter(clock)
    acme = principal(limits={"max_tokens": 8, "tokens_per_minute": 600})
    async with limits.admit(acme, prompt_tokens=100) as ticket:
        ticket.record_usage(prompt_tokens=120, completion_tokens=400)
    # 100 + 20 + 400 = 520 of 600 used: 100 more do not fit, 80 do.
    with pytest.raises(RateLimitExceeded):
        await limits.check_rate(acme, prompt_tokens=100)
    await limits.check_rate(acme, prompt_tokens=80)


async def test_concurrency_slots_are_released_on_error_and_cancel() -> None:
    limits = limiter(Clock())
    acme = principal(limits={"max_tokens": 8, "concurrent": 2})
    async with limits.concurrency(acme), limits.concurrency(acme):
        with pytest.raises(ConcurrencyLimitExceeded) as refused:
            async with limits.concurrency(acme):
                pass
        assert refused.value.status == 429
    with pytest.raises(RuntimeError):
        async with limits.concurrency(acme), limits.concurrency(acme):
            raise RuntimeError("engine failed")
    started = asyncio.Event()

    async def hold() -> None:
        async with limits.concurrency(acme), limits.concurrency(acme):
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with limits.concurrency(acme), limits.concurrency(acme):
        pass


async def test_budget_reserves_worst_case_and_charges_actual() -> None:
    limits = limiter(Clock())
    acme = principal(budget={"usd_per_day": 1.0})
    worst = worst_case_usd(Price(), 1000, 512)  # 0.0005 + 0.000768
    assert worst == pytest.approx(0.001268)
    async with limits.reserve_budget(acme, worst) as spend:
        tier, tenant = await limits.budget_status(acme)
        assert tier.reserved_usd == pytest.approx(worst)
        spend.record(0.0007)
    tier, tenant = await limits.budget_status(acme)
    assert (tier.spent_usd, tier.reserved_usd, tier.ceiling_usd) == (0.0007, 0.0, 1.0)
    assert tenant.spent_usd == 0.0007  # per-tenant spend is tracked even without a ceiling


async def test_budget_refusal_is_insufficient_quota_and_says_why() -> None:
    limits = limiter(Clock())
    acme = principal(budget={"usd_per_day": 0.01})
    async with limits.reserve_budget(acme, 0.008) as spend:
        spend.record(0.008)
    with pytest.raises(BudgetExhausted) as refused:
        async with limits.reserve_budget(acme, 0.003):
            pass
    assert (refused.value.status, refused.value.code) == (429, "insufficient_quota")
    # Too large for what is left: waiting does not help, fewer tokens does.
    assert "up to $0.003000" in refused.value.message
    assert "$0.002000 left" in refused.value.message
    assert refused.value.retry_after is None
    assert refused.value.headers == {"x-should-retry": "false"}  # the SDKs then do not retry
    async with limits.reserve_budget(acme, 0.0015) as held:  # what is left still fits ...
        with pytest.raises(BudgetExhausted) as busy:  # ... and then is held by it
            async with limits.reserve_budget(acme, 0.001):
                pass
        assert "reserved $0.001500 of the $0.002000 left" in busy.value.message
        assert busy.value.retry_after == pytest.approx(IN_FLIGHT_RETRY_S)
        assert "x-should-retry" not in busy.value.headers
        held.record(0.002)
    with pytest.raises(BudgetExhausted) as spent:
        async with limits.reserve_budget(acme, 0.0001):
            pass
    assert "daily budget is spent" in spent.value.message
    assert spent.value.retry_after == pytest.approx(6 * 3600)  # until midnight UTC
    tomorrow = Limiter(limits.backend, wall_clock=lambda: DAY + dt.timedelta(days=1))
    async with tomorrow.reserve_budget(acme, 0.009):
        pass


async def test_tenant_ceiling_inside_the_tier() -> None:
    limits = limiter(Clock())
    budget = {"usd_per_day": 1.0, "usd_per_day_per_tenant": 0.01}
    acme, other = principal("acme", budget=budget), principal("other", budget=budget)
    async with limits.reserve_budget(acme, 0.01) as spend:
        spend.record(0.01)
    with pytest.raises(BudgetExhausted) as refused:
        async with limits.reserve_budget(acme, 0.001):
            pass
    assert "tenant's" in refused.value.message
    async with limits.reserve_budget(other, 0.01):
        pass


async def test_unrecorded_or_failed_calls_cost_nothing_and_expired_reservations_free() -> None:
    clock = Clock()
    limits = limiter(clock)
    acme = principal(budget={"usd_per_day": 0.01})
    with pytest.raises(ConnectionError):
        async with limits.reserve_budget(acme, 0.01):
            raise ConnectionError
    backend = limits.backend
    keys = limits.budget_keys(acme, DAY.date())
    assert (await backend.reserve([(keys[0], 10**7)], "crashed", 10**7, 60)).granted
    with pytest.raises(BudgetExhausted):
        async with limits.reserve_budget(acme, 0.001):
            pass
    clock.now += 61
    async with limits.reserve_budget(acme, 0.01):
        pass


async def test_200_concurrent_requests_never_overspend() -> None:
    limits = limiter(Clock())
    acme = principal(budget={"usd_per_day": 0.5})
    rng = random.Random(3)
    granted = 0

    async def client() -> None:
        nonlocal granted
        for _ in range(10):
            try:
                async with limits.reserve_budget(acme, 0.004) as spend:
                    await asyncio.sleep(0)
                    spend.record(0.004 * rng.uniform(0.5, 1))
                    granted += 1
            except BudgetExhausted:
                await asyncio.sleep(0)

    await asyncio.gather(*(client() for _ in range(200)))
    tier, _ = await limits.budget_status(acme)
    assert granted > 125  # more than budget / worst case: settled savings were reused
    assert tier.spent_usd <= 0.5
    assert tier.reserved_usd == 0


@settings(max_examples=100)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=400), st.floats(0, 1)),
        max_size=60,
    ),
    ceiling=st.integers(min_value=0, max_value=2000),
)
def test_interleaved_reserve_and_settle_never_pass_the_ceiling(
    ops: list[tuple[bool, int, float]], ceiling: int
) -> None:
    async def run() -> None:
        backend = LocalCounters(Clock())
        open_reservations: list[tuple[str, int]] = []
        for n, (reserve, amount, fraction) in enumerate(ops):
            if reserve or not open_reservations:
                outcome = await backend.reserve(
                    [("b", ceiling), ("t", UNLIMITED)], f"r{n}", amount, 60
                )
                if outcome.granted:
                    open_reservations.append((f"r{n}", amount))
            else:
                res_id, held = open_reservations.pop(0)
                await backend.settle(["b", "t"], res_id, int(held * fraction))
            spent, reserved = await backend.budget_status("b")
            assert spent + reserved <= ceiling
            assert reserved == sum(a for _, a in open_reservations)

    asyncio.run(run())


def test_seconds_to_utc_midnight() -> None:
    assert seconds_to_utc_midnight(DAY) == 6 * 3600
    late = dt.datetime(2026, 12, 31, 23, 59, 30, tzinfo=dt.UTC)
    assert seconds_to_utc_midnight(late) == 30
    assert NANO == 10**9


async def test_a_high_prompt_estimate_is_refunded_after_the_answer() -> None:
    limits = limiter(Clock())
    acme = principal(limits={"max_tokens": 8, "tokens_per_minute": 1000})
    async with limits.admit(acme, prompt_tokens=900) as ticket:
        ticket.record_usage(prompt_tokens=100, completion_tokens=50)
    await limits.check_rate(acme, prompt_tokens=800)  # 150 used, 850 free


def test_refund_never_goes_below_an_idle_counter() -> None:
    _, tat = gcra(0.0, 100.0, -10_000, 60, debt=True)
    assert tat == 100.0


def test_prompt_token_bound_is_at_least_the_bytes() -> None:
    assert prompt_token_bound(["héllo", "wörld"]) == 6 + 6 + 3 * 8
    assert prompt_token_bound([]) == 8


def test_prompt_token_estimate_is_a_quarter_of_the_bytes_and_never_above_the_bound() -> None:
    # bytes / 4 rounded up, plus the same allowance for the chat template
    assert prompt_token_estimate(["héllo", "wörld"]) == 2 + 2 + 3 * 8
    assert prompt_token_estimate(["x" * 400]) == 100 + 2 * 8
    assert prompt_token_estimate([]) == 8
    for texts in (["a"], ["héllo", ""], ["日本語のテキスト" * 50], ["x" * 4001]):
        assert prompt_token_estimate(texts) <= prompt_token_bound(texts)


class DownBackend(LocalCounters):
    async def rate(self, key: str, cost: float, per_minute: int, *, debt: bool = False) -> float:
        raise CounterBackendError("redis: connection refused")

    async def acquire_lease(self, key: str, lease_id: str, limit: int, ttl_s: float) -> bool:
        raise CounterBackendError("redis: connection refused")

    async def release_lease(self, key: str, lease_id: str) -> None:
        raise CounterBackendError("redis: connection refused")

    async def reserve(
        self, budgets: Sequence[tuple[str, int]], res_id: str, amount_nano: int, ttl_s: float
    ) -> ReserveOutcome:
        raise CounterBackendError("redis: connection refused")

    async def settle(self, keys: Sequence[str], res_id: str, actual_nano: int) -> None:
        raise CounterBackendError("redis: connection refused")


async def test_backend_outage_fails_open_by_default_or_refuses_with_503() -> None:
    strict = principal(
        limits={
            "max_tokens": 8,
            "requests_per_minute": 1,
            "tokens_per_minute": 10,
            "concurrent": 1,
        },
        budget={"usd_per_day": 0.0},
    )
    open_limiter = Limiter(DownBackend(), wall_clock=lambda: DAY)
    for _ in range(3):
        async with open_limiter.admit(strict, prompt_tokens=50) as ticket:
            async with ticket.budget(1.0) as spend:
                spend.record(1.0)
            ticket.record_usage(50, 50)
    closed = Limiter(DownBackend(), wall_clock=lambda: DAY, on_backend_error="refuse")
    with pytest.raises(LimitsUnavailable) as refused:
        await closed.check_rate(strict, prompt_tokens=1)
    assert (refused.value.status, refused.value.code) == (503, "limits_unavailable")
    with pytest.raises(LimitsUnavailable):
        async with closed.reserve_budget(strict, 0.1):
            pass


async def test_a_request_refused_by_one_limit_spends_none_of_the_others() -> None:
    # (before: a 429 for concurrency had already charged requests and tokens per minute, so an
    # SDK's retries of it spent the minute; a 429 for tokens had charged the request)
    limits = limiter(Clock())
    acme = principal(
        limits={
            "max_tokens": 8,
            "concurrent": 1,
            "requests_per_minute": 2,
            "tokens_per_minute": 100,
        }
    )
    async with limits.admit(acme, prompt_tokens=10):
        for _ in range(5):  # refused for concurrency: no request, no token charged
            with pytest.raises(ConcurrencyLimitExceeded):
                async with limits.admit(acme, prompt_tokens=10):
                    pass
    for _ in range(3):  # refused for tokens: the request is given back, and the slot
        with pytest.raises(RateLimitExceeded, match="tokens per minute"):
            async with limits.admit(acme, prompt_tokens=95):
                pass
    # one request of the minute's two and 10 of its 100 tokens are spent: the second fits
    async with limits.admit(acme, prompt_tokens=80):
        pass
    with pytest.raises(RateLimitExceeded, match="requests per minute"):
        async with limits.admit(acme, prompt_tokens=1):
            pass


async def test_the_in_process_counters_forget_past_days_and_idle_rates() -> None:
    """A replica running for months keeps a bounded set of counters: each day's budget keys go
    two days after their last use (as Redis expires them), a rate counter once it is idle."""
    clock, today = Clock(), [DAY]
    counters = LocalCounters(clock)
    limits = Limiter(counters, wall_clock=lambda: today[0], reservation_ttl_s=60)
    spender = principal(
        budget={"usd_per_day": 1.0}, limits={"max_tokens": 8, "requests_per_minute": 60}
    )
    for day in range(30):
        today[0] = DAY + dt.timedelta(days=day)
        clock.now += 86_400
        async with (
            limits.admit(spender, prompt_tokens=1),
            limits.reserve_budget(spender, 0.01) as s,
        ):
            s.record(0.004)
        # (before: 2 budget keys a day, kept for ever: 60 after a month, and one rate counter)
        assert len(counters) <= 2 * 3 + 1, day
    tier, tenant = await limits.budget_status(spender)
    assert (tier.spent_usd, tenant.spent_usd) == (0.004, 0.004)  # today's spend is kept
    clock.now += 86_400 * 3
    await limits.check_rate(
        principal("idle", limits={"max_tokens": 8, "requests_per_minute": 60}), 0
    )
    assert len(counters) == 1  # the one rate counter just charged


class FlakyBackend:
    """In-process counters behind a switch, as a shared backend is (not LocalCounters: the
    limiter treats those as never failing)."""

    def __init__(self) -> None:
        self.counters = LocalCounters()
        self.down = False

    def __getattr__(self, name: str) -> object:
        method = getattr(self.counters, name)

        async def call(*args: object, **kwargs: object) -> object:
            if self.down:
                raise CounterBackendError("redis: connection refused")
            return await method(*args, **kwargs)

        return call

    def failing(self) -> bool:
        return False


async def test_a_counters_outage_is_logged_when_it_starts_and_ends_not_per_request() -> None:
    backend = FlakyBackend()
    outages: list[str] = []
    limits = Limiter(backend, wall_clock=lambda: DAY, on_outage=outages.append)  # type: ignore[arg-type]
    limited = principal(
        limits={"max_tokens": 8, "requests_per_minute": 1000, "concurrent": 4},
        budget={"usd_per_day": 100.0},
    )

    async def request() -> None:
        async with limits.admit(limited, prompt_tokens=5) as ticket, ticket.budget(0.01) as spend:
            spend.record(0.001)

    backend.down = True
    with structlog.testing.capture_logs() as logs:
        for _ in range(50):
            await request()  # served unchecked, each operation counted
        backend.down = False
        await request()
        await request()
    # each request's slot, rate and reservation checks, then its settle and slot release
    assert outages == ["check", "check", "check", "release", "release"] * 50
    warnings = [e for e in logs if e["log_level"] == "warning"]
    # (before: one policy_limits_unavailable per check, one policy_release_failed per release)
    assert [e["event"] for e in warnings] == [
        "policy_limits_unavailable",
        "policy_limits_recovered",
    ]
    assert warnings[1]["failed_operations"] == len(outages)
