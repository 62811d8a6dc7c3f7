"""A tier's strong_share holds on a mixed workload: the router's share tracker calibrates the
threshold from the traffic it sees, so about 30% of `auto` requests reach the large engine.

Prompts: a shuffled sample of ../shared/data/routing_dev.csv.gz (maths, multiple choice,
open-ended chat), read at run time; the engines are fakes, since the decision does not depend
on their answers.
"""

from __future__ import annotations

import csv
import gzip
import random
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.settings import Settings
from tests.integration.conftest import StartFake, engine_config
from tests.integration.test_policy_pipeline import tier, write_policies

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing_dev.csv.gz"
WARM_UP, MEASURED = 250, 600


def routed_tier_settings(
    tmp_path: Path,
    small_url: str,
    large_url: str,
    *,
    latency: dict[str, Any] | None = None,
    **extra: Any,
) -> Settings:
    """A keyless `pro` tier routing `auto` with strong_share 0.3 between a small engine and a
    large one ten times its price; ``extra`` adds top-level config sections (cache, ...)."""
    policy = tier("pro", [], models=["auto"], limits={"max_tokens": 4})
    policy["routing"] = {"strong_share": 0.3}
    if latency is not None:
        policy["latency"] = latency
    folder = write_policies(tmp_path / "policies", policy)
    return Settings.model_validate(
        {
            "engines": [
                engine_config("small", "small-model", [small_url]),
                {
                    **engine_config("large", "large-model", [large_url]),
                    "cost": {"input_per_mtok": 1.0, "output_per_mtok": 3.0},
                },
            ],
            "policies": str(folder),
            "data_dir": str(tmp_path / "data"),
            "logging": {"level": "warning", "format": "console"},
            **extra,
        }
    )


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/routing_dev.csv.gz")
async def test_strong_share_of_thirty_percent_holds(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path
) -> None:
    with gzip.open(DATA, "rt", newline="") as f:
        prompts = [row["prompt"].split(" [TURN2] ")[0] for row in csv.DictReader(f)]
    random.Random(7).shuffle(prompts)
    prompts = prompts[: WARM_UP + MEASURED]

    small = await start_fake("small-model")
    large = await start_fake("large-model")
    # a share test: load must not move requests
    settings = routed_tier_settings(
        tmp_path, small.url, large.url, latency={"ttft_p95_ms": 600_000}, cache={"enabled": False}
    )
    client = await aiohttp_client(create_app(settings, access_log=False))
    routed: list[str] = []
    for prompt in prompts:
        body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        routed.append(resp.headers["x-frugal-route"])
    share = routed[WARM_UP:].count("large") / MEASURED
    print(f"strong share over the last {MEASURED} requests: {share:.3f}")
    assert 0.27 <= share <= 0.33
