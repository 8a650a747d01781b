"""The object cache end to end: twistd s3proxy, moto behind a counting relay, real Redis."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.support.cache import (
    CHANNEL,
    CacheProxy,
    cache_samples,
    counter,
    wait_for_counters,
    wait_until,
)
from tests.support.relay import Relay
from tests.support.servers import MotoServer, RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def relay(s3_server: MotoServer) -> Iterator[Relay]:
    """A relay in front of moto that records every backend request line."""
    relay = Relay(s3_server.port).start()
    try:
        yield relay
    finally:
        relay.close()


@pytest.fixture
def start_proxy(
    tmp_path: Path, relay: Relay
) -> Iterator[Callable[..., CacheProxy]]:
    """Start cache-enabled proxies behind the relay; all are stopped at teardown."""
    started: list[CacheProxy] = []

    def start(redis_url: str | None, **options: Any) -> CacheProxy:
        proxy = CacheProxy(tmp_path / f"proxy-{len(started)}", relay.endpoint, redis_url,
                           **options)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture
def bucket(request: pytest.FixtureRequest, s3_server: MotoServer) -> str:
    """A bucket unique to the test, created directly on moto."""
    name = "cache-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    direct(s3_server).create_bucket(Bucket=name)
    return name


def direct(s3_server: MotoServer) -> Any:
    """A boto3 client that talks to moto itself, bypassing the proxy."""
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def read(client: Any, bucket: str, key: str, **kwargs: Any) -> bytes:
    body: bytes = client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()
    return body


def backend_gets(relay: Relay, bucket: str, key: str) -> int:
    return len(relay.requests_seen("GET", f"/{bucket}/{key}"))


def test_hit_miss_sequence(
    start_proxy: Callable[..., CacheProxy], relay: Relay, bucket: str, redis_server: RedisServer
) -> None:
    """A scripted sequence of GETs, a Range GET and an overwrite counts exact hits and misses."""
    proxy = start_proxy(redis_server.url)
    s3 = proxy.client()
    s3.put_object(Bucket=bucket, Key="obj", Body=b"version one")

    assert read(s3, bucket, "obj") == b"version one"  # miss
    assert read(s3, bucket, "obj") == b"version one"  # hit
    assert read(s3, bucket, "obj", Range="bytes=-3") == b"one"  # hit
    head = s3.head_object(Bucket=bucket, Key="obj")  # served from the entry, not counted
    assert head["ContentLength"] == 11
    s3.put_object(Bucket=bucket, Key="obj", Body=b"version two")
    assert read(s3, bucket, "obj") == b"version two"  # miss
    assert read(s3, bucket, "obj") == b"version two"  # hit

    hits, misses = wait_for_counters(proxy, hits=3, misses=2)
    assert hits == 3
    assert misses == 2
    assert backend_gets(relay, bucket, "obj") == 2


def test_range_unsatisfiable(
    start_proxy: Callable[..., CacheProxy], bucket: str
) -> None:
    """A Range beyond the end of a cached object gets 416 with Content-Range bytes */size."""
    proxy = start_proxy(None)
    s3 = proxy.client()
    s3.put_object(Bucket=bucket, Key="obj", Body=b"0123456789")
    read(s3, bucket, "obj")
    with pytest.raises(ClientError) as caught:
        s3.get_object(Bucket=bucket, Key="obj", Range="bytes=10-")
    response = caught.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 416
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-range"] == "bytes */10"
    hits, _misses = wait_for_counters(proxy, hits=1, misses=1)
    assert hits == 1


def test_fleet_overwrite_visible(
    start_proxy: Callable[..., CacheProxy], bucket: str, redis_server: RedisServer
) -> None:
    """An overwrite through proxy B is what proxy A returns right after B's response."""
    proxy_a, proxy_b = two_subscribed_proxies(start_proxy, redis_server)
    a, b = proxy_a.client(), proxy_b.client()
    a.put_object(Bucket=bucket, Key="obj", Body=b"old")
    assert read(a, bucket, "obj") == b"old"
    assert read(a, bucket, "obj") == b"old"

    for round_number in range(5):
        body = f"new {round_number}".encode()
        b.put_object(Bucket=bucket, Key="obj", Body=body)
        assert read(a, bucket, "obj") == body


UNCONFIRMED = "s3proxy_cache_invalidations_unconfirmed_total"
HITS = "s3proxy_cache_hits_total"


def put_count(proxy: CacheProxy) -> float:
    """Return the fleet-wide number of finished PutObject requests, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(proxy.scrape()):
        for sample in family.samples:
            if (
                sample.name == "s3proxy_requests_total"
                and sample.labels.get("operation") == "put_object"
            ):
                total += sample.value
    return total


def unconfirmed_after_puts(proxy: CacheProxy, puts: int) -> float:
    """
    Return the unconfirmed-invalidation count once ``puts`` PutObject requests are flushed.

    A write counts as unconfirmed before its response and as a request after it, and one flush
    writes both, so once the request count is complete the other count is too.
    """
    wait_until(lambda: put_count(proxy) >= puts, description=f"{puts} PutObject requests")
    return counter(proxy, UNCONFIRMED)


def two_subscribed_proxies(
    start_proxy: Callable[..., CacheProxy], redis_server: RedisServer
) -> tuple[CacheProxy, CacheProxy]:
    proxy_a = start_proxy(redis_server.url)
    proxy_b = start_proxy(redis_server.url)
    wait_until(lambda: redis_server.client().pubsub_numsub(CHANNEL)[0][1] == 2,
               description="both proxies to subscribe")
    return proxy_a, proxy_b


def test_read_after_write_across_proxies(
    start_proxy: Callable[..., CacheProxy], bucket: str, redis_server: RedisServer
) -> None:
    """
    Every GET through proxy A right after an overwrite through proxy B returns the new bytes.

    Without confirmations, a three-proxy run of such a loop saw about 1 old read in 1,000. So
    this loop catches that regression only now and then, and the stopped-proxy test below
    catches it every time.
    """
    proxy_a, proxy_b = two_subscribed_proxies(start_proxy, redis_server)
    a, b = proxy_a.client(), proxy_b.client()
    a.put_object(Bucket=bucket, Key="obj", Body=b"old")
    assert read(a, bucket, "obj") == b"old"

    rounds = 500
    stale = []
    for round_number in range(rounds):
        body = f"round {round_number}".encode()
        b.put_object(Bucket=bucket, Key="obj", Body=body)
        returned = read(a, bucket, "obj")
        if returned != body:
            stale.append((round_number, returned))
    assert stale == []
    assert unconfirmed_after_puts(proxy_b, rounds + 1) == 0


def test_stopped_proxy_holds_writes_back(
    start_proxy: Callable[..., CacheProxy], bucket: str, redis_server: RedisServer
) -> None:
    """
    A write waits for every caching proxy's eviction, for at most 1 s.

    Proxy A is stopped (SIGSTOP) while it caches the object. A write through B that A confirms
    after it resumes gets its response then, and counts as confirmed. A write while A stays
    stopped gets its response after the 1 s timeout and counts in the unconfirmed counter.
    """
    proxy_a, proxy_b = two_subscribed_proxies(start_proxy, redis_server)
    a, b = proxy_a.client(), proxy_b.client()
    a.put_object(Bucket=bucket, Key="obj", Body=b"old")
    assert read(a, bucket, "obj") == b"old"

    answered = threading.Event()
    os.kill(proxy_a.process.pid, signal.SIGSTOP)
    try:
        writer = threading.Thread(
            target=lambda: (b.put_object(Bucket=bucket, Key="obj", Body=b"new"), answered.set())
        )
        writer.start()
        assert not answered.wait(0.4), "the write was answered while proxy A was stopped"
    finally:
        os.kill(proxy_a.process.pid, signal.SIGCONT)
    writer.join(timeout=10)
    assert answered.is_set()
    assert read(a, bucket, "obj") == b"new"
    assert unconfirmed_after_puts(proxy_b, 2) == 0

    os.kill(proxy_a.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        b.put_object(Bucket=bucket, Key="obj", Body=b"newer")
        waited = time.monotonic() - started
    finally:
        os.kill(proxy_a.process.pid, signal.SIGCONT)
    assert waited >= 1.0
    assert unconfirmed_after_puts(proxy_b, 3) == 1
    wait_until(lambda: read(a, bucket, "obj") == b"newer", description="proxy A to catch up")


def test_partitioned_proxy_serves_no_old_bytes(
    start_proxy: Callable[..., CacheProxy],
    s3_server: MotoServer,
    bucket: str,
    redis_server: RedisServer,
) -> None:
    """
    A proxy cut off from Redis without noticing stops serving cached bytes within its lease.

    Proxy A reaches Redis through a relay that then stops copying bytes but keeps the
    connections open. Redis still counts A's subscription, and A still has the old object
    cached. A write through B waits 1 s for A and counts as unconfirmed. A GET through A right
    after returns the new bytes from the backend.
    """
    redis_relay = Relay(redis_server.port).start()
    try:
        proxy_a = start_proxy(f"redis://127.0.0.1:{redis_relay.port}/0")
        proxy_b = start_proxy(redis_server.url)
        wait_until(lambda: redis_server.client().pubsub_numsub(CHANNEL)[0][1] == 2,
                   description="both proxies to subscribe")
        a, b = proxy_a.client(), proxy_b.client()
        b.put_object(Bucket=bucket, Key="obj", Body=b"old")
        assert read(a, bucket, "obj") == b"old"
        wait_until(lambda: read(a, bucket, "obj") == b"old" and counter(proxy_a, HITS) >= 1,
                   description="proxy A to serve the object from its cache")

        redis_relay.hold()
        try:
            started = time.monotonic()
            b.put_object(Bucket=bucket, Key="obj", Body=b"new")
            waited = time.monotonic() - started
            assert read(a, bucket, "obj") == b"new"
        finally:
            redis_relay.release()
        assert waited >= 1.0
        assert unconfirmed_after_puts(proxy_b, 2) == 1
    finally:
        redis_relay.close()


def test_delete_objects_invalidates(
    start_proxy: Callable[..., CacheProxy], bucket: str, redis_server: RedisServer
) -> None:
    """DeleteObjects through proxy B evicts the keys it names from proxy A."""
    proxy_a, proxy_b = two_subscribed_proxies(start_proxy, redis_server)
    a, b = proxy_a.client(), proxy_b.client()
    a.put_object(Bucket=bucket, Key="gone", Body=b"cached")
    assert read(a, bucket, "gone") == b"cached"
    b.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "gone"}]})
    with pytest.raises(ClientError) as caught:
        a.get_object(Bucket=bucket, Key="gone")
    assert caught.value.response["Error"]["Code"] == "NoSuchKey"


def test_pubsub_kill_empties_cache(
    start_proxy: Callable[..., CacheProxy],
    relay: Relay,
    bucket: str,
    redis_server: RedisServer,
    s3_server: MotoServer,
) -> None:
    """After CLIENT KILL TYPE pubsub the proxy drops its entries, so it misses no write."""
    proxy = start_proxy(redis_server.url)
    redis = redis_server.client()
    wait_until(lambda: redis.pubsub_numsub(CHANNEL)[0][1] == 1, description="the subscription")
    s3 = proxy.client()
    s3.put_object(Bucket=bucket, Key="obj", Body=b"v1")
    assert read(s3, bucket, "obj") == b"v1"
    assert read(s3, bucket, "obj") == b"v1"
    assert backend_gets(relay, bucket, "obj") == 1

    killed = redis.client_kill_filter(_type="pubsub")
    direct(s3_server).put_object(Bucket=bucket, Key="obj", Body=b"v2")
    assert killed == 1
    wait_until(lambda: redis.pubsub_numsub(CHANNEL)[0][1] == 1, description="the resubscription")
    assert read(s3, bucket, "obj") == b"v2"


def test_redis_down_stops_caching(
    start_proxy: Callable[..., CacheProxy],
    relay: Relay,
    bucket: str,
    redis_server: RedisServer,
    s3_server: MotoServer,
) -> None:
    """While Redis is down every GET goes to the backend; caching resumes when it returns."""
    proxy = start_proxy(redis_server.url)
    wait_until(lambda: redis_server.client().pubsub_numsub(CHANNEL)[0][1] == 1,
               description="the subscription")
    s3 = proxy.client()
    s3.put_object(Bucket=bucket, Key="obj", Body=b"v1")
    assert read(s3, bucket, "obj") == b"v1"
    assert read(s3, bucket, "obj") == b"v1"
    assert backend_gets(relay, bucket, "obj") == 1

    redis_server.stop()
    direct(s3_server).put_object(Bucket=bucket, Key="obj", Body=b"v2")
    # The loss is noticed when the connection closes; until then the old entry may be served.
    wait_until(lambda: read(s3, bucket, "obj") == b"v2", description="the proxy to drop its entry")
    before = backend_gets(relay, bucket, "obj")
    assert read(s3, bucket, "obj") == b"v2"
    assert read(s3, bucket, "obj") == b"v2"
    assert backend_gets(relay, bucket, "obj") == before + 2

    redis_server.start()
    wait_until(lambda: redis_server.client().pubsub_numsub(CHANNEL)[0][1] == 1,
               description="the resubscription")
    read(s3, bucket, "obj")
    read(s3, bucket, "obj")
    assert backend_gets(relay, bucket, "obj") == before + 3


def test_wrong_signature_rejected(
    start_proxy: Callable[..., CacheProxy], relay: Relay, bucket: str
) -> None:
    """A GET of a cached object with a wrong signature gets 403 and no cached byte."""
    proxy = start_proxy(None)
    s3 = proxy.client()
    s3.put_object(Bucket=bucket, Key="obj", Body=b"secret bytes")
    assert read(s3, bucket, "obj") == b"secret bytes"
    assert read(s3, bucket, "obj") == b"secret bytes"

    intruder = proxy.client(secret_key="wrong-secret")
    with pytest.raises(ClientError) as caught:
        intruder.get_object(Bucket=bucket, Key="obj")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    hits, misses = wait_for_counters(proxy, hits=1, misses=1)
    assert hits == 1
    assert misses == 1


def test_concurrent_gets_one_fetch(
    start_proxy: Callable[..., CacheProxy], relay: Relay, bucket: str, s3_server: MotoServer
) -> None:
    """Fifty concurrent GETs of one uncached object make one backend GET."""
    proxy = start_proxy(None)
    body = bytes(range(256)) * 4096  # 1 MiB, so that the fill takes a while
    direct(s3_server).put_object(Bucket=bucket, Key="big", Body=body)
    s3 = proxy.client(max_pool_connections=64)
    barrier = threading.Barrier(50)
    results: list[bytes] = []
    lock = threading.Lock()

    def get() -> None:
        barrier.wait()
        data = read(s3, bucket, "big")
        with lock:
            results.append(data)

    threads = [threading.Thread(target=get) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(results) == 50
    assert all(data == body for data in results)
    assert backend_gets(relay, bucket, "big") == 1
    hits, misses = wait_for_counters(proxy, hits=49, misses=1)
    assert misses == 1
    assert hits == 49


def test_storm_bound_holds(
    start_proxy: Callable[..., CacheProxy], bucket: str, s3_server: MotoServer
) -> None:
    """A storm of distinct keys keeps s3proxy_cache_bytes within max_bytes."""
    max_bytes = 100_000
    proxy = start_proxy(None, max_bytes=max_bytes, max_object_bytes=30_000)
    backend = direct(s3_server)
    for index in range(60):
        backend.put_object(Bucket=bucket, Key=f"k{index}", Body=bytes([index]) * 9_000)
    s3 = proxy.client()
    seen: list[float] = []
    for index in range(60):
        assert read(s3, bucket, f"k{index}") == bytes([index]) * 9_000
        if index % 10 == 9:
            seen += cache_samples(proxy.scrape()).get("s3proxy_cache_bytes", [])

    wait_until(lambda: counter(proxy, "s3proxy_cache_misses_total") == 60,
               description="60 misses to be flushed")
    samples = cache_samples(proxy.scrape())
    seen += samples["s3proxy_cache_bytes"]
    assert max(seen) <= max_bytes
    assert samples["s3proxy_cache_bytes"][0] > 0
    assert 0 < samples["s3proxy_cache_entries"][0] < 60


def test_ttl_revalidates(
    start_proxy: Callable[..., CacheProxy], relay: Relay, bucket: str, s3_server: MotoServer
) -> None:
    """After ttl an entry is revalidated: a 304 keeps it, a write behind the proxy replaces it."""
    proxy = start_proxy(None, ttl=0.5)
    s3 = proxy.client()
    s3.put_object(Bucket=bucket, Key="obj", Body=b"v1")
    assert read(s3, bucket, "obj") == b"v1"  # miss
    time.sleep(0.6)  # let the entry age past ttl
    assert read(s3, bucket, "obj") == b"v1"  # revalidated by a 304: hit
    revalidations = relay.requests_seen("GET", f"/{bucket}/obj")
    assert len(revalidations) == 2

    direct(s3_server).put_object(Bucket=bucket, Key="obj", Body=b"v2")
    time.sleep(0.6)
    assert read(s3, bucket, "obj") == b"v2"  # revalidated by a 200: miss
    hits, misses = wait_for_counters(proxy, hits=1, misses=2)
    assert hits == 1
    assert misses == 2
