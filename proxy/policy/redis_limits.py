"""Counters shared by several proxy replicas in one Redis; every operation is one Lua script.

Scripts read the clock with ``TIME`` on the Redis server, so skewed replica clocks still agree.
Layout of one budget key ``K`` (all carry the tier's hash tag, so they share a cluster slot)::

    K:spent  integer nano-USD spent today
    K:res    hash  reservation id -> nano-USD reserved
    K:exp    zset  reservation id -> expiry (ms); expired reservations are purged on each use
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from proxy.backoff import Backoff
from proxy.policy.limits import BUDGET_KEEP_S, WINDOW_S, CounterBackendError, ReserveOutcome

BUDGET_KEEP_MS = int(BUDGET_KEEP_S * 1000)  # a day's budget keys outlive the day, then vanish
# Concurrency leases and budget reservations: held ones are renewed every third of it
# (Limiter.keep_holdings), so a crashed replica's slots and reserved money come free within it
# (a TTL as long as the longest request locked its tenants out for 15 minutes).
HOLDING_TTL_S = 30.0
# Connections to Redis per proxy replica: each limit check is one short script call (well under a
# millisecond), so a few dozen serve thousands of requests a second.
MAX_CONNECTIONS = 32

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

# KEYS[1] the counter (theoretical arrival time, ms); ARGV: increment_ms, window_ms, debt 0|1
_RATE = (
    _NOW_MS
    + """
local inc = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(tat, now)
local new_tat = math.max(start + inc, now)  -- a refund (debt with inc < 0) stops at idle
if ARGV[3] ~= '1' then
  local wait
  if inc > window then wait = start - now else wait = new_tat - now - window end
  if wait > 0 then return string.format('%.3f', wait) end
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return '0'
"""
)

# KEYS[1] zset of leases; ARGV: lease id, limit, ttl_ms
_ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1000)
return 1
"""
)

# KEYS[1] zset of expiries (leases, or a budget's reservations); ARGV: ttl_ms, then the ids to
# renew (those not expired); the key itself is kept at least as long
_RENEW = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
  end
end
if redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl) + 1000)
end
return 1
"""
)

_PURGE = """
local function purge(res_k, exp_k)
  local expired = redis.call('ZRANGEBYSCORE', exp_k, '-inf', now)
  for _, r in ipairs(expired) do redis.call('HDEL', res_k, r) end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', exp_k, '-inf', now) end
  local reserved = 0
  for _, v in ipairs(redis.call('HVALS', res_k)) do reserved = reserved + tonumber(v) end
  return reserved
end
"""

# KEYS: (spent, res, exp) per budget; ARGV: id, amount, ttl_ms, keep_ms, ceiling per budget
_RESERVE = (
    _NOW_MS
    + _PURGE
    + """
local id, amount = ARGV[1], tonumber(ARGV[2])
local ttl, keep = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 3
local first_spent, first_reserved = 0, 0
for i = 1, n do
  local reserved = purge(KEYS[3 * i - 1], KEYS[3 * i])
  local spent = tonumber(redis.call('GET', KEYS[3 * i - 2]) or '0')
  local ceiling = tonumber(ARGV[4 + i])
  if ceiling >= 0 and spent + reserved + amount > ceiling then
    return {0, i, string.format('%.0f', spent), string.format('%.0f', reserved)}
  end
  if i == 1 then first_spent, first_reserved = spent, reserved end
end
for i = 1, n do
  redis.call('HSET', KEYS[3 * i - 1], id, amount)
  redis.call('ZADD', KEYS[3 * i], now + ttl, id)
  redis.call('PEXPIRE', KEYS[3 * i - 1], keep)
  redis.call('PEXPIRE', KEYS[3 * i], keep)
end
return {1, 0, string.format('%.0f', first_spent), string.format('%.0f', first_reserved)}
"""
)

# KEYS: (spent, res, exp) per budget; ARGV: id, actual, keep_ms
_SETTLE = """
for i = 1, #KEYS / 3 do
  redis.call('HDEL', KEYS[3 * i - 1], ARGV[1])
  redis.call('ZREM', KEYS[3 * i], ARGV[1])
  redis.call('INCRBY', KEYS[3 * i - 2], ARGV[2])
  redis.call('PEXPIRE', KEYS[3 * i - 2], ARGV[3])
end
return 1
"""

# KEYS: spent, res, exp of one budget
_STATUS = (
    _NOW_MS
    + _PURGE
    + """
local reserved = purge(KEYS[2], KEYS[3])
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
return {string.format('%.0f', spent), string.format('%.0f', reserved)}
"""
)


@dataclass(frozen=True, slots=True)
class Persistence:
    """Whether Redis keeps its data over a restart; None where it would not say (managed
    services often disable ``CONFIG``)."""

    aof: bool | None
    rdb: bool | None

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Persistence:
        """From ``CONFIG GET appendonly`` and ``CONFIG GET save`` (an empty ``save``: no
        snapshots)."""
        appendonly, save = config.get("appendonly"), config.get("save")
        return cls(
            aof=None if appendonly is None else appendonly.strip().lower() == "yes",
            rdb=None if save is None else bool(save.strip()),
        )


def durability_warning(persistence: Persistence, budgeted_tiers: Sequence[str]) -> str | None:
    """What an operator must hear when the tiers' spend lives in a Redis that forgets it: a
    restart would reset today's spend to zero and let every budget be spent again."""
    if not budgeted_tiers or persistence.aof or persistence.rdb:
        return None
    tiers = ", ".join(sorted(budgeted_tiers))
    if persistence.aof is None or persistence.rdb is None:
        return (
            f"could not read Redis's persistence settings (CONFIG refused): if it keeps no data"
            f" over a restart, a restart forgets today's spend of the budgeted tiers ({tiers})"
        )
    return (
        f"Redis keeps no data over a restart (appendonly no, no save points): a restart forgets"
        f" today's spend of the budgeted tiers ({tiers}); turn on appendonly or snapshots"
    )


def _triples(keys: Sequence[str]) -> list[str]:
    return [part for key in keys for part in (f"{key}:spent", f"{key}:res", f"{key}:exp")]


class RedisCounters:
    """:class:`~proxy.policy.limits.CounterBackend` on Redis (``redis.asyncio``)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        owns_client: bool = False,
        retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._owns_client = owns_client
        # After a failure no check for retry_after seconds (as the cache's RedisStore): a hung
        # Redis then costs one timeout, not one per counter step of every request.
        self._backoff = Backoff(retry_after, clock)
        self._rate = client.register_script(_RATE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._status = client.register_script(_STATUS)

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float = 1.0, max_connections: int = MAX_CONNECTIONS
    ) -> RedisCounters:
        """A client of its own; a hung Redis costs one ``timeout_s`` (then the back-off fails fast)
        before the limiter's outage policy applies.

        The pool is bounded: a burst of requests waits (up to ``timeout_s``) for one of a few
        connections rather than opening one each. Hundreds of connects at once time out on a
        loaded host, and the outage policy then lets requests through unchecked."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
        )
        return cls(aioredis.Redis.from_pool(pool), owns_client=True)

    async def rate(self, key: str, cost: float, per_minute: int, *, debt: bool = False) -> float:
        increment_ms = cost * WINDOW_S * 1000 / per_minute
        args: list[Any] = [repr(increment_ms), repr(WINDOW_S * 1000), "1" if debt else "0"]
        wait_ms = float(_text(await self._run(self._rate, [key], args)))
        return wait_ms / 1000

    async def acquire_lease(self, key: str, lease_id: str, limit: int, ttl_s: float) -> bool:
        args: list[Any] = [lease_id, limit, repr(ttl_s * 1000)]
        return int(await self._run(self._acquire, [key], args)) == 1

    async def release_lease(self, key: str, lease_id: str) -> None:
        # Always tried, back-off or not: a release skipped after a passing hiccup would hold the
        # slot until its TTL, and lock the tenant out of it.
        await self._call(lambda: self._client.zrem(key, lease_id), gated=False)

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        by_key: dict[str, list[str]] = {}
        for key, lease_id in leases:
            by_key.setdefault(key, []).append(lease_id)
        # one script per key: a tenant's leases share a key (and the tier's cluster slot)
        for key, ids in by_key.items():
            await self._run(self._renew, [key], [repr(ttl_s * 1000), *ids])

    async def renew_reservations(
        self, reservations: Sequence[tuple[Sequence[str], str]], ttl_s: float
    ) -> None:
        # a reservation's expiry is its score in each budget's K:exp zset, as a lease's is
        expiries = [(f"{key}:exp", res_id) for keys, res_id in reservations for key in keys]
        await self.renew_leases(expiries, ttl_s)

    async def reserve(
        self, budgets: Sequence[tuple[str, int]], res_id: str, amount_nano: int, ttl_s: float
    ) -> ReserveOutcome:
        keys = [key for key, _ in budgets]
        args: list[Any] = [res_id, amount_nano, repr(ttl_s * 1000), BUDGET_KEEP_MS]
        args += [ceiling for _, ceiling in budgets]
        granted, index, spent, reserved = await self._run(self._reserve, _triples(keys), args)
        refused = None if int(granted) else keys[int(index) - 1]
        return ReserveOutcome(bool(int(granted)), refused, int(_text(spent)), int(_text(reserved)))

    async def settle(self, keys: Sequence[str], res_id: str, actual_nano: int) -> None:
        # Always tried, as a release: a skipped settle would leave its worst case reserved
        # until the reservation's TTL, and the spend unrecorded.
        args: list[Any] = [res_id, actual_nano, BUDGET_KEEP_MS]
        await self._call(lambda: self._settle(keys=_triples(keys), args=args), gated=False)

    async def budget_status(self, key: str) -> tuple[int, int]:
        spent, reserved = await self._run(self._status, _triples([key]), [])
        return int(_text(spent)), int(_text(reserved))

    def failing(self) -> bool:
        return self._backoff.waiting()

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        return await self._call(lambda: script(keys=keys, args=args))

    async def _call(self, call: Callable[[], Awaitable[Any]], *, gated: bool = True) -> Any:
        """``gated``: a check, refused at once while the back-off runs; a release or settle is
        always tried."""
        if gated and self._backoff.waiting():
            raise CounterBackendError("redis unavailable (retrying after back-off)")
        try:
            return await call()
        except (RedisError, OSError) as exc:
            self._backoff.failed()
            raise CounterBackendError(f"redis: {exc}") from exc

    async def persistence(self) -> Persistence:
        """Redis's own persistence settings; raises RedisError when it cannot be reached."""
        config: dict[str, str] = {}
        for name in ("appendonly", "save"):
            try:
                found = await self._client.config_get(name)
            except ResponseError:  # CONFIG disabled or renamed (managed Redis): unknown
                continue
            config.update({_text(k): _text(v) for k, v in found.items()})
        return Persistence.from_config(config)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
