"""Tests for the Redis store (on fakeredis with Lua) and the embedded store."""

from __future__ import annotations

import pytest
import redis

from collector.buffer import Batch, DeltaBuffer
from collector.definitions import APPLICATION_METRICS, MetricDefinition
from collector.metrics import Metrics
from collector.store import (
    EmbeddedStore,
    MetricStore,
    RedisStore,
    SchemaConflictError,
    encode_field,
    open_redis,
    redact_url,
)


@pytest.fixture(params=["redis", "embedded"])
def store(request: pytest.FixtureRequest, redis_store: RedisStore) -> MetricStore:
    """Each store implementation in turn."""
    if request.param == "redis":
        return redis_store
    return EmbeddedStore()


def _batch(sequence: int, writer: str = "host:1:aa", retire: bool = False) -> Batch:
    metrics = Metrics(DeltaBuffer())
    metrics.requests_total.labels("get_object", "200").inc(2)
    metrics.request_latency_seconds.labels("get_object").observe(0.3)
    metrics.backend_state.labels("primary").set(1)
    return metrics.buffer.swap(writer, sequence, 50.0, retire)


def _family(store: MetricStore, name: str) -> dict[str, str]:
    return store.read([name]).families.get(name, {})


def test_apply_writes_deltas(store: MetricStore) -> None:
    """A batch adds its counter, histogram and gauge values."""
    result = store.apply(_batch(1), now=60.0)

    assert result.applied
    requests = _family(store, "s3proxy_requests_total")
    assert float(requests[encode_field(["get_object", "200"])]) == 2
    latency = _family(store, "s3proxy_request_latency_seconds")
    assert latency[encode_field(["get_object", 7])] == "1"
    assert latency[encode_field(["get_object", "count"])] == "1"
    assert float(latency[encode_field(["get_object", "sum"])]) == 0.3
    state = _family(store, "s3proxy_backend_state")
    assert state[encode_field(["host:1:aa", "primary"])] == "1.0 50.0"


def test_apply_reports_missing_metadata(store: MetricStore) -> None:
    """apply() reports whether any definitions are stored."""
    before = store.apply(_batch(1), now=60.0)
    store.register(APPLICATION_METRICS)
    after = store.apply(_batch(2), now=61.0)

    assert before.metadata_missing
    assert not after.metadata_missing


def test_replayed_batch_applied_once(store: MetricStore) -> None:
    """Sending the same (writer, sequence) twice applies it once."""
    batch = _batch(1)
    store.apply(batch, now=60.0)
    second = store.apply(batch, now=61.0)

    assert not second.applied
    requests = _family(store, "s3proxy_requests_total")
    assert float(requests[encode_field(["get_object", "200"])]) == 2


def test_older_sequence_ignored(store: MetricStore) -> None:
    """A batch older than the last applied one of its writer is ignored."""
    store.apply(_batch(5), now=60.0)
    assert not store.apply(_batch(4), now=61.0).applied


def test_writers_independent(store: MetricStore) -> None:
    """Sequences are per writer: two writers' batch 1 both apply."""
    store.apply(_batch(1, writer="a:1:x"), now=60.0)
    store.apply(_batch(1, writer="b:2:y"), now=60.0)

    requests = _family(store, "s3proxy_requests_total")
    assert float(requests[encode_field(["get_object", "200"])]) == 4


def test_heartbeat_written(store: MetricStore) -> None:
    """Every apply, even a replay, records the writer's heartbeat at ``now``."""
    batch = _batch(1)
    store.apply(batch, now=60.0)
    store.apply(batch, now=70.0)
    assert store.read([]).heartbeats == {"host:1:aa": 70.0}


def test_retire_removes_gauges(store: MetricStore) -> None:
    """A retiring batch removes the writer's gauges and heartbeat but keeps counters."""
    store.apply(_batch(1), now=60.0)
    store.apply(_batch(2, retire=True), now=61.0)

    snapshot = store.read(["s3proxy_backend_state", "s3proxy_requests_total"])
    assert "s3proxy_backend_state" not in snapshot.families
    assert snapshot.heartbeats == {}
    requests = snapshot.families["s3proxy_requests_total"]
    assert float(requests[encode_field(["get_object", "200"])]) == 4


def test_register_conflict(store: MetricStore) -> None:
    """A definition that differs from the stored one raises with both schemas."""
    store.register(APPLICATION_METRICS)
    changed = MetricDefinition("s3proxy_requests_total", "counter", "Other.", ("operation",))

    with pytest.raises(SchemaConflictError) as caught:
        store.register([changed])
    message = str(caught.value)
    assert '"labels":["operation","code"]' in message
    assert '"labels":["operation"]' in message


def test_register_conflict_stores_nothing(store: MetricStore) -> None:
    """A conflicting registration does not store its other definitions either."""
    store.register([MetricDefinition("a_total", "counter", "A.")])
    new = MetricDefinition("b_total", "counter", "B.")
    changed = MetricDefinition("a_total", "counter", "A.", ("x",))

    with pytest.raises(SchemaConflictError):
        store.register([new, changed])
    assert "b_total" not in store.read([]).schemas


def test_register_updates_help(store: MetricStore) -> None:
    """Registering the same schema with new help text replaces the help."""
    store.register([MetricDefinition("a_total", "counter", "Old.")])
    store.register([MetricDefinition("a_total", "counter", "New.")])
    assert store.read([]).help["a_total"] == "New."


def test_prune_stale_writer(store: MetricStore) -> None:
    """Prune removes a stale writer's heartbeat and the gauge fields given."""
    store.apply(_batch(1), now=60.0)
    gauge_field = encode_field(["host:1:aa", "primary"])

    removed = store.prune({"host:1:aa": [("s3proxy_backend_state", gauge_field)]}, 100.0, 0.0)

    assert removed == 1
    snapshot = store.read(["s3proxy_backend_state"])
    assert snapshot.heartbeats == {}
    assert "s3proxy_backend_state" not in snapshot.families


def test_prune_spares_fresh_writer(store: MetricStore) -> None:
    """A writer whose heartbeat became fresh again before the prune keeps its gauges."""
    store.apply(_batch(1), now=60.0)
    gauge_field = encode_field(["host:1:aa", "primary"])

    removed = store.prune({"host:1:aa": [("s3proxy_backend_state", gauge_field)]}, 50.0, 0.0)

    assert removed == 0
    assert gauge_field in _family(store, "s3proxy_backend_state")


def test_prune_keeps_recent_sequence(store: MetricStore) -> None:
    """Sequence records younger than the retention survive a prune, so replays stay ignored."""
    batch = _batch(1)
    store.apply(batch, now=60.0)
    store.prune({"host:1:aa": []}, 100.0, 0.0)
    assert not store.apply(batch, now=200.0).applied


def test_prune_drops_old_sequence(store: MetricStore) -> None:
    """Sequence records older than the retention are removed by a prune."""
    batch = _batch(1)
    store.apply(batch, now=60.0)
    store.prune({"host:1:aa": []}, 100.0, 100.0)
    assert store.apply(batch, now=200.0).applied


def test_malformed_field_does_not_block(redis_store: RedisStore) -> None:
    """An increment of a field holding text fails alone; the rest of the batch applies."""
    key = redis_store.family_key("s3proxy_requests_total")
    redis_store.client.hset(key, encode_field(["get_object", "200"]), "garbage")

    result = redis_store.apply(_batch(1), now=60.0)

    assert result.applied
    assert result.failed_operations == 1
    assert "s3proxy_request_latency_seconds" in redis_store.read(
        ["s3proxy_request_latency_seconds"]
    ).families


def test_keys_share_hash_tag(redis_store: RedisStore) -> None:
    """Every key the store writes starts with the {namespace} hash tag."""
    redis_store.register(APPLICATION_METRICS)
    redis_store.apply(_batch(1), now=60.0)
    keys = [key.decode() for key in redis_store.client.keys("*")]
    assert keys
    assert all(key.startswith("{test}:") for key in keys)


def test_non_ascii_field_round_trip(store: MetricStore) -> None:
    """Label values with quotes, backslashes, newlines and non-ASCII come back exactly."""
    value = 'a"b\\c\nd é 漢'
    metrics = Metrics(DeltaBuffer())
    metrics.requests_total.labels(value, "200").inc()
    store.apply(metrics.buffer.swap("w:1:a", 1, 1.0), now=1.0)

    requests = _family(store, "s3proxy_requests_total")
    assert list(requests) == [encode_field([value, "200"])]


def test_invalid_namespace(fake_redis: redis.Redis) -> None:
    """A namespace with braces is rejected because it would break the hash tag."""
    with pytest.raises(ValueError, match="namespace"):
        RedisStore(fake_redis, namespace="a}b")


def test_redact_url() -> None:
    """redact_url hides the password and keeps the rest."""
    assert redact_url("redis://user:s3cret@host:6379/2") == "redis://user:***@host:6379/2"


@pytest.mark.parametrize(
    "url",
    ["http://user:s3cret@host/0", "redis://user:s3cret@host:notaport/0", "redis://:s3cret@h/x"],
)
def test_open_redis_rejects(url: str) -> None:
    """An invalid URL raises ValueError that shows the URL without its password."""
    with pytest.raises(ValueError) as caught:
        open_redis(url)
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://u:p@127.0.0.1:6380/1", "unix:///tmp/redis.sock?db=2"],
)
def test_open_redis_accepts(url: str) -> None:
    """redis://, rediss:// and unix:// URLs build a client without connecting."""
    assert isinstance(open_redis(url), redis.Redis)
