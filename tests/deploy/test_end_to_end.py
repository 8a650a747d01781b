"""A real Prometheus scrapes the exporter of two proxies that clients drive.

The stack: moto behind the SigV4-verifying front, a stoppable relay before the front (the
backend the proxies see), redis-server, two ``twistd s3proxy`` processes writing to that Redis,
one ``twistd s3proxy-exporter``, and Prometheus loading ``deploy/rules.yml`` and
``deploy/alerts.yml``. The test checks what Prometheus' HTTP API returns against what the
clients did.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig
from prometheus_client.parser import text_string_to_metric_families

from tests.support.prometheus import PrometheusServer
from tests.support.relay import Relay
from tests.support.servers import (
    REPO_ROOT,
    MotoServer,
    RedisServer,
    TwistdProcess,
    free_port,
    twistd_argv,
    twistd_env,
)
from tests.support.sigv4_front import start_front

CLIENT_ACCESS_KEY = "e2e-client"
CLIENT_SECRET_KEY = "e2e-client-secret"
BACKEND_ACCESS_KEY = "e2e-backend"
BACKEND_SECRET_KEY = "e2e-backend-secret"
PUTS_PER_PROXY = 20
GETS_PER_PROXY = 30

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _proxy_config(port: int, backend_endpoint: str, redis_url: str) -> str:
    # Short health settings, so a stopped backend is DOWN within about two seconds.
    return f"""
[server]
listen = "tcp:{port}:interface=127.0.0.1"
region = "us-east-1"

[metrics]
listen = ""
redis_url = "{redis_url}"
flush_interval = 0.2

[[users]]
access_key = "{CLIENT_ACCESS_KEY}"
secret_key = "{CLIENT_SECRET_KEY}"

[[backends]]
id = "primary"
endpoint = "{backend_endpoint}"
access_key = "{BACKEND_ACCESS_KEY}"
secret_key = "{BACKEND_SECRET_KEY}"

[health]
interval = 0.5
timeout = 0.5
failures_to_down = 2
successes_to_up = 1
cooldown = 1.0
"""


@dataclass
class Stack:
    proxies: list[str]
    exporter_port: int
    relay: Relay
    prometheus: PrometheusServer


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer, s3_server: MotoServer) -> Iterator[Stack]:
    """Start the whole stack and stop every part of it afterwards."""
    front = start_front(s3_server.endpoint, BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY)
    front_port = int(front.endpoint.rsplit(":", 1)[1])
    relay = Relay(front_port).start()
    processes: list[TwistdProcess] = []
    prometheus = None
    try:
        proxies = []
        for index in range(2):
            port = free_port()
            directory = tmp_path / f"proxy-{index}"
            directory.mkdir()
            config = directory / "proxy.toml"
            config.write_text(_proxy_config(port, relay.endpoint, redis_server.url))
            log = directory / "twistd.log"
            process = TwistdProcess(
                twistd_argv("s3proxy", "--config", str(config), log_path=log),
                twistd_env(), ready_port=port, log_path=log,
            )
            processes.append(process.start())
            proxies.append(f"http://127.0.0.1:{port}")

        exporter_port = free_port()
        exporter_log = tmp_path / "exporter.log"
        exporter = TwistdProcess(
            twistd_argv("s3proxy-exporter", "--redis-url", redis_server.url,
                        "--listen", f"tcp:{exporter_port}:interface=127.0.0.1",
                        log_path=exporter_log),
            twistd_env(), ready_url=f"http://127.0.0.1:{exporter_port}/metrics",
            log_path=exporter_log,
        )
        processes.append(exporter.start())

        prometheus = PrometheusServer(
            tmp_path, [f"127.0.0.1:{exporter_port}"],
            rule_files=[REPO_ROOT / "deploy" / "rules.yml", REPO_ROOT / "deploy" / "alerts.yml"],
        ).start()
        yield Stack(proxies, exporter_port, relay, prometheus)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for process in reversed(processes):
            process.stop()
        relay.close()
        front.stop()


def _client(endpoint: str):  # -> S3 client
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=CLIENT_ACCESS_KEY, aws_secret_access_key=CLIENT_SECRET_KEY,
        # Each call is one request, so client-side counts equal what the proxies saw.
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )


def _drive(proxies: list[str]) -> Counter[tuple[str, str]]:
    """Send a known load through both proxies and return its (operation, code) counts."""
    sent: Counter[tuple[str, str]] = Counter()
    first = _client(proxies[0])
    first.create_bucket(Bucket="e2e")
    sent["create_bucket", "200"] += 1
    for index, endpoint in enumerate(proxies):
        client = _client(endpoint)
        for number in range(PUTS_PER_PROXY):
            client.put_object(Bucket="e2e", Key=f"p{index}/{number}", Body=b"x" * 1024)
            sent["put_object", "200"] += 1
        for number in range(GETS_PER_PROXY):
            key = f"p{index}/{number % PUTS_PER_PROXY}"
            assert client.get_object(Bucket="e2e", Key=key)["Body"].read() == b"x" * 1024
            sent["get_object", "200"] += 1
        try:
            client.head_object(Bucket="e2e", Key="missing")
        except client.exceptions.ClientError:
            sent["head_object", "404"] += 1
    return sent


class _SteadyLoad:
    """GETs of one object in a background thread, as fast as one client sends them."""

    def __init__(self, endpoint: str) -> None:
        self.client = _client(endpoint)
        self.count = 0
        self.elapsed = 0.0
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                self.client.get_object(Bucket="e2e", Key="p0/0")["Body"].read()
                self.count += 1
            except Exception as error:  # recorded, and the test asserts none happened
                self.errors.append(error)
                break
        self.elapsed = time.monotonic() - started

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _scrape_exporter(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _quantile_from_buckets(quantile: float, buckets: list[tuple[float, float]]) -> float:
    """Interpolate a quantile in cumulative buckets the way PromQL's histogram_quantile does."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = quantile * total
    counts = [count for _, count in buckets]
    index = bisect.bisect_left(counts, rank)
    upper, count = buckets[index]
    if math.isinf(upper):
        return buckets[-2][0]
    lower, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
    return lower + (upper - lower) * (rank - below) / (count - below)


def test_prometheus_sees_exact_totals(stack: Stack) -> None:
    """Prometheus' sum, rate and quantile over the exporter match what the clients did."""
    sent = _drive(stack.proxies)
    prometheus = stack.prometheus
    total = sum(sent.values())

    samples = prometheus.wait_for(
        "sum(s3proxy_requests_total)",
        lambda found: bool(found) and found[0].value == total,
    )
    assert samples[0].value == total

    for (operation, code), count in sent.items():
        expr = f's3proxy_requests_total{{operation="{operation}",code="{code}"}}'
        found = prometheus.wait_for(expr, lambda found, count=count: bool(found)
                                    and found[0].value == count)
        assert found[0].value == count

    # rate() during a steady load: positive, and of the order of what the client measured.
    # Once the load stops and the window holds only unchanged samples, it is exactly 0.
    steady = _SteadyLoad(stack.proxies[0])
    steady.start()
    try:
        prometheus.wait_for(
            'sum(rate(s3proxy_requests_total{operation="get_object"}[4s]))',
            lambda found: bool(found) and found[0].value > 0,
        )
        # Let the 4 s window move entirely inside the load before taking the value.
        time.sleep(6)
        during = prometheus.query('sum(rate(s3proxy_requests_total{operation="get_object"}[4s]))')
    finally:
        steady.stop()
    assert steady.errors == []
    client_rate = steady.count / steady.elapsed
    assert client_rate / 3 <= during[0].value <= client_rate * 3
    prometheus.wait_for(
        'sum(rate(s3proxy_requests_total{operation="get_object"}[4s]))',
        lambda found: bool(found) and found[0].value == 0,
    )
    expected_gets = sent["get_object", "200"] + steady.count
    gets = prometheus.wait_for(
        's3proxy_requests_total{operation="get_object",code="200"}',
        lambda found: bool(found) and found[0].value == expected_gets,
    )
    assert gets[0].value == expected_gets

    # histogram_quantile over the all-time buckets equals the interpolation of the buckets the
    # exporter serves, because no request arrives any more.
    text = _scrape_exporter(stack.exporter_port)
    buckets = []
    for family in text_string_to_metric_families(text):
        if family.name != "s3proxy_request_latency_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels["operation"] == "put_object":
                buckets.append((float(sample.labels["le"]), sample.value))
    expected = _quantile_from_buckets(0.5, buckets)
    quantile = prometheus.wait_for(
        'histogram_quantile(0.5, sum by (le) '
        '(s3proxy_request_latency_seconds_bucket{operation="put_object"}))',
        lambda found: bool(found) and math.isclose(found[0].value, expected, rel_tol=1e-9),
    )
    assert math.isclose(quantile[0].value, expected, rel_tol=1e-9)


def test_backend_down_alert_pending(stack: Stack) -> None:
    """A stopped backend turns the backend state to 0 and S3ProxyBackendDown pending."""
    prometheus = stack.prometheus
    prometheus.wait_for(
        'backend_id:s3proxy_backend_state:max{backend_id="primary"}',
        lambda found: bool(found) and found[0].value == 1,
    )

    stack.relay.stop()

    prometheus.wait_for(
        'max by (backend_id) (s3proxy_backend_state{backend_id="primary"})',
        lambda found: bool(found) and found[0].value == 0,
    )
    # Prometheus exposes the state of every active alert as the ALERTS series.
    pending = prometheus.wait_for(
        'ALERTS{alertname="S3ProxyBackendDown"}',
        lambda found: bool(found),
    )
    assert pending[0].labels["backend_id"] == "primary"
    assert pending[0].labels["alertstate"] == "pending"
    assert pending[0].labels["severity"] == "warning"
