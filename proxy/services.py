"""Everything the request path uses, built once per application by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.engines.client import EngineCaller
from proxy.engines.pool import Engine
from proxy.observability.metrics import Metrics
from proxy.settings import Settings


@dataclass(eq=False)
class Services:
    settings: Settings
    engines: list[Engine]
    metrics: Metrics
    caller: EngineCaller
    access_log: bool = True
    by_name: dict[str, Engine] = field(init=False)
    by_model: dict[str, Engine] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {e.name: e for e in self.engines}
        self.by_model = {e.model: e for e in self.engines}
