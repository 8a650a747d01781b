"""Tests for RedisCollector: families from the store, gauge TTL, malformed fields."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from collector.buffer import DeltaBuffer
from collector.collector import RedisCollector
from collector.definitions import MetricDefinition
from collector.metrics import Metrics
from collector.store import EmbeddedStore, MetricStore, RedisStore, encode_field
from tests.support.collector import sample_value, samples

WRITER_A = "host:1:aa"
WRITER_B = "host:2:bb"


def _writer(store: MetricStore, writer: str, now: float, record: object, sequence: int = 1,
            extra: tuple[MetricDefinition, ...] = ()) -> Metrics:
    metrics = Metrics(DeltaBuffer(), extra=extra)
    store.register(metrics.definitions)
    record(metrics)  # type: ignore[operator]
    store.apply(metrics.buffer.swap(writer, sequence, now), now)
    return metrics


def _registry(collector: RedisCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


@pytest.fixture
def exporter(redis_store: RedisStore, clock: Clock) -> CollectorRegistry:
    """A registry with a collector given no definitions, like the standalone exporter."""
    return _registry(RedisCollector(redis_store, clock, gauge_ttl=15))


def test_counter_summed_across_writers(redis_store: RedisStore, exporter: CollectorRegistry,
                                       clock: Clock) -> None:
    """Counters of several writers add up into one series."""
    def record(amount: int) -> object:
        return lambda m: m.requests_total.labels("get_object", "200").inc(amount)

    _writer(redis_store, WRITER_A, 1000, record(3))
    _writer(redis_store, WRITER_B, 1000, record(4))

    value = sample_value(exporter, "s3proxy_requests_total",
                         {"operation": "get_object", "code": "200"})
    assert value == 7


def test_histogram_cumulative(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """Stored per-bucket counts are shown cumulative, with count equal to the +Inf bucket."""
    def record(metrics: Metrics) -> None:
        child = metrics.request_latency_seconds.labels("get_object")
        for value in (0.001, 0.3, 0.3, 20.0):
            child.observe(value)

    _writer(redis_store, WRITER_A, 1000, record)
    labels = {"operation": "get_object"}

    def bucket(le: str) -> float | None:
        name = "s3proxy_request_latency_seconds_bucket"
        return sample_value(exporter, name, {**labels, "le": le})

    assert bucket("0.005") == 1
    assert bucket("0.25") == 1
    assert bucket("0.5") == 3
    assert bucket("10.0") == 3
    assert bucket("+Inf") == 4
    assert sample_value(exporter, "s3proxy_request_latency_seconds_count", labels) == 4
    total = sample_value(exporter, "s3proxy_request_latency_seconds_sum", labels)
    assert total == pytest.approx(20.601)


def test_gauge_per_writer(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """A per-writer gauge has one series per live writer, with a proxy label."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.backend_state.labels("b1").set(1))
    _writer(redis_store, WRITER_B, 1000, lambda m: m.backend_state.labels("b1").set(0.5))

    found = sorted(samples(exporter, "s3proxy_backend_state"), key=lambda s: s[0]["proxy"])
    assert found == [
        ({"backend_id": "b1", "proxy": WRITER_A}, 1.0),
        ({"backend_id": "b1", "proxy": WRITER_B}, 0.5),
    ]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("sum", 5.0), ("min", 2.0), ("max", 3.0), ("mostrecent", 2.0)],
)
def test_gauge_modes(redis_store: RedisStore, exporter: CollectorRegistry, mode: str,
                     expected: float) -> None:
    """Gauge modes combine the live writers' values; mostrecent takes the latest set."""
    definition = MetricDefinition("demo_queue", "gauge", "Demo.", gauge_mode=mode)  # type: ignore[arg-type]
    extra = (definition,)
    _writer(redis_store, WRITER_A, 999, lambda m: m.family("demo_queue").set(3), extra=extra)
    _writer(redis_store, WRITER_B, 1000, lambda m: m.family("demo_queue").set(2), extra=extra)

    assert samples(exporter, "demo_queue") == [({}, expected)]


def test_mostrecent_uses_set_time(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """mostrecent takes the value set last, not the one flushed last."""
    definition = MetricDefinition("demo_leader", "gauge", "Demo.", gauge_mode="mostrecent")
    for writer, set_at, value, cut_at in ((WRITER_A, 1005.0, 7, 1006.0),
                                          (WRITER_B, 1001.0, 9, 1009.0)):
        metrics = Metrics(DeltaBuffer(clock=lambda set_at=set_at: set_at), extra=(definition,))
        redis_store.register(metrics.definitions)
        metrics.family("demo_leader").set(value)  # type: ignore[union-attr]
        redis_store.apply(metrics.buffer.swap(writer, 1, cut_at), cut_at)

    assert samples(exporter, "demo_leader") == [({}, 7.0)]


def test_gauge_ttl_expiry(redis_store: RedisStore, exporter: CollectorRegistry,
                          clock: Clock) -> None:
    """Gauges of a writer silent for longer than the TTL disappear and are pruned."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.backend_state.labels("b1").set(1))
    _writer(redis_store, WRITER_B, 1010, lambda m: m.backend_state.labels("b1").set(1))
    clock.advance(20)  # now 1020: A is 20 s old, B 10 s.

    found = samples(exporter, "s3proxy_backend_state")
    assert [labels["proxy"] for labels, _ in found] == [WRITER_B]
    snapshot = redis_store.read(["s3proxy_backend_state"])
    assert list(snapshot.heartbeats) == [WRITER_B]
    assert list(snapshot.families["s3proxy_backend_state"]) == [encode_field([WRITER_B, "b1"])]


def test_prune_failure_logged_rarely(redis_store: RedisStore, clock: Clock) -> None:
    """A failing prune hides stale gauges anyway and logs once per error_log_interval."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.backend_state.labels("b1").set(1))
    clock.advance(20)

    def refuse(*args: object) -> int:
        raise redis.ResponseError("NOPERM this user has no permissions to run 'evalsha'")

    redis_store.prune = refuse  # type: ignore[method-assign]
    registry = _registry(RedisCollector(redis_store, clock, gauge_ttl=15, error_log_interval=60))
    with capturedLogs() as events:
        for _ in range(3):
            assert samples(registry, "s3proxy_backend_state") == []
            clock.advance(10)
    warnings = [event for event in events if "Could not remove" in event["log_format"]]
    assert len(warnings) == 1
    assert "NOPERM" in warnings[0]["error"]


def test_counters_survive_ttl(redis_store: RedisStore, exporter: CollectorRegistry,
                              clock: Clock) -> None:
    """Counters of a dead writer stay: they are fleet totals."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.cache_hits_total.inc(2))
    clock.advance(100)
    assert sample_value(exporter, "s3proxy_cache_hits_total") == 2


def test_proxies_and_last_seen(redis_store: RedisStore, exporter: CollectorRegistry,
                               clock: Clock) -> None:
    """s3proxy_proxies counts live writers; last seen shows each heartbeat."""
    _writer(redis_store, WRITER_A, 990, lambda m: None)
    _writer(redis_store, WRITER_B, 1000, lambda m: None)
    clock.advance(10)  # now 1010: A is 20 s old.

    assert sample_value(exporter, "s3proxy_proxies") == 1
    last_seen = sample_value(exporter, "s3proxy_proxy_last_seen_timestamp_seconds",
                             {"proxy": WRITER_B})
    assert last_seen == 1000


@pytest.mark.parametrize(
    ("family", "field", "value"),
    [
        ("s3proxy_requests_total", "not json", "1"),
        ("s3proxy_requests_total", encode_field(["only-one"]), "1"),
        ("s3proxy_requests_total", encode_field(["a", "b"]), "many"),
        ("s3proxy_requests_total", encode_field(["a", "b"]), "nan"),
        ("s3proxy_requests_total", encode_field(["a", "b"]), "-1"),
        ("s3proxy_requests_total", encode_field(["a", 2]), "1"),
        ("s3proxy_request_latency_seconds", encode_field(["a", 99]), "1"),
        ("s3proxy_request_latency_seconds", encode_field(["a", "sum"]), "x"),
        ("s3proxy_backend_state", encode_field([WRITER_A, "b1"]), "1"),
        ("s3proxy_backend_state", encode_field([WRITER_A]), "1 1000"),
    ],
    ids=[
        "not-json",
        "label-count",
        "not-a-number",
        "nan-counter",
        "negative-counter",
        "non-string-label",
        "bucket-index",
        "bad-sum",
        "gauge-without-timestamp",
        "gauge-label-count",
    ],
)
def test_malformed_field_skipped(redis_store: RedisStore, exporter: CollectorRegistry,
                                 family: str, field: str, value: str) -> None:
    """A malformed field is skipped and counted; the other series are still shown."""
    _writer(redis_store, WRITER_A, 1000, lambda m: (
        m.requests_total.labels("get_object", "200").inc(),
        m.request_latency_seconds.labels("get_object").observe(1),
        m.backend_state.labels("b2").set(1),
    ))
    redis_store.client.hset(redis_store.family_key(family), field, value)

    assert sample_value(exporter, "s3proxy_collector_malformed_fields", {"family": family}) == 1
    assert sample_value(exporter, "s3proxy_requests_total",
                        {"operation": "get_object", "code": "200"}) == 1
    assert sample_value(exporter, "s3proxy_request_latency_seconds_count",
                        {"operation": "get_object"}) == 1
    state = {"backend_id": "b2", "proxy": WRITER_A}
    assert sample_value(exporter, "s3proxy_backend_state", state) == 1


def test_malformed_definition_skipped(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """A stored definition that cannot be parsed skips that family only."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.cache_hits_total.inc())
    redis_store.client.hset(redis_store.meta_key, "broken_total", "{")

    assert sample_value(exporter, "s3proxy_collector_malformed_fields",
                        {"family": "broken_total"}) == 1
    assert sample_value(exporter, "s3proxy_cache_hits_total") == 1


def test_non_utf8_field_skipped(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """A field that is not UTF-8 is skipped and counted."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.cache_hits_total.inc())
    redis_store.client.hset(redis_store.family_key("s3proxy_cache_hits_total"), b"\xff", "1")

    assert sample_value(exporter, "s3proxy_collector_malformed_fields",
                        {"family": "s3proxy_cache_hits_total"}) == 1


def test_wrong_type_key_skipped(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """A family key that is not a hash skips that family only and is counted."""
    _writer(redis_store, WRITER_A, 1000, lambda m: (
        m.cache_hits_total.inc(),
        m.cache_misses_total.inc(),
    ))
    generate_latest(exporter)  # the first scrape discovers the families
    key = redis_store.family_key("s3proxy_cache_misses_total")
    redis_store.client.delete(key)
    redis_store.client.set(key, "not a hash")

    assert sample_value(exporter, "s3proxy_redis_up") == 1
    assert sample_value(exporter, "s3proxy_collector_malformed_fields",
                        {"family": "s3proxy_cache_misses_total"}) == 1
    assert sample_value(exporter, "s3proxy_cache_hits_total") == 1


LABEL_VALUES = ['quote"d', "back\\slash", "new\nline", "é漢🙂", 'all"\\\n三']


@pytest.mark.parametrize("value", LABEL_VALUES)
def test_label_round_trip_text(redis_store: RedisStore, exporter: CollectorRegistry,
                               value: str) -> None:
    """Awkward label values come back exactly through text exposition and its parser."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.requests_total.labels(value, "200").inc())
    text = generate_latest(exporter).decode("utf-8")
    found = [
        sample.labels["operation"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "s3proxy_requests_total"
    ]
    assert found == [value]


@pytest.mark.parametrize("value", LABEL_VALUES)
def test_label_round_trip_openmetrics(redis_store: RedisStore, exporter: CollectorRegistry,
                                      value: str) -> None:
    """Awkward label values come back exactly through OpenMetrics and its parser."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.backend_state.labels(value).set(1))
    text = generate_openmetrics(exporter).decode("utf-8")
    found = [
        sample.labels["backend_id"]
        for family in parse_openmetrics(text)
        for sample in family.samples
        if sample.name == "s3proxy_backend_state"
    ]
    assert found == [value]


def test_redis_down(clock: Clock) -> None:
    """When Redis cannot be reached, only self-metrics are shown with s3proxy_redis_up 0."""
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=None)
    registry = _registry(RedisCollector(RedisStore(client), clock))

    text = generate_latest(registry).decode("utf-8")
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert found[("s3proxy_redis_up", ())] == 0
    assert found[("s3proxy_scrape_errors_total", (("cause", "redis"),))] == 1
    assert not any(name.startswith("s3proxy_requests") for name, _ in found)


def test_redis_up(redis_store: RedisStore, exporter: CollectorRegistry) -> None:
    """A reachable store gives s3proxy_redis_up 1 and zero scrape errors by cause."""
    assert sample_value(exporter, "s3proxy_redis_up") == 1
    assert sample_value(exporter, "s3proxy_scrape_errors_total", {"cause": "redis"}) == 0
    assert sample_value(exporter, "s3proxy_scrape_errors_total", {"cause": "timeout"}) == 0


class CountingStore:
    """Wraps a store and records the names requested by each read."""

    def __init__(self, inner: MetricStore) -> None:
        self.inner = inner
        self.reads: list[list[str]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def read(self, names: list[str]) -> object:
        self.reads.append(list(names))
        return self.inner.read(names)


def test_describe_reads_nothing(redis_store: RedisStore, clock: Clock) -> None:
    """Registering a collector with definitions calls describe() and never reads the store."""
    counting = CountingStore(redis_store)
    collector = RedisCollector(counting, clock, definitions=Metrics(DeltaBuffer()).definitions)  # type: ignore[arg-type]
    _registry(collector)
    assert counting.reads == []


def test_one_read_per_scrape(redis_store: RedisStore, clock: Clock) -> None:
    """After the first scrape found the families, each scrape is one read of all of them."""
    _writer(redis_store, WRITER_A, 1000, lambda m: m.cache_hits_total.inc())
    counting = CountingStore(redis_store)
    registry = _registry(RedisCollector(counting, clock))  # type: ignore[arg-type]

    generate_latest(registry)
    first = len(counting.reads)
    generate_latest(registry)

    assert first == 2
    assert len(counting.reads) == 3
    assert "s3proxy_cache_hits_total" in counting.reads[-1]


def test_embedded_store_collects(clock: Clock) -> None:
    """The embedded store renders the same families as Redis."""
    store = EmbeddedStore()
    _writer(store, WRITER_A, 1000, lambda m: m.cache_misses_total.inc(3))
    registry = _registry(RedisCollector(store, clock))
    assert sample_value(registry, "s3proxy_cache_misses_total") == 3


def test_invalid_ttl(redis_store: RedisStore, clock: Clock) -> None:
    """A gauge TTL that is not > 0 is rejected."""
    with pytest.raises(ValueError, match="TTL"):
        RedisCollector(redis_store, clock, gauge_ttl=0)
