"""The few things the bench needs from a Frugal config: engine prices, and a fresh-state copy.

All knowledge of the config format the bench relies on lives here (``proxy.settings`` is the
authority; this module only reads through it and rewrites three fields of the raw YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from proxy.bench.summary import EngineCost
from proxy.settings import load_settings, parse_settings


def costs_from_config(path: Path) -> dict[str, EngineCost]:
    """Engine name -> price, from ``engines[].cost`` of a Frugal config (validated)."""
    settings = load_settings(path)
    return {
        engine.name: EngineCost(engine.cost.input_per_mtok, engine.cost.output_per_mtok)
        for engine in settings.engines
    }


def costs_from_json(path: Path) -> dict[str, EngineCost]:
    """A plain cost table: ``{"small": {"input_per_mtok": 0.05, "output_per_mtok": 0.1}, ...}``."""
    raw = orjson.loads(path.read_bytes())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object mapping engine names to prices")
    out: dict[str, EngineCost] = {}
    for name, price in raw.items():
        if not isinstance(price, dict):
            raise ValueError(f"{path}: {name}: expected {{input_per_mtok, output_per_mtok}}")
        out[str(name)] = EngineCost(
            float(price.get("input_per_mtok", 0.0)), float(price.get("output_per_mtok", 0.0))
        )
    return out


def fresh_config_text(config_path: Path, data_dir: Path, port: int) -> str:
    """The config rewritten to keep all state under ``data_dir`` and listen on ``port``.

    Each strategy in a comparison gets its own empty cache, so one strategy's warm cache cannot
    flatter the next. Relative paths in the original (the policy folder) are made absolute,
    because the copy lives elsewhere. The result is validated with the real settings parser.
    """
    raw: Any = yaml.safe_load(config_path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: the top level must be a mapping")
    base = config_path.resolve().parent
    raw["data_dir"] = str(data_dir)
    cache = raw.setdefault("cache", {}) or {}
    cache["data_dir"] = str(data_dir / "cache")
    raw["cache"] = cache
    server = raw.setdefault("server", {}) or {}
    server["host"] = "127.0.0.1"
    server["port"] = port
    raw["server"] = server
    policies = raw.get("policies", "policies")
    if policies is not None and not Path(policies).is_absolute():
        raw["policies"] = str(base / policies)
    text = yaml.safe_dump(raw, sort_keys=False)
    parse_settings(text, source=f"{config_path} (bench copy)")
    return text
