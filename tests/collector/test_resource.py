"""Tests for the /metrics and /healthz resources."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from collector import open_monitoring
from collector.resource import HealthResource, MetricsResource, metrics_root
from tests.support.collector import run_now


@pytest.fixture
def monitoring(clock: Clock) -> Any:
    """Embedded-store monitoring with one flushed counter, on a synchronous runner."""
    monitoring = open_monitoring(None, reactor=clock, run_in_thread=run_now, writer_id="h:1:a")
    monitoring.service.startService()
    monitoring.metrics.requests_total.labels("get_object", "200").inc(3)
    monitoring.metrics.request_latency_seconds.labels("get_object").observe(0.2)
    clock.advance(1)
    yield monitoring
    monitoring.service.stopService()


def _get(resource: MetricsResource, headers: dict[str, str] | None = None,
         names: list[str] | None = None) -> DummyRequest:
    request = DummyRequest([b""])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    if names:
        request.args[b"name[]"] = [name.encode() for name in names]
    assert resource.render(request) is NOT_DONE_YET
    return request


def _body(request: DummyRequest) -> str:
    return b"".join(request.written).decode("utf-8")


def _header(request: DummyRequest, name: str) -> str | None:
    values = request.responseHeaders.getRawHeaders(name)
    return values[0] if values else None


def test_text_by_default(monitoring: Any) -> None:
    """Without Accept the body is text format 0.0.4 with the recorded counter."""
    request = _get(monitoring.resource)

    assert request.responseCode in (None, 200)
    assert _header(request, "content-type") == CONTENT_TYPE_PLAIN_0_0_4
    families = {f.name: f for f in text_string_to_metric_families(_body(request))}
    assert families["s3proxy_requests"].samples[0].value == 3


def test_openmetrics_negotiated(monitoring: Any) -> None:
    """Accept: application/openmetrics-text gives OpenMetrics with # EOF."""
    request = _get(monitoring.resource, {"Accept": "application/openmetrics-text; version=1.0.0"})

    assert _header(request, "content-type").startswith("application/openmetrics-text")
    body = _body(request)
    assert body.endswith("# EOF\n")
    assert "s3proxy_requests" in {family.name for family in parse_openmetrics(body)}


def test_text_1_0_0_negotiated(monitoring: Any) -> None:
    """Accept: text/plain; version=1.0.0 gets the 1.0.0 content type."""
    request = _get(monitoring.resource, {"Accept": "text/plain; version=1.0.0"})
    assert "version=1.0.0" in _header(request, "content-type")


def test_gzip(monitoring: Any) -> None:
    """Accept-Encoding: gzip compresses the body and sets Content-Encoding."""
    request = _get(monitoring.resource, {"Accept-Encoding": "gzip, deflate"})

    assert _header(request, "content-encoding") == "gzip"
    text = gzip.decompress(b"".join(request.written)).decode("utf-8")
    assert "s3proxy_requests_total" in text


def test_name_filter(monitoring: Any) -> None:
    """name[] keeps only the named samples."""
    request = _get(monitoring.resource, names=["s3proxy_redis_up"])
    samples = [
        sample.name
        for family in text_string_to_metric_families(_body(request))
        for sample in family.samples
    ]
    assert samples == ["s3proxy_redis_up"]


def test_timeout_503(clock: Clock) -> None:
    """A collection slower than the timeout returns 503 with a message and counts it."""
    timeouts = []
    never: Deferred[Any] = Deferred()
    resource = MetricsResource(
        CollectorRegistry(), clock, lambda *args: never, timeout=5,
        on_timeout=lambda: timeouts.append(1),
    )
    request = _get(resource)
    clock.advance(5)

    assert request.responseCode == 503
    assert "timed out after 5" in _body(request)
    assert timeouts == [1]
    assert clock.getDelayedCalls() == []


def test_timeout_shown_next_scrape(monitoring: Any, clock: Clock) -> None:
    """A timeout is counted in s3proxy_scrape_errors_total{cause="timeout"}."""
    monitoring.collector.record_timeout()
    request = _get(monitoring.resource, names=["s3proxy_scrape_errors_total"])
    assert 's3proxy_scrape_errors_total{cause="timeout"} 1.0' in _body(request)


def test_client_gone(clock: Clock) -> None:
    """A client that disconnects gets nothing written when the collection finishes."""
    pending: Deferred[Any] = Deferred()
    resource = MetricsResource(CollectorRegistry(), clock, lambda *args: pending)
    request = _get(resource)
    request.processingFailed(Exception("connection lost"))
    written = list(request.written)
    pending.callback(("text/plain", b"late", False))

    assert request.written == written
    assert clock.getDelayedCalls() == []


def test_concurrent_scrapes_share(clock: Clock) -> None:
    """Concurrent requests for the same format share one collection and both get it."""
    calls: list[Deferred[Any]] = []

    def runner(*args: Any) -> Deferred[Any]:
        calls.append(Deferred())
        return calls[-1]

    resource = MetricsResource(CollectorRegistry(), clock, runner)
    first, second = _get(resource), _get(resource)
    calls[0].callback(("text/plain", b"body", False))

    assert len(calls) == 1
    assert _body(first) == "body"
    assert _body(second) == "body"


def test_timed_out_collection_joined(clock: Clock) -> None:
    """A request after a timeout waits for the collection still running, not a new one."""
    calls: list[Deferred[Any]] = []

    def runner(*args: Any) -> Deferred[Any]:
        calls.append(Deferred())
        return calls[-1]

    resource = MetricsResource(CollectorRegistry(), clock, runner, timeout=5)
    timed_out = _get(resource)
    clock.advance(5)
    later = _get(resource)
    calls[0].callback(("text/plain", b"body", False))

    assert timed_out.responseCode == 503
    assert len(calls) == 1
    assert _body(later) == "body"


def test_different_formats_separate(clock: Clock) -> None:
    """Requests for different formats do not share a collection."""
    calls: list[Deferred[Any]] = []

    def runner(*args: Any) -> Deferred[Any]:
        calls.append(Deferred())
        return calls[-1]

    resource = MetricsResource(CollectorRegistry(), clock, runner)
    _get(resource)
    _get(resource, {"Accept": "application/openmetrics-text"})
    assert len(calls) == 2


def test_healthz() -> None:
    """/healthz returns ok."""
    request = DummyRequest([b""])
    assert HealthResource().render(request) == b"ok\n"


def test_root_children(monitoring: Any) -> None:
    """The root resource serves /metrics and /healthz."""
    root = metrics_root(monitoring.resource)
    assert root.getStaticEntity(b"metrics") is monitoring.resource
    assert isinstance(root.getStaticEntity(b"healthz"), HealthResource)


def test_invalid_timeout(clock: Clock) -> None:
    """A scrape timeout that is not > 0 is rejected."""
    with pytest.raises(ValueError, match="timeout"):
        MetricsResource(CollectorRegistry(), clock, run_now, timeout=0)
