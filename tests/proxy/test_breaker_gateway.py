"""Tests for proxy.gateway found by driving the proxy with real clients: aborts, memory.

The gateway runs on a StringTransport with a task.Clock, and a fake forwarder hands out
Deferreds that the test fires, as in test_gateway.py.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from proxy.config import parse_config
from proxy.gateway import Gateway, GatewayChannel, GatewayFactory
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


class OpenResponse:
    """A backend response whose body stays open until the test ends it."""

    code = 200
    phrase = b"OK"
    length = 100

    def __init__(self) -> None:
        self.headers = Headers()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"partial")


def make_gateway() -> tuple[GatewayChannel, Gateway, FakeForwarder, RecordingPool, Clock]:
    """Build a gateway with one backend on an in-memory client connection."""
    config = parse_config(
        {
            "server": {"listen": "tcp:9000:interface=127.0.0.1"},
            "metrics": {"listen": ""},
            "users": [{"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}],
            "backends": [
                {
                    "id": "one",
                    "endpoint": "http://127.0.0.1:1",
                    "access_key": "a",
                    "secret_key": "b",
                }
            ],
        }
    )
    clock = Clock()
    clock.advance(NOW)
    forwarder = FakeForwarder()
    pool = RecordingPool(config.backends)
    gateway = Gateway(config, FakeMetrics(), forwarder, pool, clock)  # type: ignore[arg-type]
    channel = GatewayFactory(gateway, idle_timeout=None).buildProtocol(None)
    channel.makeConnection(StringTransport())
    return channel, gateway, forwarder, pool, clock


def signed_head(method: str, path: str, sha256: str, clock: Clock, length: int | None) -> bytes:
    """Return the request line and SigV4-signed headers of one request."""
    headers = sign_request(
        method,
        f"http://{HOST}{path}",
        {"host": HOST},
        sha256,
        ACCESS_KEY,
        SECRET_KEY,
        "us-east-1",
        clock.seconds(),
    )
    if length is not None:
        headers["Content-Length"] = str(length)
    head = f"{method} {path} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n"


def start_download() -> tuple[GatewayChannel, Gateway, RecordingPool, OpenResponse]:
    """Send a signed GET and let the backend start its response body."""
    channel, gateway, forwarder, pool, clock = make_gateway()
    channel.dataReceived(signed_head("GET", "/bucket/key", EMPTY_SHA256, clock, None))

    response = OpenResponse()
    forwarder.attempts[0].callback(response)
    return channel, gateway, pool, response


def test_abort_mid_download_reports_backend() -> None:
    """After a client abort, the end of the backend body is reported, ending its in_flight."""
    channel, gateway, pool, response = start_download()

    channel.connectionLost(Failure(net_error.ConnectionLost()))
    # The Agent ends the body this way once the relay stopped the backend connection.
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(net_error.ConnectionLost())])))

    assert pool.reports == [("one", "neutral")]


def test_buffered_body_held_once() -> None:
    """While a buffered upload waits for its backend, the proxy keeps one copy of its body."""
    size = 4 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)
    head = signed_head(
        "PUT", "/bucket/key", hashlib.sha256(body).hexdigest(), make_gateway()[4], size
    )
    chunks = [body[i : i + 65536] for i in range(0, size, 65536)]

    tracemalloc.start()
    try:
        channel, gateway, forwarder, pool, clock = make_gateway()
        before = tracemalloc.get_traced_memory()[0]
        channel.dataReceived(head)
        for chunk in chunks:
            channel.dataReceived(chunk)
        retained_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert len(forwarder.attempts) == 1
    assert retained_bytes < size * 1.5


def test_oversized_headers_reason_phrase() -> None:
    """A 431 status line carries its standard reason phrase."""
    channel = make_gateway()[0]
    transport: Any = channel.transport

    channel.dataReceived(b"GET / HTTP/1.1\r\nx-filler: " + b"a" * 20000 + b"\r\n\r\n")

    assert transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_missing_host_is_400() -> None:
    """An HTTP/1.1 request without a Host header gets 400 and reaches no backend."""
    channel, gateway, forwarder, pool, clock = make_gateway()
    transport: Any = channel.transport

    channel.dataReceived(b"GET /bucket/key HTTP/1.1\r\n\r\n")

    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert b"<Code>BadRequest</Code>" in transport.value()
    assert forwarder.attempts == []
