"""The trace generator: arrival process, popularity weights, grouping, reproducibility."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bench.trace import load_trace

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_trace.py"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_trace", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_trace", module)
    spec.loader.exec_module(module)
    return module


make_trace = load_script()


@given(st.integers(1, 300), st.floats(0.0, 2.5))
def test_zipf_weights_are_a_decreasing_distribution(size: int, exponent: float) -> None:
    weights = make_trace.zipf_weights(size, exponent)
    assert len(weights) == size
    assert weights.sum() == pytest.approx(1.0)
    assert np.all(np.diff(weights) <= 1e-15)


@settings(max_examples=30)
@given(st.integers(1, 200), st.floats(0.5, 50), st.floats(1, 10), st.integers(0, 2**32 - 1))
def test_arrivals_increase_and_come_in_the_asked_number(
    n: int, rate: float, burst: float, seed: int
) -> None:
    times = make_trace.mmpp_arrivals(n, rate, burst, 5.0, 15.0, np.random.default_rng(seed))
    assert len(times) == n
    assert all(t > 0 for t in times)
    assert times == sorted(times)


def test_arrivals_keep_the_mean_rate_and_are_burstier_than_poisson() -> None:
    rng = np.random.default_rng(1)
    times = np.array(make_trace.mmpp_arrivals(40_000, 10.0, 6.0, 5.0, 15.0, rng))
    assert 40_000 / times[-1] == pytest.approx(10.0, rel=0.1)
    counts = np.histogram(times, bins=np.arange(0, times[-1], 1.0))[0]
    # A Poisson process has variance == mean per window; bursts and lulls make it much larger.
    assert counts.var() / counts.mean() > 3.0


def test_group_id_is_stable_and_order_free() -> None:
    assert make_trace.group_id("q:", ["b", "a"]) == make_trace.group_id("q:", ["a", "b"])
    assert make_trace.group_id("q:", ["a"]) != make_trace.group_id("q:", ["c"])


def test_messages_interleave_stand_in_answers() -> None:
    messages = make_trace._messages(["first?", "Why is that?"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Why is that?"
    assert "first?" in messages[2]["content"]


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the shared development data")
def test_same_seed_same_trace_and_paraphrases_share_groups(tmp_path: Path) -> None:
    argv = ["--n", "150", "--seed", "3", "--pool-size", "50", "--routing-pool-size", "30"]
    first, second, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert make_trace.main([*argv, "--out", str(first)]) == 0
    assert make_trace.main([*argv, "--out", str(second)]) == 0
    assert make_trace.main([*argv[:2], "--seed", "4", *argv[4:], "--out", str(other)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    requests = load_trace(first)
    texts_by_group: dict[str, set[str]] = {}
    for request in requests:
        if request.kind in ("question", "paraphrase") and request.endpoint == "chat":
            texts_by_group.setdefault(request.group or "", set()).add(
                request.body["messages"][-1]["content"]
            )
    assert any(len(texts) > 1 for texts in texts_by_group.values())  # paraphrases grouped
    followups = [r for r in requests if r.kind == "followup"]
    assert all(">fu" in (r.group or "") for r in followups)
