"""Tests for proxy.gateway in memory: retries, failures, client aborts and metrics.

The gateway runs on a StringTransport with a task.Clock. The forwarder is a fake that hands
out Deferreds which the test fires, so every step is driven by hand.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet import error as net_error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from proxy.config import Config, parse_config
from proxy.gateway import Gateway, GatewayChannel, GatewayFactory, StaticBackendPool
from proxy.sigv4 import sign_request
from tests.support.gateway import (
    ACCESS_KEY,
    EMPTY_SHA256,
    HOST,
    NOW,
    SECRET_KEY,
    FakeForwarder,
    FakeMetrics,
    RecordingPool,
)


class FakeResponse:
    """A backend response whose body is delivered at once."""

    def __init__(
        self, code: int, body: bytes = b"", headers: dict[bytes, bytes] | None = None
    ) -> None:
        self.code = code
        self.phrase = b"Phrase"
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = len(body)
        self.body = body
        self.stopped = False

    def deliverBody(self, protocol: Any) -> None:
        transport = StringTransport()
        protocol.makeConnection(transport)
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


def make_config(**server: Any) -> Config:
    return parse_config(
        {
            "server": {"listen": "tcp:9000:interface=127.0.0.1", **server},
            "metrics": {"listen": ""},
            "users": [{"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}],
            "backends": [
                {
                    "id": "one",
                    "endpoint": "http://127.0.0.1:1",
                    "access_key": "a",
                    "secret_key": "b",
                },
                {
                    "id": "two",
                    "endpoint": "http://127.0.0.1:2",
                    "access_key": "a",
                    "secret_key": "b",
                },
            ],
        }
    )


@dataclass
class Harness:
    clock: Clock
    metrics: FakeMetrics
    forwarder: FakeForwarder
    pool: Any
    transport: StringTransport
    channel: GatewayChannel

    def send(self, method: str, path: str, body: bytes = b"", sha256: str = EMPTY_SHA256) -> None:
        """Sign and send one request on the connection."""
        headers = sign_request(
            method,
            f"http://{HOST}{path}",
            {"host": HOST},
            sha256,
            ACCESS_KEY,
            SECRET_KEY,
            "us-east-1",
            self.clock.seconds(),
        )
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.channel.dataReceived(head.encode("latin-1") + b"\r\n" + body)

    def output(self) -> bytes:
        return self.transport.value()

    def requests(self) -> Counter[tuple[str, ...]]:
        return self.metrics.requests_total.values

    def attempts(self) -> Counter[tuple[str, ...]]:
        return self.metrics.backend_requests_total.values


def harness(pool_kind: str = "recording", **server: Any) -> Harness:
    config = make_config(**server)
    clock = Clock()
    clock.advance(NOW)
    metrics = FakeMetrics()
    forwarder = FakeForwarder()
    pool: Any = (
        RecordingPool(config.backends)
        if pool_kind == "recording"
        else StaticBackendPool(config.backends)
    )
    gateway = Gateway(
        config,
        metrics,
        forwarder,
        pool,
        clock,
        new_request_id=lambda: "REQUESTID",  # type: ignore[arg-type]
    )
    channel = GatewayFactory(gateway, idle_timeout=None).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return Harness(clock, metrics, forwarder, pool, transport, channel)


def test_retry_after_connection_refused() -> None:
    """A refused first backend is retried on the second, and both attempts are counted."""
    h = harness()
    h.send("GET", "/bucket/key")
    h.forwarder.sent[0][2].errback(Failure(net_error.ConnectionRefusedError()))
    h.forwarder.sent[1][2].callback(FakeResponse(200, b"data"))
    assert h.output().startswith(b"HTTP/1.1 200 ")
    assert h.output().endswith(b"data")
    assert h.attempts() == Counter(
        {("one", "get_object", "error"): 1, ("two", "get_object", "200"): 1}
    )
    assert h.requests() == Counter({("get_object", "200"): 1})
    assert h.pool.reports == [("one", "failure"), ("two", "success")]


def test_retry_after_503() -> None:
    """A 503 from the first backend is retried; the client receives only the second response."""
    h = harness()
    h.send("HEAD", "/bucket/key")
    h.forwarder.sent[0][2].callback(FakeResponse(503, b"busy"))
    h.forwarder.sent[1][2].callback(FakeResponse(200, headers={b"content-length": b"1234"}))
    assert h.output().startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 1234\r\n" in h.output()
    assert h.requests() == Counter({("head_object", "200"): 1})
    assert h.attempts()[("one", "head_object", "503")] == 1


def test_last_failure_is_502() -> None:
    """When every planned backend fails, the client gets 502 BadGateway as S3 XML."""
    h = harness()
    h.send("GET", "/bucket/key")
    for _, _, attempt in list(h.forwarder.sent):
        attempt.errback(Failure(net_error.ConnectionRefusedError()))
    h.forwarder.sent[1][2].errback(Failure(net_error.ConnectionRefusedError()))
    assert h.output().startswith(b"HTTP/1.1 502 ")
    assert b"<Code>BadGateway</Code>" in h.output()
    assert h.requests() == Counter({("get_object", "502"): 1})


def test_timeout_is_504() -> None:
    """A response timeout from the forwarder becomes 504 GatewayTimeout."""
    from proxy.forward import BackendTimeout

    h = harness(pool_kind="static")
    h.send("GET", "/bucket/key")
    h.forwarder.sent[0][2].errback(Failure(BackendTimeout(5.0)))
    assert h.output().startswith(b"HTTP/1.1 504 ")
    assert b"<Code>GatewayTimeout</Code>" in h.output()
    assert h.requests() == Counter({("get_object", "504"): 1})


def test_empty_plan_is_503() -> None:
    """No backend to try gives 503 ServiceUnavailable with Retry-After."""
    h = harness()
    h.pool.backends = []
    h.send("GET", "/bucket/key")
    assert h.output().startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1\r\n" in h.output()
    assert h.forwarder.sent == []
    assert h.requests() == Counter({("get_object", "503"): 1})


def test_streamed_body_not_retried() -> None:
    """A body larger than retry_body_max_bytes is streamed, so a failure is not retried."""
    h = harness(retry_body_max_bytes=0)
    h.send("PUT", "/bucket/key", b"body", sha256="UNSIGNED-PAYLOAD")
    assert len(h.forwarder.sent) == 1
    h.forwarder.sent[0][2].errback(Failure(net_error.ConnectionRefusedError()))
    assert len(h.forwarder.sent) == 1
    assert h.output().startswith(b"HTTP/1.1 502 ")
    assert h.requests() == Counter({("put_object", "502"): 1})


def test_buffered_body_retried() -> None:
    """A buffered body is sent again, whole, to the next backend."""
    h = harness()
    h.send("PUT", "/bucket/key", b"body", sha256="UNSIGNED-PAYLOAD")
    h.forwarder.sent[0][2].errback(Failure(net_error.ConnectionRefusedError()))
    second = h.forwarder.sent[1][1].body
    assert second is not None
    assert second.length == 4
    h.forwarder.sent[1][2].callback(FakeResponse(200))
    assert h.requests() == Counter({("put_object", "200"): 1})


def test_client_abort_cancels_backend() -> None:
    """A client that leaves before the response is counted as 499 and its attempt cancelled."""
    h = harness(pool_kind="static")
    h.send("GET", "/bucket/key")
    attempt = h.forwarder.sent[0][2]
    h.channel.connectionLost(Failure(net_error.ConnectionDone()))
    assert attempt.called
    assert h.requests() == Counter({("get_object", "499"): 1})
    assert h.attempts() == Counter({("one", "get_object", "error"): 1})


def test_complete_upload_error_in_200() -> None:
    """A 200 CompleteMultipartUpload with an <Error> body counts as that error's status."""
    h = harness(pool_kind="static")
    body = b"  \n<Error><Code>InternalError</Code><Message>x</Message></Error>"
    # Upload IDs carry the id of the backend that issued them.
    h.send("POST", "/bucket/key?uploadId=one~abc", b"<x/>", sha256="UNSIGNED-PAYLOAD")
    h.forwarder.sent[0][2].callback(FakeResponse(200, body))
    assert h.output().startswith(b"HTTP/1.1 200 ")
    assert h.output().endswith(body)
    assert h.requests() == Counter({("complete_multipart_upload", "500"): 1})
    assert h.attempts() == Counter({("one", "complete_multipart_upload", "500"): 1})


def test_auth_failure_counted_once() -> None:
    """A request with a bad signature gets 403, is counted once, and never forwarded."""
    h = harness()
    h.channel.dataReceived(
        b"GET /bucket/key HTTP/1.1\r\nhost: x\r\nauthorization: AWS4-HMAC-SHA256 "
        b"Credential=client/20231114/us-east-1/s3/aws4_request, SignedHeaders=host, "
        b"Signature=00\r\nx-amz-date: 20231114T221320Z\r\nx-amz-content-sha256: "
        + EMPTY_SHA256.encode()
        + b"\r\n\r\n"
    )
    assert h.output().startswith(b"HTTP/1.1 403 ")
    assert h.forwarder.sent == []
    assert sum(h.requests().values()) == 1


def test_latency_from_clock() -> None:
    """Latency is measured with the injected clock."""
    h = harness(pool_kind="static")
    h.send("GET", "/bucket/key")
    h.clock.advance(2.5)
    h.forwarder.sent[0][2].callback(FakeResponse(200, b"x"))
    assert h.metrics.request_latency_seconds.observed == [(("get_object",), 2.5)]


def test_persistent_connection_serves_two() -> None:
    """Two requests on one connection both get responses and are counted."""
    h = harness(pool_kind="static")
    h.send("GET", "/bucket/a")
    h.forwarder.sent[0][2].callback(FakeResponse(200, b"first"))
    h.send("GET", "/bucket/b")
    h.forwarder.sent[1][2].callback(FakeResponse(404, b"<Error/>"))
    assert h.output().count(b"HTTP/1.1 ") == 2
    assert h.requests() == Counter({("get_object", "200"): 1, ("get_object", "404"): 1})


@pytest.mark.parametrize(
    ("request_line", "status"),
    [(b"OPTIONS / HTTP/1.1", 405), (b"BREW /b HTTP/1.1", 501)],
)
def test_unsupported_method(request_line: bytes, status: int) -> None:
    """Methods S3 does not serve are answered without a signature check."""
    h = harness()
    h.channel.dataReceived(request_line + b"\r\nhost: x\r\n\r\n")
    assert h.output().startswith(b"HTTP/1.1 %d " % status)
    assert b"X-Amz-Request-Id: REQUESTID\r\n" in h.output()
    assert h.requests() == Counter({("other", str(status)): 1})


def test_oversized_headers_431() -> None:
    """Headers over max_header_bytes get 431 with request ids, counted as other."""
    h = harness(max_header_bytes=1024)
    h.channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"x-filler: " + b"a" * 600 + b"\r\n" * 1)
    h.channel.dataReceived(b"x-more: " + b"b" * 600 + b"\r\n\r\n")
    assert h.output().startswith(b"HTTP/1.1 431 ")
    assert b"x-amz-request-id: REQUESTID\r\n" in h.output()
    assert b"x-amz-id-2: " in h.output()
    assert h.requests() == Counter({("other", "431"): 1})
    assert h.transport.disconnecting


def test_virtual_host_forwarded_path_style() -> None:
    """A virtual-hosted request goes to the backend path-style, with the bucket in the path."""
    h = harness(pool_kind="static", virtual_host_suffixes=["s3.local"])
    headers = sign_request(
        "GET",
        "http://bucket.s3.local:9000/dir/key?versionId=1",
        {"host": "bucket.s3.local:9000"},
        EMPTY_SHA256,
        ACCESS_KEY,
        SECRET_KEY,
        "us-east-1",
        h.clock.seconds(),
    )
    head = "GET /dir/key?versionId=1 HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    h.channel.dataReceived(head.encode("latin-1") + b"\r\n")
    assert h.forwarder.sent[0][1].target == b"/bucket/dir/key?versionId=1"
    h.forwarder.sent[0][2].callback(FakeResponse(200, b"v"))
    assert h.requests() == Counter({("get_object", "200"): 1})


def test_access_log_json() -> None:
    """With access_log_json, each request logs one JSON line without secrets."""
    import json

    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = harness(pool_kind="static", access_log_json=True)
        h.send("GET", "/bucket/key")
        h.forwarder.sent[0][2].callback(
            FakeResponse(200, b"x", headers={b"x-amz-request-id": b"BACKEND1"})
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e["access_json"] for e in events if "access_json" in e]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["operation"] == "get_object"
    assert record["status"] == 200
    assert record["request_id"] == "REQUESTID"
    assert record["backend_request_id"] == "BACKEND1"
    assert SECRET_KEY not in lines[0]


class OpenResponse(FakeResponse):
    """A backend response whose body stays open until the test ends it."""

    def deliverBody(self, protocol: Any) -> None:
        self.transport = StringTransport()
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        protocol.dataReceived(b"partial")


def test_client_abort_mid_download_stops_backend() -> None:
    """A client leaving during the body stops the backend connection and counts 499."""
    h = harness(pool_kind="static")
    h.send("GET", "/bucket/key")
    response = OpenResponse(200, b"x" * 100)
    h.forwarder.sent[0][2].callback(response)
    assert h.output().endswith(b"partial")
    h.channel.connectionLost(Failure(net_error.ConnectionLost()))
    assert response.transport.producerState == "stopped"
    assert h.requests() == Counter({("get_object", "499"): 1})


def test_backend_cut_off_closes_client() -> None:
    """A backend body cut off after the headers closes the client connection."""
    h = harness()
    h.send("GET", "/bucket/key")
    response = OpenResponse(200, b"x" * 100)
    h.forwarder.sent[0][2].callback(response)
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionResetError())])))
    assert h.transport.disconnecting
    h.channel.connectionLost(Failure(net_error.ConnectionDone()))
    assert h.requests() == Counter({("get_object", "200"): 1})
    assert h.pool.reports == [("one", "failure")]


def test_slow_head_gets_408() -> None:
    """A request head still incomplete after header_timeout gets 408, is counted, and closes."""
    h = harness(header_timeout=5.0)
    h.channel.dataReceived(b"GET /bucket/a HTTP/1.1\r\nHost: ")
    h.clock.advance(4.9)
    assert h.output() == b""
    h.clock.advance(0.2)
    assert h.output().startswith(b"HTTP/1.1 408 ")
    assert b"<Code>RequestTimeout</Code>" in h.output()
    assert h.transport.disconnecting
    assert h.requests() == Counter({("other", "408"): 1})
    assert h.clock.getDelayedCalls() == []


def test_bare_lf_head_times_out() -> None:
    """A head with bare LF line endings, which never completes a line, still times out."""
    h = harness(header_timeout=5.0)
    h.channel.dataReceived(b"GET /bucket/a HTTP/1.1\nHost: x\n\n")
    h.clock.advance(5.1)
    assert h.output().startswith(b"HTTP/1.1 408 ")


def test_complete_head_cancels_timeout() -> None:
    """A head that completes in time leaves no timer behind, and the request is served."""
    h = harness(pool_kind="static", header_timeout=5.0)
    h.send("GET", "/bucket/a")
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(60)
    h.forwarder.sent[0][2].callback(FakeResponse(200, b"late but fine"))
    assert h.output().startswith(b"HTTP/1.1 200 ")
    assert h.requests() == Counter({("get_object", "200"): 1})


def test_slow_response_not_cut_by_timeout() -> None:
    """Bytes of a next request that arrive while one is processed do not start the timer."""
    h = harness(pool_kind="static", header_timeout=5.0)
    h.send("GET", "/bucket/a")
    h.channel.dataReceived(b"GET /bucket/b HTTP/1.1\r\n")
    h.clock.advance(30)
    assert h.output() == b""
    h.forwarder.sent[0][2].callback(FakeResponse(200, b"first"))
    assert h.output().startswith(b"HTTP/1.1 200 ")
    assert b" 408 " not in h.output()


def test_lost_connection_cancels_timeout() -> None:
    """A connection that closes with a partial head leaves no timer behind."""
    h = harness(header_timeout=5.0)
    h.channel.dataReceived(b"GET /bucket/a HTTP/1.1\r\n")
    h.channel.connectionLost(Failure(net_error.ConnectionDone()))
    assert h.clock.getDelayedCalls() == []
