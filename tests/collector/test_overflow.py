"""Tests for the series cap of the delta buffer and its overflow series."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from collector.buffer import OVERFLOW_FAMILY, OVERFLOW_LABEL, DeltaBuffer
from collector.flusher import Flusher
from collector.metrics import Metrics
from collector.store import RedisStore
from tests.support.collector import run_now

REQUESTS = "s3proxy_requests_total"
LATENCY = "s3proxy_request_latency_seconds"


def _metrics(cap: int) -> Metrics:
    return Metrics(DeltaBuffer(max_series=cap))


def test_under_cap_keeps_labels() -> None:
    """Below the cap every series keeps its own labels."""
    metrics = _metrics(2)
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.requests_total.labels("put_object", "200").inc()
    assert metrics.buffer.counters == {
        (REQUESTS, ("get_object", "200")): 1.0,
        (REQUESTS, ("put_object", "200")): 1.0,
    }


def test_new_series_over_cap_merged() -> None:
    """A new series beyond the cap goes to the family's overflow series."""
    metrics = _metrics(1)
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.requests_total.labels("put_object", "200").inc(2)
    metrics.requests_total.labels("head_object", "404").inc(3)
    counters = metrics.buffer.counters
    assert counters[(REQUESTS, (OVERFLOW_LABEL, OVERFLOW_LABEL))] == 5.0
    assert counters[(OVERFLOW_FAMILY, (REQUESTS,))] == 2.0
    assert (REQUESTS, ("put_object", "200")) not in counters


def test_overflow_keeps_family_total() -> None:
    """The sum over a family's series equals everything recorded, overflow or not."""
    metrics = _metrics(3)
    for index in range(50):
        metrics.requests_total.labels(f"op{index % 10}", "200").inc()
    total = sum(
        value for (name, _), value in metrics.buffer.counters.items() if name == REQUESTS
    )
    assert total == 50.0


def test_known_series_still_counted() -> None:
    """A series already in the buffer keeps counting under its labels when full."""
    metrics = _metrics(1)
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.requests_total.labels("put_object", "200").inc()
    metrics.requests_total.labels("get_object", "200").inc()
    assert metrics.buffer.counters[(REQUESTS, ("get_object", "200"))] == 2.0


def test_swap_frees_cap() -> None:
    """After a swap new series get their own labels again."""
    metrics = _metrics(1)
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.buffer.swap("w", 1, 0.0)
    metrics.requests_total.labels("put_object", "200").inc()
    assert metrics.buffer.counters == {(REQUESTS, ("put_object", "200")): 1.0}


def test_histogram_overflow() -> None:
    """Histogram observations of new series beyond the cap go to the overflow series."""
    metrics = _metrics(1)
    metrics.request_latency_seconds.labels("get_object").observe(0.1)
    metrics.request_latency_seconds.labels("put_object").observe(0.2)
    metrics.request_latency_seconds.labels("head_object").observe(0.3)
    overflow = metrics.buffer.histograms[(LATENCY, (OVERFLOW_LABEL,))]
    assert overflow.count == 2
    assert overflow.sum == pytest.approx(0.5)
    assert metrics.buffer.counters[(OVERFLOW_FAMILY, (LATENCY,))] == 2.0


def test_unlabelled_family_admitted() -> None:
    """A family without labels is counted under its one series even when full."""
    metrics = _metrics(1)
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.cache_hits_total.inc()
    assert metrics.buffer.counters[("s3proxy_cache_hits_total", ())] == 1.0
    assert (OVERFLOW_FAMILY, ("s3proxy_cache_hits_total",)) not in metrics.buffer.counters


def test_buffer_size_bounded() -> None:
    """However many distinct series are recorded, the buffer stays near the cap."""
    metrics = _metrics(10)
    for index in range(1000):
        metrics.requests_total.labels(f"op{index}", "200").inc()
        metrics.request_latency_seconds.labels(f"op{index}").observe(0.01)
    assert metrics.buffer.delta_count() <= 10 + 2 * 2


def test_invalid_cap() -> None:
    """A cap below 1 is rejected."""
    with pytest.raises(ValueError):
        DeltaBuffer(max_series=0)


def test_outage_overflow_written_once(redis_store: RedisStore, clock: Clock) -> None:
    """Deltas kept through an outage, overflow included, reach Redis exactly once."""
    from tests.collector.test_flusher import FlakyStore

    store = FlakyStore(redis_store)
    metrics = _metrics(5)
    flusher = Flusher(store, metrics, "host:1:aa", clock, run_now, interval=1.0)
    flusher.startService()
    store.fail_before = 10
    for second in range(10):
        for index in range(20):
            metrics.requests_total.labels(f"op{index}", str(second)).inc()
        clock.advance(1)
    store.fail_after = 1  # the first write after the outage loses its reply
    clock.advance(1)
    clock.advance(1)
    flusher.stopService()

    requests = redis_store.read([REQUESTS]).families[REQUESTS]
    overflow = redis_store.read([OVERFLOW_FAMILY]).families[OVERFLOW_FAMILY]
    assert sum(float(value) for value in requests.values()) == 200.0
    assert sum(float(value) for value in overflow.values()) > 0
    assert len(requests) <= 2 * 5 + 2
