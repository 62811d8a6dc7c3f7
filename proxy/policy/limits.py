"""Rate, token, concurrency and budget counters, and the :class:`Limiter` that applies a tier's.

What is counted where:

* requests/minute, tokens/minute, concurrent requests: per tenant (``tier`` + ``tenant``), the
  tier's ``limits`` being each tenant's allowance;
* budget USD/day (UTC): per tier (``budget.usd_per_day``) and, if set, per tenant inside it
  (``budget.usd_per_day_per_tenant``). Spend is recorded even when no ceiling is set.

Rates use GCRA (one timestamp per counter, a smooth sliding minute, exact ``Retry-After``).
Tokens/minute charges the prompt estimate at admission and settles the difference after the
answer (completion tokens, and the prompt's actual count minus the estimate, which may be a refund):
an answer's length is unknown up front, so a tenant that ran over waits before its next request.

Budgets are reservation-based so concurrent requests cannot overshoot: before the engine call the
request's worst case (prompt estimate x input price + max_tokens x output price) is reserved
atomically if ``spent + reserved + worst_case <= ceiling``; afterwards the reservation is replaced
by the actual cost. Money is counted in integer nano-USD so both backends add exactly.

Nothing leaks: leases and reservations are released in ``finally`` blocks, shielded from a second
cancellation, and carry a TTL so a crashed replica's holdings expire on their own (on a shared
backend a short one, renewed while held: :meth:`Limiter.keep_holdings`).

Two backends behind :class:`CounterBackend`: :class:`LocalCounters` (one replica) and
``proxy.policy.redis_limits.RedisCounters`` (several replicas; each operation is one Lua script).
When the backend is unreachable (:class:`CounterBackendError`) the limiter fails open by default
(serves, tells ``on_outage``: ``frugal_limits_errors_total``; logs
``policy_limits_unavailable`` when an outage starts and ``policy_limits_recovered`` when it ends,
not once per request):
an outage of the counters should not become an outage of the proxy. ``on_backend_error="refuse"``
answers 503 ``limits_unavailable`` instead.

Per request (see :class:`Limiter`)::

    async with limiter.admit(principal, prompt_tokens=estimate) as ticket:    # rpm, tpm, concurrent
        ...                                                                  # route, cache lookup
        async with ticket.budget(worst_case_usd(engine.cost, estimate, max_tokens)) as spend:
            answer = await call_engine(...)
            spend.record(engine.cost.usd(usage.prompt_tokens, usage.completion_tokens))
        ticket.record_usage(usage.prompt_tokens, usage.completion_tokens)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import math
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

import structlog
from mypy_extensions import mypyc_attr

from proxy.policy.errors import (
    BudgetExhausted,
    ConcurrencyLimitExceeded,
    LimitsUnavailable,
    RateLimitExceeded,
)
from proxy.policy.policyset import Principal

log = structlog.get_logger("frugal.policy")

_T = TypeVar("_T")

NANO = 1_000_000_000  # nano-USD per USD
# A day's budget keys outlive the day by this much after their last use, then go (the Redis
# backend's key expiry; the in-process one sweeps them, or a replica kept two keys a tenant
# for every day it ran).
BUDGET_KEEP_S: Final = 2 * 86_400.0
SWEEP_EVERY_S: Final = 600.0  # how often the in-process counters drop what no longer counts
WINDOW_S = 60.0  # the "minute" of requests/tokens per minute; also the GCRA burst tolerance
UNLIMITED = -1  # a ceiling meaning "count, but never refuse"


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def ceiling_nano(usd: float | None) -> int:
    # Round a ceiling down so rounding can never let spend pass the configured number.
    return UNLIMITED if usd is None else math.floor(usd * NANO + 1e-6)


class PriceTable(Protocol):
    """An engine's prices (``settings.CostSettings`` fits)."""

    def usd(self, tokens_in: int, tokens_out: int) -> float: ...


def worst_case_usd(price: PriceTable, prompt_tokens: int, max_tokens: int) -> float:
    """What a request can cost at most: its prompt plus every allowed output token."""
    return price.usd(prompt_tokens, max_tokens)


def prompt_token_bound(texts: Sequence[str], *, per_message: int = 8) -> int:
    """An upper bound on a prompt's tokens without a tokenizer: byte-level BPE never makes more
    tokens than UTF-8 bytes, plus a few per message for the chat template. Use it for the budget
    reservation (it must not be low, or concurrent requests could overshoot); use a real count
    when one is at hand."""
    return sum(len(t.encode("utf-8")) + per_message for t in texts) + per_message


def prompt_token_estimate(texts: Sequence[str], *, per_message: int = 8) -> int:
    """A likely count of a prompt's tokens without a tokenizer, for charging a prompt whose real
    count never came (a stream that ended before its usage chunk). Byte-level BPE averages about
    four bytes a token on English and code; the bound's one token a byte would charge about four
    times too much. Never above :func:`prompt_token_bound`, so it stays within the reservation."""
    return sum(-(-len(t.encode("utf-8")) // 4) + per_message for t in texts) + per_message


@mypyc_attr(native_class=False)  # (the compiled build's classes derive from Exception alone)
class CounterBackendError(ConnectionError):
    """The counters could not be read or written (e.g. Redis is unreachable)."""


# --- the backend protocol -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    granted: bool
    refused_key: str | None = None  # the budget key that would be exceeded
    spent_nano: int = 0  # of that key (or the first key when granted)
    reserved_nano: int = 0  # reservations outstanding there, not counting this one


class CounterBackend(Protocol):
    async def rate(self, key: str, cost: float, per_minute: int, *, debt: bool = False) -> float:
        """GCRA. Charge ``cost`` units against ``per_minute`` and return 0.0, or charge nothing
        and return the seconds to wait. ``debt=True`` always charges (usage found out later);
        a negative ``cost`` with ``debt=True`` refunds, down to an idle counter at most.
        A single charge larger than the whole minute is allowed when the counter is idle."""
        ...

    async def acquire_lease(self, key: str, lease_id: str, limit: int, ttl_s: float) -> bool:
        """Take one of ``limit`` slots; it expires after ``ttl_s`` if never released."""
        ...

    async def release_lease(self, key: str, lease_id: str) -> None: ...

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        """Push the expiry of these (key, lease id) leases, if still held, ``ttl_s`` ahead."""
        ...

    async def renew_reservations(
        self, reservations: Sequence[tuple[Sequence[str], str]], ttl_s: float
    ) -> None:
        """The same for (budget keys, reservation id) reservations not yet settled."""
        ...

    async def reserve(
        self, budgets: Sequence[tuple[str, int]], res_id: str, amount_nano: int, ttl_s: float
    ) -> ReserveOutcome:
        """Atomically reserve ``amount_nano`` on every (key, ceiling) or on none.
        A ceiling of UNLIMITED never refuses."""
        ...

    async def settle(self, keys: Sequence[str], res_id: str, actual_nano: int) -> None:
        """Drop the reservation (if it has not expired) and add the actual spend."""
        ...

    async def budget_status(self, key: str) -> tuple[int, int]:
        """(spent, reserved) nano-USD of a budget key."""
        ...

    def failing(self) -> bool:
        """Whether an operation failed a moment ago (the back-off after it still runs)."""
        ...

    async def aclose(self) -> None: ...


# --- in-process backend -----------------------------------------------------------------------


class _Budget:
    """One budget key: spend so far and open reservations. The reserved total is kept as a
    running sum and expired reservations are swept only once the earliest may have expired, so
    a reservation costs the same with 1 or 1,000 others open."""

    __slots__ = ("_next_expiry", "reservations", "reserved", "spent", "used_at")

    def __init__(self) -> None:
        self.spent = 0
        self.used_at = -math.inf  # the counters' clock at the last reserve or settle
        self.reservations: dict[str, tuple[int, float]] = {}  # id -> (nano, expiry)
        self.reserved = 0  # the sum of the reservations' amounts
        self._next_expiry = math.inf  # no reservation expires before this

    def purge(self, now: float) -> None:
        if now < self._next_expiry:
            return
        for r in [r for r, (_, exp) in self.reservations.items() if exp <= now]:
            self.reserved -= self.reservations.pop(r)[0]
        self._next_expiry = min((exp for _, exp in self.reservations.values()), default=math.inf)

    def add(self, res_id: str, amount: int, expiry: float) -> None:
        self.drop(res_id)
        self.reservations[res_id] = (amount, expiry)
        self.reserved += amount
        self._next_expiry = min(self._next_expiry, expiry)

    def drop(self, res_id: str) -> None:
        held = self.reservations.pop(res_id, None)
        if held is not None:
            self.reserved -= held[0]


class _Leases:
    """One concurrency key's leases (id -> expiry), swept like :class:`_Budget`."""

    __slots__ = ("_next_expiry", "held")

    def __init__(self) -> None:
        self.held: dict[str, float] = {}
        self._next_expiry = math.inf

    def purge(self, now: float) -> None:
        if now < self._next_expiry:
            return
        for expired in [lid for lid, exp in self.held.items() if exp <= now]:
            del self.held[expired]
        self._next_expiry = min(self.held.values(), default=math.inf)

    def add(self, lease_id: str, expiry: float) -> None:
        self.held[lease_id] = expiry
        self._next_expiry = min(self._next_expiry, expiry)


@mypyc_attr(allow_interpreted_subclasses=True)  # (a backend to build on, compiled or not)
class LocalCounters:
    """Counters for a single replica. Each method finishes without awaiting, so it is atomic on
    the event loop. ``clock`` is monotonic seconds (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, _Leases] = {}
        self._budgets: dict[str, _Budget] = {}
        self._swept_at = clock()

    def __len__(self) -> int:
        """How many counters are held (rates, concurrency keys, budget keys)."""
        return len(self._tat) + len(self._leases) + len(self._budgets)

    def _sweep(self, now: float) -> None:
        """Every ``SWEEP_EVERY_S``: drop the rate counters that are paid off (a counter at or
        before now counts as none), the concurrency keys with no live lease, and the budget keys
        unused for ``BUDGET_KEEP_S`` with nothing reserved (past days': keys name their day)."""
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        for key, leases in list(self._leases.items()):
            leases.purge(now)
            if not leases.held:
                del self._leases[key]
        for key, budget in list(self._budgets.items()):
            budget.purge(now)
            if not budget.reservations and now - budget.used_at > BUDGET_KEEP_S:
                del self._budgets[key]

    # The operations also as plain calls (``*_now``): they never suspend, and the limiter calls
    # them directly when this is its backend, without a coroutine and its guard per operation.

    async def rate(self, key: str, cost: float, per_minute: int, *, debt: bool = False) -> float:
        return self.rate_now(key, cost, per_minute, debt=debt)

    def rate_now(self, key: str, cost: float, per_minute: int, *, debt: bool = False) -> float:
        now = self._clock()
        self._sweep(now)
        wait, new_tat = gcra(self._tat.get(key, now), now, cost, per_minute, debt=debt)
        if wait == 0.0:
            self._tat[key] = new_tat
        return wait

    async def acquire_lease(self, key: str, lease_id: str, limit: int, ttl_s: float) -> bool:
        return self.acquire_lease_now(key, lease_id, limit, ttl_s)

    def acquire_lease_now(self, key: str, lease_id: str, limit: int, ttl_s: float) -> bool:
        now = self._clock()
        leases = self._leases.get(key)
        if leases is None:
            leases = self._leases[key] = _Leases()
        leases.purge(now)
        if lease_id not in leases.held and len(leases.held) >= limit:
            return False
        leases.add(lease_id, now + ttl_s)
        return True

    async def release_lease(self, key: str, lease_id: str) -> None:
        self.release_lease_now(key, lease_id)

    def release_lease_now(self, key: str, lease_id: str) -> None:
        leases = self._leases.get(key)
        if leases is not None:
            leases.held.pop(lease_id, None)
            if not leases.held:
                del self._leases[key]

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        now = self._clock()
        for key, lease_id in leases:
            held = self._leases.get(key)
            if held is not None and held.held.get(lease_id, now) > now:
                held.held[lease_id] = now + ttl_s  # (a later expiry: the next purge recomputes)

    async def renew_reservations(
        self, reservations: Sequence[tuple[Sequence[str], str]], ttl_s: float
    ) -> None:
        now = self._clock()
        for keys, res_id in reservations:
            for key in keys:
                state = self._budgets.get(key)
                held = state.reservations.get(res_id) if state is not None else None
                if state is not None and held is not None and held[1] > now:
                    state.reservations[res_id] = (held[0], now + ttl_s)

    async def reserve(
        self, budgets: Sequence[tuple[str, int]], res_id: str, amount_nano: int, ttl_s: float
    ) -> ReserveOutcome:
        return self.reserve_now(budgets, res_id, amount_nano, ttl_s)

    def reserve_now(
        self, budgets: Sequence[tuple[str, int]], res_id: str, amount_nano: int, ttl_s: float
    ) -> ReserveOutcome:
        now = self._clock()
        self._sweep(now)
        states = []
        for key, ceiling in budgets:
            state = self._budgets.get(key)
            if state is None:
                state = self._budgets[key] = _Budget()
            state.purge(now)
            state.used_at = now
            reserved = state.reserved
            if ceiling != UNLIMITED and state.spent + reserved + amount_nano > ceiling:
                return ReserveOutcome(False, key, state.spent, reserved)
            states.append(state)
        for state in states:
            state.add(res_id, amount_nano, now + ttl_s)
        first = states[0] if states else _Budget()
        return ReserveOutcome(True, None, first.spent, first.reserved - amount_nano)

    async def settle(self, keys: Sequence[str], res_id: str, actual_nano: int) -> None:
        self.settle_now(keys, res_id, actual_nano)

    def settle_now(self, keys: Sequence[str], res_id: str, actual_nano: int) -> None:
        now = self._clock()
        for key in keys:
            state = self._budgets.get(key)
            if state is None:
                state = self._budgets[key] = _Budget()
            state.drop(res_id)
            state.spent += actual_nano
            state.used_at = now

    async def budget_status(self, key: str) -> tuple[int, int]:
        state = self._budgets.get(key)
        if state is None:
            return 0, 0
        state.purge(self._clock())
        return state.spent, state.reserved

    def failing(self) -> bool:
        return False

    async def aclose(self) -> None:
        return None


_NO_WAIT_S = 1e-9


def gcra(
    tat: float, now: float, cost: float, per_minute: int, *, debt: bool = False
) -> tuple[float, float]:
    """One GCRA step: (seconds to wait or 0.0, the new theoretical arrival time).

    The counter is the time at which the tenant's past use is "paid off" at the allowed rate;
    a request may go when that point, after adding its own cost, is at most a minute ahead.
    """
    start = max(tat, now)
    increment = cost * WINDOW_S / per_minute
    new_tat = start + increment
    if debt:
        return 0.0, max(new_tat, now)  # a refund empties the counter at most
    # A charge larger than a whole minute's allowance goes through only on an idle counter.
    wait = start - now if increment > WINDOW_S else new_tat - now - WINDOW_S
    # (now + 60) - now - 60 is not always 0.0 in floating point: a nanosecond is no wait.
    if wait > _NO_WAIT_S:
        return wait, tat
    return 0.0, new_tat


# --- the limiter ------------------------------------------------------------------------------


# Budget held by requests in flight comes back when they end: a refused client retries soon.
IN_FLIGHT_RETRY_S: Final = 2.0


def budget_refusal(
    budget: str,
    *,
    ceiling: int,
    spent: int,
    reserved: int,
    asked: int,
    to_midnight_s: float,
) -> tuple[str, float | None]:
    """The refusal's message and Retry-After seconds, by why the reservation did not fit (all
    amounts nano-USD): the day's spend reached the ceiling (retry after midnight); this request's
    worst case alone is more than is left (no retry helps: it must ask for fewer tokens); or
    requests in flight hold the rest (retry soon)."""
    left = max(0, ceiling - spent)
    if left <= 0:
        return f"{budget} is spent; it resets at 00:00 UTC", to_midnight_s
    if asked > left:
        return (
            f"this request could cost up to ${asked / NANO:.6f} (its max_tokens, n and best_of"
            f" at the engine's prices), more than the ${left / NANO:.6f} left of {budget}; ask"
            " for fewer tokens",
            None,
        )
    return (
        f"requests in flight have reserved ${min(reserved, left) / NANO:.6f} of the"
        f" ${left / NANO:.6f} left of {budget}; retry when they finish",
        IN_FLIGHT_RETRY_S,
    )


def seconds_to_utc_midnight(now: dt.datetime) -> float:
    tomorrow = (now + dt.timedelta(days=1)).date()
    midnight = dt.datetime.combine(tomorrow, dt.time(), tzinfo=dt.UTC)
    return (midnight - now).total_seconds()


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    spent_usd: float
    reserved_usd: float
    ceiling_usd: float | None


class Spend:
    """A budget reservation in flight; ``record`` the actual cost once the usage is known.

    If nothing is recorded (engine failed, client left before any usage was seen) nothing is
    charged: only provable spend counts. The pipeline should ``record`` a partial stream's cost.
    """

    def __init__(self, reserved_usd: float) -> None:
        self.reserved_usd = reserved_usd
        self.actual_usd: float | None = None

    def record(self, actual_usd: float) -> None:
        self.actual_usd = max(0.0, actual_usd)


class Ticket:
    """An admitted request: holds its concurrency lease until the ``admit`` block exits."""

    def __init__(self, limiter: Limiter, principal: Principal, prompt_tokens: int) -> None:
        self._limiter = limiter
        self.principal = principal
        self.prompt_tokens_estimate = prompt_tokens
        self._extra_tokens = 0

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The answer's usage; the difference from the admission estimate (negative when the
        estimate was high) is charged to tokens/minute when the block exits."""
        self._extra_tokens = prompt_tokens - self.prompt_tokens_estimate + max(0, completion_tokens)

    @property
    def extra_tokens(self) -> int:
        return self._extra_tokens

    def budget(self, worst_case_usd: float) -> AbstractAsyncContextManager[Spend]:
        budget = self.principal.policy.budget
        if budget.usd_per_day is None and budget.usd_per_day_per_tenant is None:
            # Nothing to reserve against: skip the counters (and their round trips) entirely.
            return _Ready(Spend(worst_case_usd))
        return self._limiter.reserve_budget(self.principal, worst_case_usd)


_T_co = TypeVar("_T_co")


class _Ready(AbstractAsyncContextManager[_T_co]):
    """An async context that holds nothing: the request path's fast lane when a tier sets no
    limit (a generator-based context costs several microseconds per request)."""

    __slots__ = ("_value",)

    def __init__(self, value: _T_co) -> None:
        self._value = value

    async def __aenter__(self) -> _T_co:
        return self._value

    async def __aexit__(self, *exc: object) -> None:
        return None


class Limiter:
    """Applies a principal's tier limits using a :class:`CounterBackend`."""

    def __init__(
        self,
        backend: CounterBackend,
        *,
        prefix: str = "frugal:policy",
        lease_ttl_s: float = 900.0,
        reservation_ttl_s: float = 900.0,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        on_backend_error: Literal["allow", "refuse"] = "allow",
        on_outage: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        # The in-process counters exactly (not a subclass that may fail, as tests use): called
        # directly. They cannot fail, so there is no outage to guard against either.
        self._local = backend if type(backend) is LocalCounters else None
        self._fail_open = on_backend_error == "allow"
        # hears of each failed counter operation: "check" (served unchecked or refused) or
        # "release" (a holding left to its TTL)
        self._on_outage = on_outage
        self._prefix = prefix
        # Only a crashed replica's holdings rely on these. Without keep_holdings running, they
        # must outlast the longest request; with it, they are how soon those come free.
        self._lease_ttl_s = lease_ttl_s
        self._reservation_ttl_s = reservation_ttl_s
        self._wall_clock = wall_clock
        # Lease and reservation ids: a random per-limiter prefix and a counter, unique across
        # replicas like uuid4 but without a getrandom() call on every request.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self._keys_memo: dict[tuple[str, str, dt.date], tuple[str, str]] = {}
        self._tenant_keys_memo: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._background: set[asyncio.Task[None]] = set()  # releases not waited for (see _release)
        # this replica's leases and reservations (id -> budget keys), renewed by keep_holdings
        self._held: set[tuple[str, str]] = set()
        self._reserved: dict[str, tuple[str, str]] = {}
        # counter operations failed since one last succeeded: an outage is logged when it
        # starts and when it ends, not once per request (each failure is counted by on_outage)
        self._failed_since_ok = 0

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    # keys: the tier name is a Redis Cluster hash tag, so one tier's keys share a slot.
    def _tenant_key(self, p: Principal, what: str) -> str:
        return f"{self._prefix}:{{{p.tier}}}:tenant:{p.tenant}:{what}"

    def _tenant_keys(self, p: Principal) -> tuple[str, str, str]:
        """The tenant's (requests/minute, tokens/minute, in-flight) keys, formatted once."""
        memo = (p.tier, p.tenant)
        keys = self._tenant_keys_memo.get(memo)
        if keys is None:
            if len(self._tenant_keys_memo) > 10_000:
                self._tenant_keys_memo.clear()  # departed tenants
            keys = self._tenant_keys_memo[memo] = (
                self._tenant_key(p, "rpm"),
                self._tenant_key(p, "tpm"),
                self._tenant_key(p, "inflight"),
            )
        return keys

    def budget_keys(self, p: Principal, day: dt.date) -> tuple[str, str]:
        tier_key = f"{self._prefix}:{{{p.tier}}}:budget:{day.isoformat()}"
        return tier_key, f"{tier_key}:tenant:{p.tenant}"

    async def _guard(self, operation: Coroutine[Any, Any, _T], fallback: _T) -> _T:
        """Run a counter operation; if the backend is down, fail open or refuse (503)."""
        try:
            result = await operation
        except CounterBackendError as exc:
            if self._on_outage is not None:
                self._on_outage("check")
            if not self._fail_open:
                raise LimitsUnavailable(
                    "tier limits cannot be checked right now", retry_after=1.0
                ) from exc
            self._backend_failed("policy_limits_unavailable", exc, note="serving unchecked")
            return fallback
        self._backend_answered()
        return result

    def _backend_failed(self, event: str, exc: CounterBackendError, **fields: str) -> None:
        """Log a failed counter operation if it is the first since one succeeded."""
        self._failed_since_ok += 1
        if self._failed_since_ok == 1:
            log.warning(event, error=str(exc), **fields)

    def _backend_answered(self) -> None:
        if self._failed_since_ok:
            log.warning("policy_limits_recovered", failed_operations=self._failed_since_ok)
            self._failed_since_ok = 0

    async def check_rate(self, principal: Principal, prompt_tokens: int) -> None:
        """Requests/minute, then tokens/minute (charging the prompt estimate). 429 on excess."""
        limits = principal.policy.limits
        rpm_key, tpm_key, _ = self._tenant_keys(principal)
        local = self._local
        if limits.requests_per_minute is not None:
            wait = (
                local.rate_now(rpm_key, 1, limits.requests_per_minute)
                if local is not None
                else await self._guard(
                    self.backend.rate(rpm_key, 1, limits.requests_per_minute), 0.0
                )
            )
            if wait > 0:
                raise RateLimitExceeded(
                    f"rate limit of {limits.requests_per_minute} requests per minute reached "
                    f"for tier {principal.tier!r}",
                    retry_after=wait,
                )
        if limits.tokens_per_minute is not None and prompt_tokens > 0:
            wait = (
                local.rate_now(tpm_key, prompt_tokens, limits.tokens_per_minute)
                if local is not None
                else await self._guard(
                    self.backend.rate(tpm_key, prompt_tokens, limits.tokens_per_minute), 0.0
                )
            )
            if wait > 0:
                # a refused request is no request: its retry must not find the minute spent
                await self._release(self._refund_request(principal), "refund a request")
                raise RateLimitExceeded(
                    f"rate limit of {limits.tokens_per_minute} tokens per minute reached "
                    f"for tier {principal.tier!r}",
                    retry_after=wait,
                )

    async def _refund_request(self, principal: Principal) -> None:
        per_minute = principal.policy.limits.requests_per_minute
        if per_minute is not None:
            await self.backend.rate(self._tenant_keys(principal)[0], -1, per_minute, debt=True)

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        """Tokens learnt after the answer: always charged (they were spent)."""
        per_minute = principal.policy.limits.tokens_per_minute
        if per_minute is not None and tokens != 0:
            await self.backend.rate(self._tenant_keys(principal)[1], tokens, per_minute, debt=True)

    def _charge_tokens_now(self, local: LocalCounters, principal: Principal, tokens: int) -> None:
        """:meth:`charge_tokens` on the in-process counters, which need no await."""
        per_minute = principal.policy.limits.tokens_per_minute
        if per_minute is not None and tokens != 0:
            local.rate_now(self._tenant_keys(principal)[1], tokens, per_minute, debt=True)

    async def _take_lease(self, principal: Principal) -> tuple[str, str] | None:
        """One of the tenant's concurrent slots: (key, lease id), or None when the tier sets no
        limit; 429 when all are taken."""
        limit = principal.policy.limits.concurrent
        if limit is None:
            return None
        key = self._tenant_keys(principal)[2]
        lease_id = self._new_id()
        if self._local is not None:
            taken = self._local.acquire_lease_now(key, lease_id, limit, self._lease_ttl_s)
        else:
            acquire = self.backend.acquire_lease(key, lease_id, limit, self._lease_ttl_s)
            taken = await self._guard(acquire, True)
        if not taken:
            raise ConcurrencyLimitExceeded(
                f"{limit} concurrent requests already in flight for tier {principal.tier!r}",
                retry_after=1.0,
            )
        self._held.add((key, lease_id))
        return key, lease_id

    async def _give_back(self, lease: tuple[str, str] | None) -> None:
        if lease is not None:
            self._held.discard(lease)
            if self._local is not None:
                self._local.release_lease_now(*lease)
                return
            await self._release(self.backend.release_lease(*lease), "release a concurrency lease")

    async def keep_holdings(self) -> None:
        """Renew this replica's leases and reservations every third of their TTLs, forever (a
        task of a replica whose counters others share): so their TTLs may be much shorter than
        a request, and a crashed replica's slots and money come free within them instead of
        locking its tenants out."""
        while True:
            await asyncio.sleep(min(self._lease_ttl_s, self._reservation_ttl_s) / 3)
            try:
                if self._held:
                    await self.backend.renew_leases(list(self._held), self._lease_ttl_s)
                if self._reserved:
                    reservations = [(keys, res_id) for res_id, keys in self._reserved.items()]
                    await self.backend.renew_reservations(reservations, self._reservation_ttl_s)
            except CounterBackendError as exc:
                if self._on_outage is not None:
                    self._on_outage("renew")
                log.warning("policy_renew_failed", error=str(exc), leases=len(self._held),
                            reservations=len(self._reserved))  # fmt: skip
            except Exception:  # (the loop must outlive any one failure: its holdings expire)
                log.warning("policy_renew_failed", exc_info=True)

    def concurrency(self, principal: Principal) -> AbstractAsyncContextManager[None]:
        """Hold one of the tenant's concurrent slots for the block; 429 when all are taken."""
        return _Lease(self, principal)

    def admit(
        self, principal: Principal, *, prompt_tokens: int
    ) -> AbstractAsyncContextManager[Ticket]:
        """Rates then a concurrency slot; on exit the usage found out after the answer is
        charged to tokens/minute and the slot is released."""
        limits = principal.policy.limits
        if (
            limits.requests_per_minute is None
            and limits.tokens_per_minute is None
            and limits.concurrent is None
        ):
            return _Ready(Ticket(self, principal, prompt_tokens))
        return _Admission(self, principal, prompt_tokens)

    def reserve_budget(
        self, principal: Principal, worst_case: float
    ) -> AbstractAsyncContextManager[Spend]:
        """Reserve the worst case against today's budgets for the block; 429 insufficient_quota
        when it does not fit. On exit the reservation becomes the recorded actual cost."""
        return _Reservation(self, principal, worst_case)

    def _budget_keys_today(self, principal: Principal, day: dt.date) -> tuple[str, str]:
        # Formatted once per (tier, tenant, day), not on every request.
        memo = (principal.tier, principal.tenant, day)
        keys = self._keys_memo.get(memo)
        if keys is None:
            if len(self._keys_memo) > 10_000:
                self._keys_memo.clear()  # yesterday's keys and departed tenants
            keys = self._keys_memo[memo] = self.budget_keys(principal, day)
        return keys

    async def _release(self, release: Coroutine[Any, Any, None], what: str) -> None:
        if isinstance(self.backend, LocalCounters):
            # Its methods never suspend, so a cancellation cannot cut a release short: no
            # shielded task (and the extra turn of the loop it costs) is needed.
            try:
                await release
            except Exception:
                log.warning("policy_release_failed", what=what, exc_info=True)
            return
        if self.backend.failing():
            # Still tried, but the answer does not wait for it: against a hung backend each
            # release and settle would add its timeout to every request for the whole outage.
            # (Awaited otherwise, so a client's next request finds its slot free.)
            task = asyncio.create_task(self._release_later(release, what))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await self._release_later(release, what)

    async def _release_later(self, release: Coroutine[Any, Any, None], what: str) -> None:
        failure = await _finish(release, what)
        if failure is None:
            self._backend_answered()
            return
        if self._on_outage is not None:
            self._on_outage("release")
        if isinstance(failure, CounterBackendError):
            self._backend_failed("policy_release_failed", failure, what=what, note="expires by TTL")

    async def drain(self) -> None:
        """Wait for the releases left running in the background (at shutdown, before the
        backend is closed)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def budget_status(self, principal: Principal) -> tuple[BudgetStatus, BudgetStatus]:
        """Today's (tier, tenant) spend, for metrics and the admin API."""
        budget = principal.policy.budget
        keys = self.budget_keys(principal, self._wall_clock().date())
        out = []
        for key, ceiling in zip(
            keys, (budget.usd_per_day, budget.usd_per_day_per_tenant), strict=True
        ):
            spent, reserved = await self.backend.budget_status(key)
            out.append(BudgetStatus(spent / NANO, reserved / NANO, ceiling))
        return out[0], out[1]


class _Admission(AbstractAsyncContextManager[Ticket]):
    """``Limiter.admit`` for a tier with limits: rates, then a concurrency slot; on exit the
    extra tokens are charged, then the slot is released. A class, not a generator: this runs on
    every request of a limited tier, and a generator-based context costs several µs more."""

    __slots__ = ("_lease", "_limiter", "_principal", "_prompt_tokens", "_ticket")

    def __init__(self, limiter: Limiter, principal: Principal, prompt_tokens: int) -> None:
        self._limiter = limiter
        self._principal = principal
        self._prompt_tokens = prompt_tokens
        self._ticket: Ticket | None = None
        self._lease: tuple[str, str] | None = None

    async def __aenter__(self) -> Ticket:
        limiter, principal = self._limiter, self._principal
        # The slot first: a request refused for concurrency then charges no rate (the SDKs
        # retry a 429, and each retry would spend the minute's requests and tokens), and a
        # slot taken by a request the rates refuse goes straight back.
        self._lease = await limiter._take_lease(principal)
        try:
            await limiter.check_rate(principal, self._prompt_tokens)
        except BaseException:
            await limiter._give_back(self._lease)
            raise
        self._ticket = Ticket(limiter, principal, self._prompt_tokens)
        return self._ticket

    async def __aexit__(self, *exc: object) -> None:
        limiter, ticket = self._limiter, self._ticket
        try:
            if ticket is not None and ticket.extra_tokens != 0:
                if limiter._local is not None:
                    limiter._charge_tokens_now(limiter._local, self._principal, ticket.extra_tokens)
                else:
                    await limiter._release(
                        limiter.charge_tokens(self._principal, ticket.extra_tokens),
                        "charge tokens",
                    )
        finally:
            await limiter._give_back(self._lease)


class _Lease(AbstractAsyncContextManager[None]):
    """``Limiter.concurrency``: a class, not a generator, so the module compiles (setup.py)."""

    __slots__ = ("_lease", "_limiter", "_principal")

    def __init__(self, limiter: Limiter, principal: Principal) -> None:
        self._limiter = limiter
        self._principal = principal
        self._lease: tuple[str, str] | None = None

    async def __aenter__(self) -> None:
        self._lease = await self._limiter._take_lease(self._principal)

    async def __aexit__(self, *exc: object) -> None:
        await self._limiter._give_back(self._lease)


class _Reservation(AbstractAsyncContextManager[Spend]):
    """``Limiter.reserve_budget``: the worst case reserved on entry, settled to the recorded
    actual cost on exit (a class for the same reason as :class:`_Admission`)."""

    __slots__ = ("_keys", "_limiter", "_principal", "_res_id", "_spend", "_worst_case")

    def __init__(self, limiter: Limiter, principal: Principal, worst_case: float) -> None:
        self._limiter = limiter
        self._principal = principal
        self._worst_case = worst_case
        self._keys: tuple[str, str] = ("", "")
        self._res_id = ""
        self._spend: Spend | None = None

    async def __aenter__(self) -> Spend:
        limiter, principal = self._limiter, self._principal
        now = limiter._wall_clock()
        budget = principal.policy.budget
        keys = self._keys = limiter._budget_keys_today(principal, now.date())
        ceilings = (ceiling_nano(budget.usd_per_day), ceiling_nano(budget.usd_per_day_per_tenant))
        res_id = self._res_id = limiter._new_id()
        amount = max(0, to_nano(self._worst_case))
        budgets = ((keys[0], ceilings[0]), (keys[1], ceilings[1]))
        ttl_s = limiter._reservation_ttl_s
        outcome = (
            limiter._local.reserve_now(budgets, res_id, amount, ttl_s)
            if limiter._local is not None
            else await limiter._guard(
                limiter.backend.reserve(budgets, res_id, amount, ttl_s), ReserveOutcome(True)
            )
        )
        if not outcome.granted:
            tenant = outcome.refused_key == keys[1]
            message, wait = budget_refusal(
                f"the {principal.tier!r} {'tenant' if tenant else 'tier'}'s daily budget",
                ceiling=ceilings[1 if tenant else 0],
                spent=outcome.spent_nano,
                reserved=outcome.reserved_nano,
                asked=amount,
                to_midnight_s=seconds_to_utc_midnight(now),
            )
            refusal = BudgetExhausted(message, retry_after=wait)
            if wait is None:
                # No wait makes this request fit: the OpenAI SDKs obey this and do not retry.
                refusal.headers["x-should-retry"] = "false"
            raise refusal
        limiter._reserved[res_id] = keys
        self._spend = Spend(self._worst_case)
        return self._spend

    async def __aexit__(self, *exc: object) -> None:
        spend, limiter = self._spend, self._limiter
        limiter._reserved.pop(self._res_id, None)
        actual = (
            to_nano(spend.actual_usd) if spend is not None and spend.actual_usd is not None else 0
        )
        if limiter._local is not None:
            limiter._local.settle_now(self._keys, self._res_id, actual)
            return
        await limiter._release(
            limiter.backend.settle(self._keys, self._res_id, actual), "settle a budget reservation"
        )


async def _finish(release: Coroutine[Any, Any, None], what: str) -> Exception | None:
    """Run a release even if the request is being cancelled; never let it mask the request's own
    outcome. If it fails (backend down: the error, for the caller to log once per outage) the
    TTL frees the holding later."""
    task = asyncio.ensure_future(release)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Cancelled again while releasing: the shielded task still finishes on its own.
        raise
    except CounterBackendError as outage:
        return outage
    except Exception as failure:
        log.warning("policy_release_failed", what=what, note="expires by TTL", exc_info=True)
        return failure
    return None
