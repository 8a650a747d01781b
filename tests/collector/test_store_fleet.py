"""Tests for what the store keeps per writer across restarts (fakeredis with Lua)."""

from __future__ import annotations

import fakeredis
import pytest

from collector.buffer import Batch, DeltaBuffer
from collector.metrics import Metrics
from collector.store import RedisStore, open_redis


def _batch(sequence: int, writer: str, retire: bool = False) -> Batch:
    metrics = Metrics(DeltaBuffer())
    metrics.requests_total.labels("get_object", "200").inc()
    metrics.backend_state.labels("primary").set(1)
    return metrics.buffer.swap(writer, sequence, 50.0, retire)


def test_retire_drops_sequence_record() -> None:
    """A clean stop removes the writer's sequence record along with its heartbeat."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    store = RedisStore(client, namespace="t")
    store.apply(_batch(1, "host:1:aa"), now=60.0)
    store.apply(_batch(2, "host:1:aa", retire=True), now=61.0)

    assert client.hlen(store.sequence_key) == 0
    assert client.zcard(store.sequence_seen_key) == 0
    assert client.zcard(store.heartbeat_key) == 0


def test_restarts_do_not_grow_keys() -> None:
    """Writers that each start, write and stop cleanly leave no per-writer entries."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    store = RedisStore(client, namespace="t")
    for number in range(20):
        writer = f"host:{number}:aa"
        store.apply(_batch(1, writer), now=60.0 + number)
        store.apply(_batch(2, writer, retire=True), now=60.5 + number)

    assert client.hlen(store.sequence_key) == 0
    assert client.zcard(store.heartbeat_key) == 0
    assert client.hlen(store.family_key("s3proxy_backend_state")) == 0
    assert float(client.hget(store.family_key("s3proxy_requests_total"),
                             '["get_object","200"]')) == 40.0


def test_wait_replicas_cluster_rejected() -> None:
    """wait_replicas cannot be combined with a cluster client."""
    with pytest.raises(ValueError):
        RedisStore(open_redis("redis+cluster://127.0.0.1:1"), wait_replicas=1)
