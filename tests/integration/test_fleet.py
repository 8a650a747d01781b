"""Several twistd s3proxy processes, one exporter, one Redis: fleet-wide totals and faults.

Each test starts real processes on loopback ports: redis-server from redis.conf, moto
behind the SigV4-verifying front, three proxies and ``twistd s3proxy-exporter``. Loads
are small (hundreds of requests), so the tests prove exact accounting, not speed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.buffer import Batch
from collector.definitions import APPLICATION_METRICS, MetricDefinition
from collector.store import RedisStore
from tests.support.fleet import (
    Exporter,
    Fleet,
    LoadClient,
    MonotonicScraper,
    latency_counts,
    latency_report,
    request_totals,
    series_of,
    wait_until,
)
from tests.support.proxy_process import BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY, ProxyProcess
from tests.support.servers import MotoServer, RedisServer
from tests.support.sigv4_front import SigV4Front, start_front

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_PROXY = 200


@pytest.fixture
def front(s3_server: MotoServer) -> Iterator[SigV4Front]:
    """The SigV4-verifying front before moto, with the proxies' backend credential."""
    started = start_front(s3_server.endpoint, BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer, front: SigV4Front) -> Iterator[Fleet]:
    """Three proxies and an exporter on one Redis; the exporter's gauge TTL is 3 s."""
    started = Fleet(tmp_path, redis_server.url, front.endpoint, count=3,
                    exporter_args=("--gauge-ttl", "3")).start()
    try:
        yield started
    finally:
        started.stop()


def _expected(load: LoadClient) -> dict[tuple[str, str], int]:
    return dict(load.calls)


def _per_operation(calls: dict[tuple[str, str], int]) -> dict[str, float]:
    result: dict[str, float] = {}
    for (operation, _), count in calls.items():
        result[operation] = result.get(operation, 0.0) + count
    return result


def test_fleet_exact_totals(fleet: Fleet) -> None:
    """The exporter's totals equal what the clients of three proxies counted."""
    load = LoadClient([proxy.endpoint for proxy in fleet.proxies], "fleet-exact", PER_PROXY)
    load.create_bucket()
    load.run()

    expected = _expected(load)
    samples = fleet.exporter.wait_for_totals(expected)
    assert not load.errors
    assert sum(expected.values()) == 3 * PER_PROXY + 1
    assert request_totals(samples) == {key: float(value) for key, value in expected.items()}
    assert latency_counts(samples) == _per_operation(expected)
    assert samples[("s3proxy_proxies", ())] == 3
    assert len(series_of(samples, "s3proxy_proxy_last_seen_timestamp_seconds")) == 3


def test_fleet_redis_outage(fleet: Fleet, redis_server: RedisServer) -> None:
    """With Redis stopped for 10 s mid-load, clients keep succeeding and totals stay exact."""
    load = LoadClient([proxy.endpoint for proxy in fleet.proxies], "fleet-outage", PER_PROXY,
                      pause=0.06)
    load.create_bucket()
    started = time.monotonic()
    load.start()
    time.sleep(2.0)
    down = time.monotonic()
    redis_server.stop()
    time.sleep(10.0)
    redis_server.start()
    up = time.monotonic()
    load.join()

    print(latency_report(load.latencies, {
        "before": (started, down), "Redis down": (down, up), "after": (up, time.monotonic()),
    }))
    expected = _expected(load)
    samples = fleet.exporter.wait_for_totals(expected)
    assert not load.errors
    assert load.latencies[-1][0] > up
    assert request_totals(samples) == {key: float(value) for key, value in expected.items()}
    assert latency_counts(samples) == _per_operation(expected)


def test_fleet_client_kill(fleet: Fleet, redis_server: RedisServer) -> None:
    """CLIENT KILL of every Redis connection in a loop loses and doubles nothing."""
    load = LoadClient([proxy.endpoint for proxy in fleet.proxies], "fleet-kill", PER_PROXY,
                      pause=0.02)
    load.create_bucket()
    admin = redis_server.client()
    stop = threading.Event()
    kills: list[int] = []

    def kill_clients() -> None:
        while not stop.is_set():
            kills.append(int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal")))
            stop.wait(0.1)

    killer = threading.Thread(target=kill_clients, daemon=True)
    killer.start()
    try:
        load.run()
    finally:
        stop.set()
        killer.join(10)

    expected = _expected(load)
    samples = fleet.exporter.wait_for_totals(expected)
    print(f"CLIENT KILL closed {sum(kills)} connections in {len(kills)} rounds")
    assert sum(kills) > 0
    assert not load.errors
    assert request_totals(samples) == {key: float(value) for key, value in expected.items()}


def _writer_of(samples: dict, pid: int) -> str:
    for labels in series_of(samples, "s3proxy_proxy_last_seen_timestamp_seconds"):
        writer = dict(labels)["proxy"]
        if writer.split(":")[1] == str(pid):
            return writer
    raise LookupError(f"no writer of pid {pid} in the exporter's scrape")


def _gauge_writers(samples: dict) -> set[str]:
    return {dict(labels)["proxy"] for labels in series_of(samples, "s3proxy_backend_state")}


def test_fleet_sigkill(fleet: Fleet, redis_server: RedisServer) -> None:
    """A SIGKILLed proxy's gauges vanish within the TTL and no counter ever decreases."""
    endpoints = [proxy.endpoint for proxy in fleet.proxies]
    setup = LoadClient(endpoints, "fleet-sigkill", 0)
    setup.create_bucket()
    victim = fleet.proxies[0]
    samples = fleet.exporter.wait_for(lambda s: len(_gauge_writers(s)) == 3)
    writer = _writer_of(samples, victim.process.pid)

    with MonotonicScraper(fleet.exporter) as scraper:
        load = LoadClient(endpoints[1:], "fleet-sigkill", 60).start()
        before = LoadClient(endpoints[:1], "fleet-sigkill", 60).run()
        time.sleep(0.5)  # at least two flushes of the victim's last requests
        killed_at = time.monotonic()
        victim.process.kill()
        samples = fleet.exporter.wait_for(
            lambda s: writer not in _gauge_writers(s) and s[("s3proxy_proxies", ())] == 2
        )
        gone_after = time.monotonic() - killed_at
        load.join()
        expected = setup.calls + before.calls + load.calls
        samples = fleet.exporter.wait_for_totals(dict(expected))

    print(f"gauges of the killed proxy gone after {gone_after:.1f} s; {scraper.scrapes} scrapes")
    assert writer not in _gauge_writers(samples)
    assert samples[("s3proxy_proxies", ())] == 2
    assert request_totals(samples) == {key: float(value) for key, value in expected.items()}
    assert scraper.scrapes > 10
    assert scraper.violations == []


def test_fleet_restarts_bounded(fleet: Fleet, redis_server: RedisServer) -> None:
    """After repeated restarts the writer entries in Redis do not grow with their number."""
    client = redis_server.client()
    store = RedisStore(client)
    gauges = store.family_key("s3proxy_backend_state")

    def sizes() -> tuple[int, int, int]:
        # Wait until the exporter shows exactly the running proxies: the new one has
        # flushed and the stopped one's entries were pruned.
        pids = {str(proxy.process.pid) for proxy in fleet.proxies}
        fleet.exporter.wait_for(
            lambda s: {writer.split(":")[1] for writer in _gauge_writers(s)} == pids
            and {dict(labels)["proxy"].split(":")[1] for labels in
                 series_of(s, "s3proxy_proxy_last_seen_timestamp_seconds")} == pids
        )
        return (client.zcard(store.heartbeat_key), client.hlen(gauges),
                client.hlen(store.sequence_key))

    start = sizes()
    for kill in (True, False, True, False):
        victim = fleet.proxies[1]
        if kill:
            victim.process.kill()
        else:
            victim.stop()
        fleet.replace(1)
        sizes()
    killed_sequences = 2
    end = sizes()

    assert start[:2] == (3, 3)
    assert end[:2] == (3, 3)
    # A SIGKILLed writer's sequence record stays for the retention (a week by default).
    # A writer cut off from Redis may still resend its last batch, which the record turns
    # into a no-op. A clean stop removes the record.
    assert end[2] == start[2] + killed_sequences


def test_fleet_sigterm_in_flight(tmp_path: Path, redis_server: RedisServer) -> None:
    """SIGTERM lets requests in flight finish and counts them before the process exits."""
    from tests.support.fleet import SlowBackend, s3_client

    backend = SlowBackend(delay=2.0).start()
    fleet = Fleet(tmp_path, redis_server.url, backend.endpoint, count=1).start()
    try:
        proxy = fleet.proxies[0]
        client = s3_client(proxy.endpoint)
        results: list[int] = []
        lock = threading.Lock()

        def put(number: int) -> None:
            reply = client.put_object(Bucket="slow", Key=f"k{number}", Body=b"in flight")
            with lock:
                results.append(reply["ResponseMetadata"]["HTTPStatusCode"])

        threads = [threading.Thread(target=put, args=(n,)) for n in range(5)]
        for thread in threads:
            thread.start()
        wait_until(lambda: backend.count == 5, "five requests to reach the backend")
        proxy.process.process.terminate()
        for thread in threads:
            thread.join(30)
        code = proxy.process.process.wait(30)
        log = proxy.log_text()
        samples = fleet.exporter.wait_for_totals({("put_object", "200"): 5})
    finally:
        fleet.stop()
        backend.stop()

    assert results == [200] * 5
    # twistd re-raises the signal that stopped it once the reactor has shut down cleanly.
    assert code == -signal.SIGTERM
    assert "were not written to the store" not in log
    assert request_totals(samples) == {("put_object", "200"): 5.0}
    assert samples[("s3proxy_proxies", ())] == 0


def test_fleet_new_family_live(fleet: Fleet, redis_server: RedisServer) -> None:
    """A family or label value added by a newer writer shows up without restarting anything."""
    store = RedisStore(redis_server.client())
    newer = MetricDefinition("s3proxy_fleet_extra_total", "counter", "Added by a newer proxy.",
                             ("kind",))
    fleet.exporter.wait_for(lambda s: s[("s3proxy_proxies", ())] == 3)
    store.register([newer])
    batch = Batch("newer:1:aa", 1, time.time(), counters={
        ("s3proxy_fleet_extra_total", ("fresh",)): 2.0,
        ("s3proxy_requests_total", ("list_parts", "418")): 1.0,
    })
    store.apply(batch, time.time())

    samples = fleet.exporter.scrape()
    assert samples[("s3proxy_fleet_extra_total", (("kind", "fresh"),))] == 2.0
    assert request_totals(samples)[("list_parts", "418")] == 1.0


def test_fleet_redis_flushed(fleet: Fleet, redis_server: RedisServer) -> None:
    """After FLUSHALL the running proxies store their definitions again and count from zero."""
    endpoints = [proxy.endpoint for proxy in fleet.proxies]
    first = LoadClient(endpoints, "fleet-flushed", 30)
    first.create_bucket()
    first.run()
    fleet.exporter.wait_for_totals(dict(first.calls))

    redis_server.client().flushall()
    second = LoadClient(endpoints, "fleet-flushed", 30).run()
    samples = fleet.exporter.wait_for_totals(dict(second.calls))

    assert request_totals(samples) == {k: float(v) for k, v in second.calls.items()}
    assert latency_counts(samples) == _per_operation(second.calls)


def test_fleet_conflict_refused(tmp_path: Path, redis_server: RedisServer) -> None:
    """A proxy whose definitions conflict with the stored ones exits; the exporter serves on."""
    store = RedisStore(redis_server.client())
    older = MetricDefinition("s3proxy_requests_total", "counter", "An older layout.",
                             ("operation",))
    store.register([older])
    store.apply(Batch("older:1:aa", 1, time.time(),
                      counters={("s3proxy_requests_total", ("get_object",)): 7.0}), time.time())
    exporter = Exporter(tmp_path, redis_server.url).start()
    try:
        proxy = ProxyProcess(tmp_path / "conflicting", "http://127.0.0.1:9",
                             redis_url=redis_server.url)
        with pytest.raises(RuntimeError):
            proxy.start()
        code = proxy.process.process.wait(30)
        log = proxy.log_text()
        samples = exporter.scrape()
    finally:
        exporter.stop()

    ours = next(d for d in APPLICATION_METRICS if d.name == "s3proxy_requests_total")
    assert code != 0
    assert older.schema() in log
    assert ours.schema() in log
    assert samples[("s3proxy_redis_up", ())] == 1
    assert samples[("s3proxy_requests_total", (("operation", "get_object"),))] == 7.0
