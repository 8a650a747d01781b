"""Prometheus with deploy/'s rules scrapes ``twistd s3proxy-exporter`` over a real Redis.

The test writes metric batches into Redis through the collector's own store, as a proxy's
flusher would. The recording rules and alerts therefore see the exporter's real output,
such as the ``proxy`` label of per-proxy gauges and the missing ``s3proxy_proxies`` sample
while Redis is down.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.buffer import DeltaBuffer
from collector.metrics import Metrics
from collector.store import RedisStore
from tests.support.prometheus import PrometheusServer, Sample
from tests.support.servers import RedisServer, TwistdProcess, free_port, twistd_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAMESPACE = "deploye2e"
WRITER = "e2e-host:4242:0badc0de"

class BatchWriter:
    """Writes metric batches to Redis the way one proxy's flusher does, on demand."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.metrics = Metrics(DeltaBuffer())
        self.store = RedisStore(redis_server.client(), namespace=NAMESPACE)
        self.store.register(self.metrics.definitions)
        self.sequence = 0

    def flush(self) -> None:
        """Apply what was recorded since the last flush, with a fresh heartbeat."""
        self.sequence += 1
        now = time.time()
        batch = self.metrics.buffer.swap(WRITER, self.sequence, now)
        assert self.store.apply(batch, now).applied


def _twistd_argv(*args: str) -> list[str]:
    # twistd_argv() of tests.support.servers runs "python -m twisted", which rejects
    # --nodaemon, so this runs the twistd script of this interpreter instead.
    twistd = Path(sys.executable).with_name("twistd")
    return [str(twistd), "--nodaemon", "--pidfile", "", *args]


@pytest.fixture
def exporter(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """A running exporter for ``redis_server``; yields its ``host:port``.

    The gauge TTL is long, so the test's single writer stays live however slowly
    Prometheus starts.
    """
    port = free_port()
    log_path = tmp_path / "exporter.log"
    process = TwistdProcess(
        _twistd_argv(
            "--logfile", str(log_path),
            "s3proxy-exporter",
            "--redis-url", redis_server.url,
            "--namespace", NAMESPACE,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--gauge-ttl", "600",
        ),
        twistd_env(),
        ready_url=f"http://127.0.0.1:{port}/healthz",
        log_path=log_path,
    ).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture
def prometheus(tmp_path: Path, exporter: str) -> Iterator[PrometheusServer]:
    """Prometheus scraping the exporter every second, with deploy/'s rules and alerts."""
    rule_files = [DEPLOY / "rules.yml", DEPLOY / "alerts.yml"]
    with PrometheusServer(tmp_path, [exporter], rule_files=rule_files) as server:
        yield server


@pytest.fixture
def writer(redis_server: RedisServer) -> BatchWriter:
    """A writer with two backends: primary (priority 0) DOWN, secondary (priority 1) UP."""
    writer = BatchWriter(redis_server)
    metrics = writer.metrics
    metrics.backend_state.labels("primary").set(0)
    metrics.backend_state.labels("secondary").set(1)
    metrics.backend_info.labels("primary", "0").set(1)
    metrics.backend_info.labels("secondary", "1").set(1)
    writer.flush()
    return writer


def _pending(alertname: str) -> str:
    return f'ALERTS{{alertname="{alertname}", alertstate="pending"}}'


def _single(samples: list[Sample]) -> bool:
    return len(samples) == 1


def test_error_ratio_recorded(writer: BatchWriter, prometheus: PrometheusServer) -> None:
    """One 503 in ten requests, written in two batches, records a 5xx ratio of 0.1."""
    requests = writer.metrics.requests_total
    requests.labels("get_object", "200").inc(90)
    requests.labels("get_object", "503").inc(10)
    writer.flush()
    prometheus.wait_for("s3proxy_requests_total", lambda samples: len(samples) == 2)

    requests.labels("get_object", "200").inc(90)
    requests.labels("get_object", "503").inc(10)
    writer.flush()
    samples = prometheus.wait_for(
        "job:s3proxy_requests_5xx_per_requests:ratio_rate5m",
        lambda found: _single(found) and found[0].value > 0,
    )
    assert samples[0].value == pytest.approx(0.1)


def test_backend_down_pending(writer: BatchWriter, prometheus: PrometheusServer) -> None:
    """A backend the only proxy reports DOWN makes S3ProxyBackendDown pending for it."""
    samples = prometheus.wait_for(_pending("S3ProxyBackendDown"), _single)
    assert samples[0].labels["backend_id"] == "primary"


def test_priority_down_pending(writer: BatchWriter, prometheus: PrometheusServer) -> None:
    """s3proxy_backend_info joins the per-proxy state, so priority 0 is pending DOWN."""
    samples = prometheus.wait_for(_pending("S3ProxyBackendPriorityDown"), _single)
    assert samples[0].labels["priority"] == "0"


def test_live_proxy_counted(writer: BatchWriter, prometheus: PrometheusServer) -> None:
    """The writer's heartbeat counts as one live proxy, so no live-proxy alert is pending."""
    prometheus.wait_for("s3proxy_proxies", lambda found: _single(found) and found[0].value == 1)
    assert prometheus.query(_pending("S3ProxyNoLiveProxies")) == []


def test_redis_down_alerts(
    writer: BatchWriter, redis_server: RedisServer, prometheus: PrometheusServer
) -> None:
    """With Redis stopped, S3ProxyRedisDown is pending and S3ProxyNoLiveProxies is not."""
    prometheus.wait_for("s3proxy_proxies", lambda found: _single(found) and found[0].value == 1)
    redis_server.stop()

    prometheus.wait_for(_pending("S3ProxyRedisDown"), _single)
    assert prometheus.query("s3proxy_proxies") == []
    assert prometheus.query(_pending("S3ProxyNoLiveProxies")) == []
