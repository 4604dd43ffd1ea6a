"""Prometheus metrics of one daemon: kept in plain dicts, rendered by prometheus_client.

Metric names are created on first use, so transports and plugins name their own; every
name gets the ``bridged_`` prefix. The full list is in docs/operations.md.

The values live in dictionaries keyed by label values, and one collector hands them to
prometheus_client when ``/metrics`` is read. The pipeline counts and times several things per
message. On the development VM, a prometheus_client counter with labels cost 5.4 µs per
increment and a histogram 6.6 µs per observation, because of the label lookup and a lock per
call. That added up to about 30 µs per message (BENCHMARKS.md, scenario 2). A dictionary
update costs a fraction of that. Metrics are updated from the trio thread only, so no lock
is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

PREFIX = "bridged_"
#: Histogram bucket bounds, in seconds.
BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
_BOUNDS = [*(repr(float(b)) for b in BUCKETS), "+Inf"]  # "le" as prometheus_client writes it


class _Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip(_BOUNDS, self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


@dataclass
class _Family:
    kind: str  # "counter" or "gauge"
    name: str
    labelnames: tuple[str, ...]
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"metric {self.name} has labels {self.labelnames},"
                             f" not {tuple(sorted(labels))}")
        return tuple([str(labels[n]) for n in self.labelnames])

    def doc(self) -> str:
        return self.name.removeprefix(PREFIX).replace("_", " ")

    def metric(self) -> Metric:
        made = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = made(self.name, self.doc(), labels=list(self.labelnames))
        for values, v in self.values.items():
            family.add_metric(list(values), v)
        return family


@dataclass
class _HistogramFamily(_Family):
    histograms: dict[tuple[str, ...], _Histogram] = field(default_factory=dict)

    def metric(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc(), labels=list(self.labelnames))
        for values, h in self.histograms.items():
            family.add_metric(list(values), h.cumulative(), h.sum)
        return family


class _Collector(Collector):
    def __init__(self, families: dict[tuple[str, str], _Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in list(self._families.values()):
            yield family.metric()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families: dict[tuple[str, str], _Family] = {}  # by (kind, name)
        self._histograms: dict[str, _HistogramFamily] = {}
        self._exposed: dict[str, _Family] = {}  # by the name Prometheus sees
        self.registry.register(_Collector(self._families))

    def _family(self, kind: str, name: str, labels: dict[str, str]) -> _Family:
        family = self._families.get((kind, name))
        if family is None:
            family = self._add(_Family(kind, PREFIX + name, tuple(sorted(labels))))
        return family

    def _add(self, family: _Family) -> _Family:
        """Register a new family; a name Prometheus would see twice is refused here, at the
        call that introduces it, not in every later scrape."""
        exposed = family.name.removesuffix("_total") if family.kind == "counter" else family.name
        other = self._exposed.get(exposed)
        if other is not None:
            raise ValueError(f"metric {family.name} ({family.kind}) clashes with"
                             f" {other.name} ({other.kind})")
        self._exposed[exposed] = family
        self._families[(family.kind, family.name.removeprefix(PREFIX))] = family
        return family

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        family = self._family("counter", name, labels)
        key = family.key(labels)
        family.values[key] = family.values.get(key, 0.0) + amount

    def gauge(self, name: str, value: float, **labels: str) -> None:
        family = self._family("gauge", name, labels)
        family.values[family.key(labels)] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        family = self._histograms.get(name)
        if family is None:
            family = _HistogramFamily("histogram", PREFIX + name, tuple(sorted(labels)))
            self._add(family)
            self._histograms[name] = family
        key = family.key(labels)
        h = family.histograms.get(key)
        if h is None:
            h = family.histograms[key] = _Histogram()
        h.observe(value)

    def hook_timer(self, plugin: str, seconds: float) -> None:
        self.observe("hook_seconds", seconds, plugin=plugin)

    def render(self) -> bytes:
        return generate_latest(self.registry)
