"""Lock-free counter and histogram families for the request path, exposed by a registry collector.

``prometheus_client``'s own counters and histograms take a mutex per value on every update
(~0.5 µs per counter increment, ~1.1 µs per histogram observation). The proxy updates about ten
series per request (and the in-flight gauge twice), all from the event loop's thread, so these
families keep plain floats and collect them into standard metric families at scrape time (~3x
cheaper per request).

Not thread-safe by design: update them from one thread (the event loop). Reading (a scrape) on
that same thread always sees whole updates.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterChild:
    """One labelled counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counters only go up; got {amount}")
        self.value += amount


class GaugeChild:
    """One labelled gauge series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    """One labelled histogram series: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("_upper_bounds", "counts", "sum")

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self._upper_bounds = upper_bounds
        self.counts = [0] * (len(upper_bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left finds the first bound >= value, i.e. Prometheus' "le" bucket.
        self.counts[bisect.bisect_left(self._upper_bounds, value)] += 1
        self.sum += value


_N = TypeVar("_N", CounterChild, GaugeChild)


class _Family:
    __slots__ = ("_children", "documentation", "labelnames", "name")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)

    def _check(self, labelvalues: tuple[str, ...]) -> None:
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {self.labelnames}, got values {labelvalues}"
            )


class _NumberFamily(_Family, Generic[_N]):
    """A family whose series are one number each (a counter's or a gauge's)."""

    __slots__ = ()
    _series: Callable[[], _N]  # makes a series
    _exposed: type[CounterMetricFamily | GaugeMetricFamily]  # what a scrape reads

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._children: dict[tuple[str, ...], _N] = {}

    def labels(self, *labelvalues: str) -> _N:
        child = self._children.get(labelvalues)
        if child is None:
            self._check(labelvalues)
            child = self._children[labelvalues] = self._series()
        return child

    def to_metric(self) -> Metric:
        family = self._exposed(self.name, self.documentation, labels=self.labelnames)
        for labelvalues, child in self._children.items():
            family.add_metric(labelvalues, child.value)
        return family


class CounterFamily(_NumberFamily[CounterChild]):
    """``frugal_x`` counter family; exposed as ``frugal_x_total``."""

    __slots__ = ()
    _series = CounterChild
    _exposed = CounterMetricFamily


class GaugeFamily(_NumberFamily[GaugeChild]):
    """``frugal_x`` gauge family, for a gauge the request path moves (not one set by a poll)."""

    __slots__ = ()
    _series = GaugeChild
    _exposed = GaugeMetricFamily


class HistogramFamily(_Family):
    """Histogram family; exposed as ``_bucket``/``_sum``/``_count``."""

    __slots__ = ("upper_bounds",)

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket")
        self.upper_bounds = bounds
        self._children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, *labelvalues: str) -> HistogramChild:
        child = self._children.get(labelvalues)
        if child is None:
            self._check(labelvalues)
            child = self._children[labelvalues] = HistogramChild(self.upper_bounds)
        return child

    def to_metric(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*map(floatToGoString, self.upper_bounds), "+Inf"]
        for labelvalues, child in self._children.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for edge, count in zip(edges, child.counts, strict=True):
                cumulative += count
                buckets.append((edge, float(cumulative)))
            family.add_metric(labelvalues, buckets, child.sum)
        return family


class FamiliesCollector(Collector):
    """Registers a set of families on a ``CollectorRegistry``."""

    def __init__(self, families: Sequence[CounterFamily | GaugeFamily | HistogramFamily]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.to_metric()

    def describe(self) -> Iterator[Metric]:
        # Names without samples, so the registry can refuse a clashing name at start-up.
        for family in self._families:
            if isinstance(family, CounterFamily):
                yield CounterMetricFamily(
                    family.name, family.documentation, labels=family.labelnames
                )
            else:
                yield HistogramMetricFamily(
                    family.name, family.documentation, labels=family.labelnames
                )
