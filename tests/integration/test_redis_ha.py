"""The fleet on Redis Sentinel (with a failover during writes) and on Redis Cluster.

Every Redis node, the Sentinel, moto with the SigV4 front, the proxies and the exporter run
as real processes on loopback ports started by the test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.buffer import DeltaBuffer
from collector.metrics import Metrics
from collector.store import RedisStore, ReplicationError
from tests.support.fleet import Fleet, LoadClient, latency_counts, latency_report, request_totals
from tests.support.proxy_process import BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY
from tests.support.redis_ha import ClusterDeployment, SentinelDeployment
from tests.support.servers import MotoServer, RedisServer
from tests.support.sigv4_front import SigV4Front, start_front

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_PROXY = 150


@pytest.fixture
def front(s3_server: MotoServer) -> Iterator[SigV4Front]:
    """The SigV4-verifying front before moto, with the proxies' backend credential."""
    started = start_front(s3_server.endpoint, BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelDeployment]:
    """A primary, a replica and a Sentinel monitoring them."""
    deployment = SentinelDeployment(tmp_path).start()
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterDeployment]:
    """Three cluster primaries covering every slot."""
    deployment = ClusterDeployment(tmp_path).start()
    try:
        yield deployment
    finally:
        deployment.stop()


def _per_operation(calls: dict[tuple[str, str], int]) -> dict[str, float]:
    result: dict[str, float] = {}
    for (operation, _), count in calls.items():
        result[operation] = result.get(operation, 0.0) + count
    return result


def test_sentinel_failover_totals(
    tmp_path: Path, sentinel: SentinelDeployment, front: SigV4Front
) -> None:
    """With wait_replicas = 1, a Sentinel failover during writes leaves the totals exact."""
    fleet = Fleet(tmp_path, sentinel.url, front.endpoint, count=2,
                  metrics={"wait_replicas": 1}).start()
    try:
        load = LoadClient([proxy.endpoint for proxy in fleet.proxies], "ha-sentinel",
                          PER_PROXY, pause=0.05)
        load.create_bucket()
        started = time.monotonic()
        load.start()
        time.sleep(2.0)
        old_primary = sentinel.primary_port()
        failover = time.monotonic()
        new_primary = sentinel.failover()
        done = time.monotonic()
        load.join()
        print(latency_report(load.latencies, {
            "before": (started, failover), "failover": (failover, done),
            "after": (done, time.monotonic()),
        }))

        expected = dict(load.calls)
        samples = fleet.exporter.wait_for_totals(expected)
    finally:
        fleet.stop()

    assert new_primary != old_primary
    assert not load.errors
    assert request_totals(samples) == {key: float(value) for key, value in expected.items()}
    assert latency_counts(samples) == _per_operation(expected)


def test_cluster_totals(tmp_path: Path, cluster: ClusterDeployment, front: SigV4Front) -> None:
    """On a three-node cluster every key sits on one node and the totals are exact."""
    fleet = Fleet(tmp_path, cluster.url, front.endpoint, count=2).start()
    try:
        load = LoadClient([proxy.endpoint for proxy in fleet.proxies], "ha-cluster", PER_PROXY)
        load.create_bucket()
        load.run()
        expected = dict(load.calls)
        samples = fleet.exporter.wait_for_totals(expected)
    finally:
        fleet.stop()

    slot = cluster.nodes[0].client().execute_command("CLUSTER", "KEYSLOT", "{s3proxy}")
    owner = cluster.node_for_slot(int(slot))
    others = [node for node in cluster.nodes if node is not owner]
    assert not load.errors
    assert request_totals(samples) == {key: float(value) for key, value in expected.items()}
    assert latency_counts(samples) == _per_operation(expected)
    assert owner.client().keys("{s3proxy}:family:*")
    assert all(node.client().dbsize() == 0 for node in others)


def test_wait_replicas_unacknowledged(redis_server: RedisServer) -> None:
    """Without the required replicas apply raises, and a resend is applied only once."""
    client = redis_server.client()
    store = RedisStore(client, namespace="wait", wait_replicas=1, wait_timeout=0.05)
    metrics = Metrics(DeltaBuffer())
    metrics.requests_total.labels("get_object", "200").inc()
    batch = metrics.buffer.swap("host:1:aa", 1, 50.0)
    with pytest.raises(ReplicationError):
        store.apply(batch, now=60.0)
    with pytest.raises(ReplicationError):
        store.apply(batch, now=61.0)

    total = client.hget(store.family_key("s3proxy_requests_total"), '["get_object","200"]')
    assert float(total) == 1.0
