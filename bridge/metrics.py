"""Prometheus metrics of one daemon, rendered by prometheus_client.

Metric names are created on first use, so transports and plugins name their own; every
name gets the ``bridged_`` prefix. The full list is in docs/operations.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "bridged_"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        metric = self._counters.get(name)
        if metric is None:
            metric = Counter(PREFIX + name, name.replace("_", " "), sorted(labels),
                             registry=self.registry)
            self._counters[name] = metric
        (metric.labels(**labels) if labels else metric).inc(amount)

    def gauge(self, name: str, value: float, **labels: str) -> None:
        metric = self._gauges.get(name)
        if metric is None:
            metric = Gauge(PREFIX + name, name.replace("_", " "), sorted(labels),
                           registry=self.registry)
            self._gauges[name] = metric
        (metric.labels(**labels) if labels else metric).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        metric = self._histograms.get(name)
        if metric is None:
            metric = Histogram(PREFIX + name, name.replace("_", " "), sorted(labels),
                               registry=self.registry,
                               buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                        2.5, 5))
            self._histograms[name] = metric
        (metric.labels(**labels) if labels else metric).observe(value)

    def hook_timer(self, plugin: str, seconds: float) -> None:
        self.observe("hook_seconds", seconds, plugin=plugin)

    def render(self) -> bytes:
        return generate_latest(self.registry)
