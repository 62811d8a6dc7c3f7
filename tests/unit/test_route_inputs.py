"""What the request path tells the router about each engine: its availability and load, judged
by the replica set that would answer the request (a canary's, for a conversation in its share or
while the stable's replicas are all down)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from proxy.engines.pool import Engine, ReplicaLoad
from proxy.pipeline import _Loads, _Unavailable
from proxy.policy.admission import EngineAdmission
from proxy.rollout.manager import Selection
from proxy.routing.router import Router
from proxy.settings import EngineSettings


def _engine(name: str, url: str, version: str) -> Engine:
    engine = Engine.from_settings(
        EngineSettings(name=name, model=name, urls=[url], version=version)
    )
    engine.replicas[0].healthy = True
    return engine


def _services(*engines: Engine) -> Any:
    return SimpleNamespace(
        router=Router(engines=list(engines), classifier=None, count_tokens=len),
        admissions={e.name: EngineAdmission(e.name, cap=None) for e in engines},
    )


def test_an_engine_answered_by_its_canary_is_available() -> None:
    stable = _engine("small", "http://stable", "v1")
    canary = _engine("small", "http://canary", "v2")
    large = _engine("large", "http://large", "v1")
    stable.replicas[0].healthy = False
    selections = {"small": Selection(canary, instead_of=stable), "large": Selection(large)}
    unavailable = _Unavailable(selections)
    assert "small" not in unavailable and "large" not in unavailable
    assert "medium" not in unavailable  # not one of this request's engines: nothing to avoid
    canary.replicas[0].healthy = False  # both versions down: the canary's selection says so
    unavailable = _Unavailable(selections)
    assert "small" in unavailable and "large" not in unavailable
    assert not stable.can_take(time.monotonic())


async def test_an_engines_load_is_that_of_the_version_that_would_answer() -> None:
    stable = _engine("small", "http://stable", "v1")
    canary = _engine("small", "http://canary", "v2")
    canary.replicas[0].load = ReplicaLoad(running=1, waiting=1000)
    services = _services(stable)
    to_canary = _Loads(services, {"small": Selection(canary)})["small"]
    to_stable = _Loads(services, {"small": Selection(stable)})["small"]
    assert (to_canary.queue_length, to_stable.queue_length) == (1000, 0)
    assert to_canary.est_ttft_ms > 100 * to_stable.est_ttft_ms
    # The proxy's own queue in front of the engine is both versions': it counts either way.
    gate = services.admissions["small"] = EngineAdmission("small", cap=1)
    async with gate.slot(priority=0, max_wait_s=10.0, tier="t"):
        waiter = asyncio.create_task(_hold(gate))
        await asyncio.sleep(0)
        assert gate.waiting == 1
        for version in (stable, canary):
            load = _Loads(services, {"small": Selection(version)})["small"]
            assert load.queue_length == 1 + int(version.load().waiting)
    await waiter


async def _hold(gate: EngineAdmission) -> None:
    async with gate.slot(priority=0, max_wait_s=10.0, tier="t"):
        pass


def test_an_engines_load_is_worked_out_only_when_the_router_reads_it() -> None:
    small, large = _engine("small", "http://s", "v1"), _engine("large", "http://l", "v1")
    services = _services(small, large)
    asked: list[str] = []

    class CountingSelections(dict[str, Selection]):
        """A load is worked out from its engine's selection: each one read is a load worked out.
        (Counted here, not on the router: the compiled build's router can't be patched.)"""

        def __getitem__(self, name: str) -> Selection:
            selection = super().__getitem__(name)
            asked.append(name)
            return selection

    loads = _Loads(services, CountingSelections(small=Selection(small), large=Selection(large)))
    assert sorted(loads) == ["large", "small"] and len(loads) == 2
    assert loads["small"] is loads.get("small")  # once per request and engine
    assert asked == ["small"]
    assert loads.get("medium") is None
    assert dict(loads).keys() == {"small", "large"} and asked == ["small", "large"]
