"""Unit tests of the HTTP health check and the jitter of its schedule."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from proxy.health import HealthCheckError, HttpProbe, jittered_interval, read_bounded_body
from tests.support.backends import backend

LIST_BUCKETS = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<ListAllMyBucketsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Owner><ID>x</ID></Owner><Buckets/></ListAllMyBucketsResult>"
)


class FakeResponse:
    """An IResponse that delivers ``body`` at once."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.phrase = b"Whatever"
        self.headers = Headers()
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records requests and returns one fixed response to each."""

    def __init__(self, code: int = 200, body: bytes = LIST_BUCKETS) -> None:
        self.code = code
        self.body = body
        self.requests: list[tuple[bytes, bytes, Headers]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        self.requests.append((method, uri, headers or Headers()))
        return succeed(FakeResponse(self.code, self.body))


class FakeSigner:
    """Records its arguments and returns one fake signed header set."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> dict[str, str]:
        self.calls.append(args)
        return {"Authorization": "AWS4-HMAC-SHA256 fake", "X-Amz-Date": "20260101T000000Z"}


def run(agent: FakeAgent, config: Any = None, signer: FakeSigner | None = None) -> Deferred[None]:
    probe = HttpProbe(agent, Clock(), signer or FakeSigner())
    return probe(config or backend("a"))


def outcome(d: Deferred[None]) -> Failure | None:
    """Return the failure of a fired Deferred, or None when it succeeded."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the probe Deferred has not fired"
    return results[0] if isinstance(results[0], Failure) else None


def test_list_buckets_healthy() -> None:
    """A 200 with a ListAllMyBucketsResult document is healthy."""
    assert outcome(run(FakeAgent())) is None


def test_list_buckets_request() -> None:
    """The default check is a signed GET / on the backend's endpoint."""
    agent, signer = FakeAgent(), FakeSigner()
    config = dataclasses.replace(backend("a"), endpoint="http://127.0.0.1:9/")
    run(agent, config, signer)
    method, uri, headers = agent.requests[0]
    assert (method, uri) == (b"GET", b"http://127.0.0.1:9/")
    assert headers.getRawHeaders(b"authorization") == [b"AWS4-HMAC-SHA256 fake"]
    assert signer.calls[0][4:7] == ("test-access", "test-secret", "us-east-1")


def test_non_xml_unhealthy() -> None:
    """A 200 whose body is not XML is unhealthy."""
    failure = outcome(run(FakeAgent(body=b"<html>login")))
    assert failure is not None
    assert failure.check(HealthCheckError)


def test_wrong_document_unhealthy() -> None:
    """A 200 with another XML document is unhealthy, and the reason names it."""
    failure = outcome(run(FakeAgent(body=b"<Error><Code>X</Code></Error>")))
    assert failure is not None
    assert "<Error>" in str(failure.value)


def test_server_error_unhealthy() -> None:
    """A 503 is unhealthy with the status as the reason."""
    failure = outcome(run(FakeAgent(code=503, body=b"")))
    assert failure is not None
    assert str(failure.value) == "HTTP 503"


def test_forbidden_unhealthy() -> None:
    """A 403 (wrong backend credentials) is unhealthy."""
    failure = outcome(run(FakeAgent(code=403, body=b"<Error/>")))
    assert failure is not None


def test_health_bucket_head() -> None:
    """With health_bucket the check is a signed HEAD of that bucket, healthy on 200."""
    agent, signer = FakeAgent(body=b""), FakeSigner()
    config = dataclasses.replace(backend("a"), health_bucket="probe bucket")
    d = run(agent, config, signer)
    assert outcome(d) is None
    assert agent.requests[0][:2] == (b"HEAD", b"http://127.0.0.1:1/a/probe%20bucket")
    assert signer.calls[0][0] == "HEAD"


def test_health_path_plain() -> None:
    """With health_path the check is an unsigned GET, healthy on any 2xx body."""
    agent, signer = FakeAgent(code=204, body=b"ok"), FakeSigner()
    config = dataclasses.replace(backend("a"), health_path="/minio/health/live")
    d = run(agent, config, signer)
    assert outcome(d) is None
    assert agent.requests[0][1] == b"http://127.0.0.1:1/a/minio/health/live"
    assert signer.calls == []


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 9.0), (0.5, 10.0), (1.0, 11.0)])
def test_jittered_interval(draw: float, expected: float) -> None:
    """The delay spreads linearly over interval * (1 - jitter) .. interval * (1 + jitter)."""
    assert jittered_interval(10.0, 0.1, lambda: draw) == pytest.approx(expected)


def test_no_jitter() -> None:
    """Without jitter the delay is the interval whatever the random draw."""
    assert jittered_interval(10.0, 0.0, lambda: 0.9) == 10.0


class StreamingResponse:
    """An IResponse whose body the test delivers chunk by chunk."""

    def __init__(self) -> None:
        self.code = 200
        self.phrase = b"OK"
        self.headers = Headers()
        self.protocol: Any = None
        self.aborted = 0

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def abortConnection(self) -> None:
        # Like a real transport, the loss follows later; the test delivers it.
        self.aborted += 1


def test_body_over_limit_fails() -> None:
    """A health check body larger than the limit fails the check and aborts the connection."""
    response = StreamingResponse()
    finished = read_bounded_body(response, limit=10)
    response.protocol.dataReceived(b"x" * 8)
    response.protocol.dataReceived(b"x" * 8)
    failure = outcome(finished)
    assert failure is not None
    assert failure.check(HealthCheckError)
    assert response.aborted == 1


def test_cancelled_read_fires_once() -> None:
    """Cancelling a body read (a timed-out check) fires once, and the abort's loss is ignored."""
    response = StreamingResponse()
    finished = read_bounded_body(response, limit=100)
    response.protocol.dataReceived(b"partial")
    finished.cancel()
    response.protocol.connectionLost(Failure(ConnectionDone()))
    failure = outcome(finished)
    assert failure is not None
    assert failure.check(CancelledError)
    assert response.aborted == 1


def test_body_within_limit_read() -> None:
    """A body within the limit arrives whole."""
    response = StreamingResponse()
    finished = read_bounded_body(response, limit=100)
    response.protocol.dataReceived(b"abc")
    response.protocol.dataReceived(b"def")
    response.protocol.connectionLost(Failure(ResponseDone()))
    results: list[Any] = []
    finished.addCallback(results.append)
    assert results == [b"abcdef"]
