"""A real Prometheus scrapes a small prometheus_client exporter and evaluates deploy/'s rules.

The exporter serves s3proxy family names with values set by the test, so these tests check
the Prometheus fixture and that Prometheus itself loads and evaluates the rule files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tests.support.prometheus import PrometheusError, PrometheusServer, Sample
from tests.support.servers import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class SampleExporter:
    """A prometheus_client HTTP server on 127.0.0.1 with a few s3proxy families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "s3proxy_requests", "Client requests.", ["operation", "code"], registry=self.registry
        )
        self.redis_up = Gauge("s3proxy_redis_up", "Redis reachable.", registry=self.registry)
        self.backend_state = Gauge(
            "s3proxy_backend_state",
            "Backend state.",
            ["backend_id", "proxy"],
            registry=self.registry,
        )
        self.port = free_port()
        self.server, self.thread = start_http_server(
            self.port, addr="127.0.0.1", registry=self.registry
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def exporter() -> Iterator[SampleExporter]:
    """A sample exporter, shut down after the test."""
    exporter = SampleExporter()
    try:
        yield exporter
    finally:
        exporter.close()


@pytest.fixture
def prometheus(tmp_path: Path, exporter: SampleExporter) -> Iterator[PrometheusServer]:
    """Prometheus scraping the sample exporter every second, with deploy/'s rule files."""
    rule_files = [DEPLOY / "rules.yml", DEPLOY / "alerts.yml"]
    with PrometheusServer(tmp_path, [exporter.target], rule_files=rule_files) as server:
        yield server


def _single_value(samples: list[Sample], value: float) -> bool:
    return len(samples) == 1 and samples[0].value == value


def test_scrape_sees_gauge_change(
    exporter: SampleExporter, prometheus: PrometheusServer
) -> None:
    """A gauge change in the exporter shows in a query after the next scrape."""
    exporter.redis_up.set(1)
    prometheus.wait_for("s3proxy_redis_up", lambda samples: _single_value(samples, 1))

    exporter.redis_up.set(0)
    samples = prometheus.wait_for("s3proxy_redis_up", lambda s: _single_value(s, 0))
    assert samples[0].labels["job"] == "s3proxy"


def test_scrape_target_up(exporter: SampleExporter, prometheus: PrometheusServer) -> None:
    """The sample exporter is scraped successfully under job s3proxy."""
    samples = prometheus.wait_for('up{job="s3proxy"}', lambda s: _single_value(s, 1))
    assert samples[0].labels["instance"] == exporter.target


def test_rules_loaded(prometheus: PrometheusServer) -> None:
    """Prometheus loads every recording rule and alert of deploy/."""
    loaded = prometheus.rule_names()
    assert "job:s3proxy_requests:rate5m" in loaded
    assert "S3ProxyBackendDown" in loaded
    assert "S3ProxyExporterDown" in loaded


def test_recording_rule_evaluated(
    exporter: SampleExporter, prometheus: PrometheusServer
) -> None:
    """Requests counted by the exporter appear in the recorded request rate."""
    exporter.requests.labels("get_object", "200").inc()
    prometheus.wait_for("s3proxy_requests_total", lambda s: len(s) == 1)
    exporter.requests.labels("get_object", "200").inc(100)

    samples = prometheus.wait_for(
        'operation_code:s3proxy_requests:rate5m{operation="get_object"}',
        lambda s: len(s) == 1 and s[0].value > 0,
    )
    assert samples[0].labels["code"] == "200"


def test_backend_down_pending(exporter: SampleExporter, prometheus: PrometheusServer) -> None:
    """A backend that every proxy reports DOWN makes S3ProxyBackendDown pending."""
    exporter.backend_state.labels("primary", "host-a:1:x").set(0)
    exporter.backend_state.labels("primary", "host-b:2:y").set(0)

    def backend_down_pending(samples: list[Sample]) -> bool:
        return any(sample.labels.get("alertname") == "S3ProxyBackendDown" for sample in samples)

    samples = prometheus.wait_for('ALERTS{alertstate="pending"}', backend_down_pending)
    alert = next(s for s in samples if s.labels["alertname"] == "S3ProxyBackendDown")
    assert alert.labels["backend_id"] == "primary"


def test_invalid_query_raises(prometheus: PrometheusServer) -> None:
    """An invalid expression raises PrometheusError with Prometheus' message."""
    with pytest.raises(PrometheusError, match="parse error"):
        prometheus.query("sum(")
