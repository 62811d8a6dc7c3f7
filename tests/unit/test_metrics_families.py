"""The lock-free families must expose exactly what prometheus_client's own metrics would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from proxy.observability.families import (
    CounterFamily,
    FamiliesCollector,
    GaugeFamily,
    HistogramFamily,
)

bucket_sets = st.lists(
    st.floats(0.0001, 1000, allow_nan=False), min_size=1, max_size=12, unique=True
).map(sorted)
observations = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 2000, allow_nan=False)), max_size=60
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(bucket_sets, observations)
def test_histogram_matches_prometheus_client(
    buckets: list[float], observed: list[tuple[str, float]]
) -> None:
    ours, reference = CollectorRegistry(), CollectorRegistry()
    family = HistogramFamily("x_seconds", "doc", ["k"], buckets=buckets)
    ours.register(FamiliesCollector([family]))
    native = Histogram("x_seconds", "doc", ["k"], buckets=buckets, registry=reference)
    for label, value in observed:
        family.labels(label).observe(value)
        native.labels(label).observe(value)
    got, want = samples(ours), samples(reference)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 1e6)), max_size=50))
def test_counter_matches_prometheus_client(increments: list[tuple[str, float]]) -> None:
    ours, reference = CollectorRegistry(), CollectorRegistry()
    family = CounterFamily("x_events", "doc", ["k"])
    ours.register(FamiliesCollector([family]))
    native = Counter("x_events", "doc", ["k"], registry=reference)
    for label, amount in increments:
        family.labels(label).inc(amount)
        native.labels(label).inc(amount)
    assert samples(ours) == pytest.approx(samples(reference))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]), st.sampled_from(["inc", "set"]), st.integers(-50, 50)
        ),
        max_size=50,
    )
)
def test_gauge_matches_prometheus_client(moves: list[tuple[str, str, int]]) -> None:
    ours, reference = CollectorRegistry(), CollectorRegistry()
    family = GaugeFamily("x_in_flight", "doc", ["k"])
    ours.register(FamiliesCollector([family]))
    native = Gauge("x_in_flight", "doc", ["k"], registry=reference)
    for label, move, amount in moves:
        getattr(family.labels(label), move)(amount)
        getattr(native.labels(label), move)(amount)
    assert samples(ours) == samples(reference)
    assert generate_latest(ours) == generate_latest(reference)


def test_exposition_text_has_types_and_cumulative_buckets() -> None:
    registry = CollectorRegistry()
    latency = HistogramFamily("lat_seconds", "Latency.", ["engine"], buckets=[0.1, 1.0])
    hits = CounterFamily("hits", "Hits.", ["kind"])
    registry.register(FamiliesCollector([latency, hits]))
    for value in (0.05, 0.1, 0.5, 3.0):
        latency.labels("small").observe(value)
    hits.labels("exact").inc()
    text = generate_latest(registry).decode()
    assert "# TYPE lat_seconds histogram" in text
    assert 'lat_seconds_bucket{engine="small",le="0.1"} 2.0' in text  # le is inclusive
    assert 'lat_seconds_bucket{engine="small",le="1.0"} 3.0' in text
    assert 'lat_seconds_bucket{engine="small",le="+Inf"} 4.0' in text
    assert 'lat_seconds_count{engine="small"} 4.0' in text
    assert "# TYPE hits_total counter" in text  # prometheus_client names 0.0.4 counters so
    assert 'hits_total{kind="exact"} 1.0' in text


def test_wrong_label_count_and_negative_increment_are_refused() -> None:
    family = CounterFamily("c", "doc", ["a", "b"])
    with pytest.raises(ValueError, match="takes labels"):
        family.labels("only-one")
    with pytest.raises(ValueError, match="only go up"):
        family.labels("x", "y").inc(-1)
    with pytest.raises(ValueError, match="finite bucket"):
        HistogramFamily("h", "doc", buckets=[float("inf")])


def test_registry_refuses_a_clashing_name() -> None:
    registry = CollectorRegistry()
    registry.register(FamiliesCollector([CounterFamily("dup", "doc")]))
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("dup", "doc", registry=registry)
