"""Where rollout states persist: a JSON file in the data directory, and Redis for a fleet.

The file (``<data dir>/rollout.json``, one object per engine) makes a promotion or rollback
survive a restart of a single proxy. With ``redis.url`` configured, the states are also kept in
Redis (``frugal:rollout:<engine>``), read at start-up (they win over the file) and polled every
second, so every replica of a fleet applies a change another replica made (a state with a higher
``rev`` wins).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
import structlog

from proxy.rollout.state import RolloutState

log = structlog.get_logger("frugal.rollout")

REDIS_PREFIX = "frugal:rollout:"


class FileStateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self) -> dict[str, RolloutState]:
        return await asyncio.to_thread(self._load)

    def _load(self) -> dict[str, RolloutState]:
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("rollout state file unreadable; starting from the config",
                        path=str(self.path), error=str(exc))  # fmt: skip
            return {}
        return _parse_states(raw.get("engines", {}) if isinstance(raw, dict) else {})

    async def save(self, states: dict[str, RolloutState]) -> None:
        await asyncio.to_thread(self._save, states)

    def _save(self, states: dict[str, RolloutState]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"engines": {name: s.to_json() for name, s in sorted(states.items())}}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one


class RedisStateStore:
    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def load(self, engines: list[str]) -> dict[str, RolloutState]:
        values = await self._redis.mget([REDIS_PREFIX + name for name in engines])
        raw = {name: orjson.loads(v) for name, v in zip(engines, values, strict=True) if v}
        return _parse_states(raw)

    async def save(self, state: RolloutState) -> None:
        await self._redis.set(REDIS_PREFIX + state.engine, orjson.dumps(state.to_json()))

    async def aclose(self) -> None:
        await self._redis.aclose()


def _parse_states(raw: dict[str, Any]) -> dict[str, RolloutState]:
    states = {}
    for name, value in raw.items():
        try:
            states[name] = RolloutState.from_json(value)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring an unreadable rollout state", engine=name, error=str(exc))
    return states
