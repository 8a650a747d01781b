"""Tests for the recording API and the delta buffer."""

from __future__ import annotations

import math

import pytest

from collector.buffer import DeltaBuffer
from collector.definitions import MetricDefinition
from collector.metrics import Metrics


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(DeltaBuffer())


def test_counter_increments_merge(metrics: Metrics) -> None:
    """Increments of one series merge into one delta, positional or named labels alike."""
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.requests_total.labels(operation="get_object", code="200").inc(2.5)
    metrics.requests_total.labels("put_object", "200").inc()

    counters = metrics.buffer.counters
    assert counters[("s3proxy_requests_total", ("get_object", "200"))] == 3.5
    assert counters[("s3proxy_requests_total", ("put_object", "200"))] == 1
    assert len(counters) == 2


def test_labels_child_cached(metrics: Metrics) -> None:
    """The same label values return the same child object."""
    first = metrics.requests_total.labels("get_object", "200")
    second = metrics.requests_total.labels(code="200", operation="get_object")
    assert first is second


def test_labels_converted_to_str(metrics: Metrics) -> None:
    """Label values are converted with str(), like prometheus_client."""
    metrics.requests_total.labels("get_object", 404).inc()
    assert ("s3proxy_requests_total", ("get_object", "404")) in metrics.buffer.counters


def test_cached_labels_not_aliased(metrics: Metrics) -> None:
    """Non-string values never reuse the series of a different string value."""
    metrics.requests_total.labels("get_object", "1").inc()
    metrics.requests_total.labels("get_object", True).inc()
    metrics.requests_total.labels("get_object", 1).inc()

    counters = metrics.buffer.counters
    assert counters[("s3proxy_requests_total", ("get_object", "1"))] == 2
    assert counters[("s3proxy_requests_total", ("get_object", "True"))] == 1


def test_unlabelled_counter(metrics: Metrics) -> None:
    """A family without labels is incremented directly."""
    metrics.cache_hits_total.inc()
    metrics.cache_hits_total.inc(4)
    assert metrics.buffer.counters[("s3proxy_cache_hits_total", ())] == 5


def test_histogram_buckets_per_index(metrics: Metrics) -> None:
    """Observations land in the first bucket whose bound is >= the value."""
    histogram = metrics.request_latency_seconds.labels("get_object")
    histogram.observe(0.005)
    histogram.observe(0.0051)
    histogram.observe(100.0)

    delta = metrics.buffer.histograms[("s3proxy_request_latency_seconds", ("get_object",))]
    assert delta.buckets[0] == 1
    assert delta.buckets[1] == 1
    assert delta.buckets[-1] == 1
    assert delta.count == 3
    assert delta.sum == pytest.approx(100.0101)


def test_gauge_set_inc_dec(metrics: Metrics) -> None:
    """A gauge keeps its current value; inc and dec start from 0."""
    metrics.backend_state.labels("primary").set(0.5)
    metrics.cache_entries.inc(3)
    metrics.cache_entries.dec()

    gauges = metrics.buffer.gauges
    assert gauges[("s3proxy_backend_state", ("primary",))] == 0.5
    assert gauges[("s3proxy_cache_entries", ())] == 2


def test_swap_keeps_gauges(metrics: Metrics) -> None:
    """A swap moves the deltas into the batch and keeps the gauge values for the next."""
    metrics.cache_hits_total.inc()
    metrics.cache_bytes.set(10)
    first = metrics.buffer.swap("w", 1, 5.0)
    second = metrics.buffer.swap("w", 2, 6.0)

    assert first.counters == {("s3proxy_cache_hits_total", ()): 1}
    assert second.counters == {}
    assert second.gauges == {("s3proxy_cache_bytes", ()): 10}


def test_swap_gives_fresh_buffer(metrics: Metrics) -> None:
    """Deltas recorded after a swap go to the new buffer, not into the cut batch."""
    child = metrics.request_latency_seconds.labels("get_object")
    child.observe(1)
    batch = metrics.buffer.swap("w", 1, 5.0)
    child.observe(1)

    key = ("s3proxy_request_latency_seconds", ("get_object",))
    assert batch.histograms[key].count == 1
    assert metrics.buffer.histograms[key].count == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.requests_total.labels("get_object"),
        lambda m: m.requests_total.labels("get_object", "200", "x"),
        lambda m: m.requests_total.labels(operation="get_object"),
        lambda m: m.requests_total.labels(operation="get_object", code="200", extra="x"),
        lambda m: m.requests_total.labels("get_object", code="200"),
        lambda m: m.requests_total.inc(),
        lambda m: m.cache_hits_total.labels("x"),
        lambda m: m.cache_hits_total.inc(-1),
        lambda m: m.cache_hits_total.inc(math.inf),
        lambda m: m.cache_hits_total.inc(math.nan),
        lambda m: m.cache_bytes.set(math.nan),
        lambda m: m.cache_bytes.set(-math.inf),
        lambda m: m.cache_bytes.inc(math.nan),
        lambda m: m.request_latency_seconds.labels("get_object").observe(math.nan),
        lambda m: m.request_latency_seconds.labels("get_object").observe(math.inf),
        lambda m: m.request_latency_seconds.observe(1.0),
        lambda m: m.requests_total.labels("\udcff", "200"),
    ],
    ids=[
        "too-few-values",
        "too-many-values",
        "missing-name",
        "unknown-name",
        "mixed-forms",
        "labelled-without-labels",
        "unlabelled-with-labels",
        "negative-increment",
        "infinite-increment",
        "nan-increment",
        "nan-gauge",
        "infinite-gauge",
        "nan-gauge-change",
        "nan-observation",
        "infinite-observation",
        "observe-without-labels",
        "lone-surrogate",
    ],
)
def test_recording_rejects(metrics: Metrics, call: object) -> None:
    """Invalid label values or amounts raise ValueError and record nothing."""
    with pytest.raises(ValueError):
        call(metrics)  # type: ignore[operator]
    assert metrics.buffer.series_count() == 0


def test_error_names_metric(metrics: Metrics) -> None:
    """The error message names the family and the expected labels."""
    with pytest.raises(ValueError, match=r"s3proxy_requests_total.*\['operation', 'code'\]"):
        metrics.requests_total.labels("get_object")


def test_extra_family(metrics: Metrics) -> None:
    """Extra definitions are reachable by name."""
    extra = MetricDefinition("demo_total", "counter", "Demo.", ("a",))
    metrics = Metrics(DeltaBuffer(), extra=[extra])
    metrics.family("demo_total").labels("x").inc()  # type: ignore[union-attr]
    assert metrics.buffer.counters[("demo_total", ("x",))] == 1


def test_duplicate_extra_rejected() -> None:
    """An extra definition that reuses an application name is rejected."""
    duplicate = MetricDefinition("s3proxy_cache_hits_total", "counter", "Again.")
    with pytest.raises(ValueError, match="defined twice"):
        Metrics(DeltaBuffer(), extra=[duplicate])
