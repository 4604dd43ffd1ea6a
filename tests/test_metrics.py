"""bridge.metrics: counters, gauges and histograms, as Prometheus reads them back."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.metrics import BUCKETS, Metrics


def parsed(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.render().decode())
            for s in family.samples}


def test_counters_gauges_and_histograms_render_as_prometheus_text() -> None:
    m = Metrics()
    m.count("messages_in_total", transport="chat")
    m.count("messages_in_total", 2, transport="chat")
    m.count("messages_in_total", transport="rabbit")
    m.count("published_total")
    m.gauge("open_sockets", 3, transport="chat")
    m.gauge("open_sockets", 1, transport="chat")
    for v in (0.0001, BUCKETS[3], 0.0049, 7.0):  # on a bound counts in that bucket (le)
        m.observe("hook_seconds", v, plugin="validation")
    samples = parsed(m)
    assert samples[("bridged_messages_in_total", (("transport", "chat"),))] == 3
    assert samples[("bridged_messages_in_total", (("transport", "rabbit"),))] == 1
    assert samples[("bridged_published_total", ())] == 1
    assert samples[("bridged_open_sockets", (("transport", "chat"),))] == 1

    def bucket(le: str) -> float:
        return samples[("bridged_hook_seconds_bucket", (("le", le), ("plugin", "validation")))]

    assert bucket("0.0005") == 1
    assert bucket("0.0025") == 1
    assert bucket("0.005") == 3
    assert bucket("5.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("bridged_hook_seconds_count", (("plugin", "validation"),))] == 4
    assert samples[("bridged_hook_seconds_sum", (("plugin", "validation"),))] == pytest.approx(
        0.0001 + 0.005 + 0.0049 + 7.0)
    assert m.registry.get_sample_value("bridged_messages_in_total", {"transport": "chat"}) == 3


def test_a_metric_keeps_the_labels_it_was_first_used_with() -> None:
    m = Metrics()
    m.count("failed_total", transport="chat", stage="deliver")
    with pytest.raises(ValueError, match="labels"):
        m.count("failed_total", transport="chat")
    with pytest.raises(KeyError):
        m.count("failed_total", transport="chat", reason="x")


def test_a_name_prometheus_would_see_twice_is_refused_at_once() -> None:
    m = Metrics()
    m.count("open_total")
    m.gauge("depth", 1)
    with pytest.raises(ValueError, match="clashes"):
        m.gauge("open", 1)  # bridged_open_total renders as the counter family bridged_open
    with pytest.raises(ValueError, match="clashes"):
        m.observe("depth", 0.1)
    m.count("answers_total", status=404)  # type: ignore[arg-type]  # a careless caller
    assert m.registry.get_sample_value("bridged_answers_total", {"status": "404"}) == 1
    text_string_to_metric_families(m.render().decode())  # still renders
