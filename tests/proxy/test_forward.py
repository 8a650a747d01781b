"""Tests for proxy.forward: streaming bodies with backpressure, timeouts, header selection."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import UNKNOWN_LENGTH, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from proxy.config import BackendConfig
from proxy.forward import (
    BackendTimeout,
    BufferedBody,
    Forwarder,
    OutgoingRequest,
    ResponseRelay,
    StreamingBody,
    describe_failure,
    forwardable_headers,
    response_headers,
)

BACKEND = BackendConfig(id="b", endpoint="http://127.0.0.1:9100", access_key="a", secret_key="s")


class Consumer:
    """An IConsumer that records writes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Source:
    """Counts pause and resume calls on the client connection."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False


def test_streaming_body_buffers_until_started() -> None:
    """Bytes written before the backend connects are sent once it starts producing."""
    source = Source()
    body = StreamingBody(6, source.pause, source.resume, high_water=100)
    body.write(b"abc")
    consumer = Consumer()
    done = body.startProducing(consumer)
    body.write(b"def")
    body.finish()
    assert consumer.data == b"abcdef"
    assert done.called


def test_streaming_body_pauses_source() -> None:
    """A paused backend makes the body pause the client once high_water bytes wait."""
    source = Source()
    body = StreamingBody(UNKNOWN_LENGTH, source.pause, source.resume, high_water=10)
    consumer = Consumer()
    body.startProducing(consumer)
    body.pauseProducing()
    body.write(b"x" * 8)
    assert not source.paused
    body.write(b"x" * 8)
    assert source.paused
    body.resumeProducing()
    assert not source.paused
    assert consumer.data == b"x" * 16


def test_streaming_body_fail_aborts() -> None:
    """fail() errbacks the producing Deferred, so the Agent aborts the backend request."""
    source = Source()
    body = StreamingBody(10, source.pause, source.resume)
    consumer = Consumer()
    done = body.startProducing(consumer)
    body.write(b"12345")
    failures: list[Failure] = []
    done.addErrback(failures.append)
    body.fail(Failure(ValueError("bad chunk")))
    body.write(b"67890")
    assert len(failures) == 1
    assert consumer.data == b"12345"


def test_streaming_body_fail_resumes_source() -> None:
    """fail() resumes a paused client connection so that the rest can be drained."""
    source = Source()
    body = StreamingBody(100, source.pause, source.resume, high_water=1)
    body.write(b"waiting")
    assert source.paused
    body.fail(Failure(ValueError("x")))
    assert not source.paused


def test_buffered_body_replays() -> None:
    """A buffered body produces the same bytes every time."""
    body = BufferedBody(b"payload")
    first, second = Consumer(), Consumer()
    body.startProducing(first)
    body.startProducing(second)
    assert first.data == second.data == b"payload"


class FakeAgent:
    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers, Any, Deferred[Any]]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        assert headers is not None
        self.requests.append((method, uri, headers, bodyProducer, result))
        return result


def outgoing(body: Any = None) -> OutgoingRequest:
    return OutgoingRequest(
        method="PUT",
        target=b"/bucket/a%20b?x=1",
        headers=[("content-type", "text/plain")],
        payload_sha256="UNSIGNED-PAYLOAD",
        body=body,
    )


def test_forwarder_signs_for_backend() -> None:
    """The request goes to the backend URL with the backend's signature."""
    agent, clock = FakeAgent(), Clock()
    Forwarder(agent, clock, request_timeout=5).send(BACKEND, outgoing())
    method, uri, headers, _, _ = agent.requests[0]
    assert method == b"PUT"
    assert uri == b"http://127.0.0.1:9100/bucket/a%20b?x=1"
    authorization = headers.getRawHeaders(b"authorization")[0]
    assert authorization.startswith(b"AWS4-HMAC-SHA256 Credential=a/")
    assert headers.getRawHeaders(b"x-amz-content-sha256") == [b"UNSIGNED-PAYLOAD"]


def test_forwarder_timeout() -> None:
    """No response headers within request_timeout fails with BackendTimeout."""
    agent, clock = FakeAgent(), Clock()
    result = Forwarder(agent, clock, request_timeout=5).send(BACKEND, outgoing())
    failures: list[Failure] = []
    result.addErrback(failures.append)
    clock.advance(4.9)
    assert failures == []
    clock.advance(0.2)
    assert len(failures) == 1
    assert failures[0].check(BackendTimeout)
    assert clock.getDelayedCalls() == []


def test_forwarder_timeout_starts_after_body() -> None:
    """The timeout counts from the end of a streamed body, not from the request start."""
    agent, clock = FakeAgent(), Clock()
    source = Source()
    body = StreamingBody(3, source.pause, source.resume)
    result = Forwarder(agent, clock, request_timeout=5).send(BACKEND, outgoing(body))
    clock.advance(100)
    assert not result.called
    body.startProducing(Consumer())
    body.write(b"abc")
    body.finish()
    clock.advance(5.1)
    failures: list[Failure] = []
    result.addErrback(failures.append)
    assert failures[0].check(BackendTimeout)


def test_forwarder_response_cancels_timer() -> None:
    """A response in time leaves no delayed call behind."""
    agent, clock = FakeAgent(), Clock()
    result = Forwarder(agent, clock, request_timeout=5).send(BACKEND, outgoing())
    agent.requests[0][4].callback("response")
    assert result.called
    assert clock.getDelayedCalls() == []


def test_forwarder_cancel_is_not_timeout() -> None:
    """A cancellation by the gateway stays a CancelledError."""
    agent, clock = FakeAgent(), Clock()
    result = Forwarder(agent, clock, request_timeout=5).send(BACKEND, outgoing())
    failures: list[Failure] = []
    result.addErrback(failures.append)
    result.cancel()
    assert failures[0].check(CancelledError)


def test_forwardable_headers() -> None:
    """Hop-by-hop, signature and Connection-listed headers are dropped; repeats joined."""
    headers = [
        (b"Host", [b"proxy"]),
        (b"Connection", [b"keep-alive, X-Private"]),
        (b"X-Private", [b"secret"]),
        (b"Authorization", [b"AWS4-HMAC-SHA256 ..."]),
        (b"Content-Length", [b"3"]),
        (b"Expect", [b"100-continue"]),
        (b"X-Amz-Meta-A", [b"1", b"2"]),
        (b"x-amz-date", [b"20240101T000000Z"]),
        (b"Content-Type", [b"text/plain"]),
    ]
    result = forwardable_headers(headers, {"x-amz-date"})
    assert result == [("x-amz-meta-a", "1,2"), ("content-type", "text/plain")]


def test_response_headers_restore_length() -> None:
    """Content-Length comes from response.length, hop-by-hop headers are dropped."""

    class Response:
        headers = Headers({b"ETag": [b'"abc"'], b"Connection": [b"close"]})
        length = 42

    result = dict(response_headers(Response(), "GET"))
    assert result[b"Content-Length"] == [b"42"]
    assert result[b"ETag"] == [b'"abc"']
    assert b"Connection" not in result


def test_response_headers_head_keeps_length() -> None:
    """For HEAD, the backend's Content-Length is kept as sent."""

    class Response:
        headers = Headers({b"Content-Length": [b"1000"]})
        length = 0

    result = dict(response_headers(Response(), "HEAD"))
    assert result[b"Content-Length"] == [b"1000"]


def test_relay_registers_producer() -> None:
    """The relay registers the backend connection as producer and ends on ResponseDone."""
    written: list[bytes] = []
    registered: list[Any] = []
    relay = ResponseRelay(
        written.append,
        lambda producer, streaming: registered.append(producer),
        lambda: registered.append(None),
        capture_limit=3,
    )
    transport = StringTransport()
    relay.makeConnection(transport)
    relay.dataReceived(b"hello")
    relay.connectionLost(Failure(ResponseDone()))
    assert registered == [transport, None]
    assert written == [b"hello"]
    assert relay.captured == b"hel"
    assert relay.done.called


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BackendTimeout(5), 504),
        (ResponseFailed([Failure(ConnectionResetError())]), 502),
    ],
)
def test_describe_failure(error: Exception, status: int) -> None:
    """Timeouts map to 504 and broken connections to 502."""
    assert describe_failure(Failure(error))[0] == status
