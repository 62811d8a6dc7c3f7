"""The router scores with the shallow view of the pass that embedded the request, whether the
semantic cache's fused encoder or the router's own base encoder made it (real MiniLM, fake
engines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.app import SERVICES, create_app
from proxy.routing.classifier import DifficultyClassifier
from tests.integration.conftest import StartFake
from tests.integration.test_strong_share import routed_tier_settings

PROMPT = "Prove that there are infinitely many primes of the form 4k + 3."


@pytest.mark.parametrize("isolation", ["process", "thread"])
@pytest.mark.parametrize("semantic", [True, False], ids=["fused-encoder", "router-encoder"])
async def test_the_router_finds_the_shallow_view_of_the_request(
    start_fake: StartFake, aiohttp_client: Any, tmp_path: Path, semantic: bool, isolation: str
) -> None:
    pytest.importorskip("torch")
    small = await start_fake("small-model")
    large = await start_fake("large-model")
    settings = routed_tier_settings(
        tmp_path,
        small.url,
        large.url,
        cache={"enabled": semantic, "semantic": semantic},
        embeddings={"precision": "float32", "isolation": isolation},
    )
    app = create_app(settings, access_log=False)
    client = await aiohttp_client(app)
    body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}]}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    router = app[SERVICES].router
    assert len(router.views) == 1

    # The view kept under the request's embedding is the reference encoder's shallow view of it.
    from proxy.cache.verifier import MiniLMEncoder

    embedder = app[SERVICES].embedder
    assert embedder is not None
    found = router.views.get(await embedder.embed(PROMPT))
    assert found is not None
    reference = MiniLMEncoder.load().encode([PROMPT]).shallow
    assert reference is not None
    assert float(np.dot(found, reference[0])) > 0.9999
    classifier = router.classifier
    assert isinstance(classifier, DifficultyClassifier)
    assert classifier.shallow_neighbours is not None
