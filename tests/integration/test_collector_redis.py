"""Writers and collector against a real redis-server: exact totals, faults, scrape cost."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from collector.collector import RedisCollector
from collector.definitions import DEFAULT_BUCKETS
from collector.store import RedisStore
from tests.support.collector import assert_primary
from tests.support.collector_writer import OPERATIONS, expected_totals
from tests.support.servers import REPO_ROOT, RedisServer

pytestmark = pytest.mark.integration

WRITERS = 4
COUNT = 50_000
NAMESPACE = "itest"
WRITER_TIMEOUT = 300.0  # seconds; generous for 2-core CI machines


class Writers:
    """Writer processes from tests.support.collector_writer."""

    def __init__(self, url: str, count: int, number: int, stop_file: Path | None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        argv = [sys.executable, "-m", "tests.support.collector_writer", url, NAMESPACE, str(count)]
        if stop_file is not None:
            argv.append(str(stop_file))
        self.processes = [
            subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(number)
        ]

    def wait_recorded(self) -> None:
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.strip() == "recorded", f"writer {process.pid} printed {line!r}"

    def wait_stopped(self) -> list[str]:
        lines = []
        for process in self.processes:
            # Read through the same buffered reader as wait_recorded(); communicate()
            # would bypass what that reader has already buffered.
            assert process.stdout is not None
            out = process.stdout.read()
            process.wait(timeout=WRITER_TIMEOUT)
            assert process.returncode == 0, f"writer {process.pid} exited {process.returncode}"
            lines.append(out.strip().splitlines()[-1])
        return lines

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


class Clock:
    """The wall clock, as the one IReactorTime method the collector uses."""

    def seconds(self) -> float:
        return time.time()


def _registry(url: str) -> CollectorRegistry:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    registry = CollectorRegistry()
    registry.register(RedisCollector(RedisStore(client, NAMESPACE), Clock()))  # type: ignore[arg-type]
    return registry


def _parse(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Scraper(threading.Thread):
    """Scrapes in a loop and records every violation of the histogram invariants."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.registry = _registry(url)
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.scrapes = 0
        self.previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            samples = _parse(self.registry)
            if samples.get(("s3proxy_redis_up", ())) != 1:
                continue
            self.scrapes += 1
            self._check(samples)
            self.previous = samples

    def _check(self, samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        for operation in OPERATIONS:
            labels = (("operation", operation),)
            count = samples.get(("s3proxy_request_latency_seconds_count", labels))
            if count is None:
                continue
            cumulative = [
                samples[("s3proxy_request_latency_seconds_bucket",
                         (("le", floatToGoString(bound)), *labels))]
                for bound in DEFAULT_BUCKETS
            ]
            if cumulative[-1] != count:
                self.violations.append(f"{operation}: +Inf {cumulative[-1]} != count {count}")
            if cumulative != sorted(cumulative):
                self.violations.append(f"{operation}: buckets decrease in le: {cumulative}")
        for key, value in samples.items():
            if key[0].endswith(("_total", "_bucket", "_count")) and key in self.previous:
                if value < self.previous[key]:
                    self.violations.append(f"{key} went from {self.previous[key]} to {value}")


def _assert_exact(registry: CollectorRegistry, writers: int) -> None:
    samples = _parse(registry)
    expected = expected_totals(COUNT, writers)
    for (operation, code), total in expected["requests"].items():
        key = ("s3proxy_requests_total", (("code", code), ("operation", operation)))
        assert samples.get(key) == total, key
    for operation in OPERATIONS:
        labels = (("operation", operation),)
        running = 0
        for index, bound in enumerate(DEFAULT_BUCKETS):
            running += expected["buckets"][(operation, str(index))]
            key = ("s3proxy_request_latency_seconds_bucket",
                   (("le", floatToGoString(bound)), *labels))
            assert samples.get(key) == running, key
        assert samples.get(("s3proxy_request_latency_seconds_count", labels)) == (
            expected["count"][(operation,)]
        )
        assert samples.get(("s3proxy_request_latency_seconds_sum", labels)) == (
            expected["sum"][(operation,)]
        )


@pytest.fixture(autouse=True)
def primary(redis_server: RedisServer) -> None:
    """Fail early when the Redis under test is a replica."""
    assert_primary(redis_server.client(), redis_server.port)


@pytest.fixture
def scraper(redis_server: RedisServer) -> Iterator[Scraper]:
    scraper = Scraper(redis_server.url)
    scraper.start()
    yield scraper
    scraper.stop.set()
    scraper.join(timeout=30)


def test_exact_totals(redis_server: RedisServer, scraper: Scraper) -> None:
    """4 writers x 50,000 increments and observations add up exactly in a scrape."""
    writers = Writers(redis_server.url, COUNT, WRITERS, stop_file=None)
    try:
        writers.wait_recorded()
        assert writers.wait_stopped() == ["stopped 0"] * WRITERS
    finally:
        writers.kill()
    scraper.stop.set()
    scraper.join(timeout=30)

    _assert_exact(_registry(redis_server.url), WRITERS)
    assert scraper.violations == []
    assert scraper.scrapes > 0


def test_exact_totals_under_faults(redis_server: RedisServer, scraper: Scraper,
                                   tmp_path: Path) -> None:
    """Killed client connections and a Redis restart mid-run lose and double nothing."""
    stop_file = tmp_path / "stop"
    writers = Writers(redis_server.url, COUNT, WRITERS, stop_file=stop_file)
    recorded = threading.Thread(target=writers.wait_recorded, daemon=True)
    recorded.start()
    admin = redis_server.client()
    kills = 0
    restarted = False
    started = time.monotonic()
    try:
        # Kill every client connection in a loop while the writers record, and restart
        # Redis once after a second, when batches are in flight.
        while recorded.is_alive():
            try:
                kills += int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal"))
            except redis.ConnectionError:
                pass
            if not restarted and time.monotonic() - started > 1.0:
                redis_server.restart()
                admin = redis_server.client()
                restarted = True
            time.sleep(0.01)
        recorded.join()
        stop_file.touch()
        assert writers.wait_stopped() == ["stopped 0"] * WRITERS
    finally:
        stop_file.touch()
        writers.kill()
    scraper.stop.set()
    scraper.join(timeout=30)

    print(f"killed {kills} client connections, restarted Redis: {restarted}")
    assert restarted
    assert kills > 0
    _assert_exact(_registry(redis_server.url), WRITERS)
    assert scraper.violations == []


def _commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(entry["calls"]) for name, entry in stats.items() if name != "cmdstat_info")


def test_scrape_cost_ignores_keyspace(redis_server: RedisServer) -> None:
    """A scrape issues the same Redis commands with 400,000 unrelated keys as without."""
    writers = Writers(redis_server.url, 1000, 1, stop_file=None)
    try:
        writers.wait_recorded()
        writers.wait_stopped()
    finally:
        writers.kill()
    admin = redis_server.client()
    registry = _registry(redis_server.url)
    generate_latest(registry)  # the first scrape also discovers the families

    def measure() -> tuple[int, float]:
        admin.config_resetstat()
        started = time.perf_counter()
        generate_latest(registry)
        elapsed = time.perf_counter() - started
        return _commands(admin), elapsed

    without_keys, time_without = measure()
    with admin.pipeline(transaction=False) as pipe:
        for start in range(0, 400_000, 10_000):
            pipe.mset({f"unrelated:{i}": "x" for i in range(start, start + 10_000)})
        pipe.execute()
    assert admin.dbsize() > 400_000
    with_keys, time_with = measure()

    print(f"scrape time with 400,000 unrelated keys / without: {time_with / time_without:.2f}")
    assert without_keys > 0
    assert with_keys == without_keys
