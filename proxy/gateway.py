"""
The S3 listener: one HTTP channel per client connection and one L{Exchange} per request.

A request goes through these steps, each a method of L{Exchange}:

1. L{Exchange.begin}, as soon as the request line and headers are in and before the body is
   accepted (no C{100 Continue} is sent for a request that is rejected here): name the
   operation, start the latency clock, check the method, verify the SigV4 signature and the
   declared size, and choose how the body travels.
2. L{Exchange.body_received} for each body chunk: the payload verifier releases verified
   bytes, which are either buffered (bodies up to C{retry_body_max_bytes}, so that another
   backend can get them again) or streamed to the backend while the client sends them.
3. L{Exchange.body_complete}: the verifier checks the end of the body.
4. L{Exchange.forward}: the cache seam, then the backend pool's plan, then one attempt per
   planned backend while a retry is allowed (see L{Exchange._may_retry}).
5. The backend response is relayed with its status, headers and body, streaming with
   backpressure.
6. L{Exchange.complete}: exactly once per request, C{requests_total} and
   C{request_latency_seconds} are recorded and one access log line is written.

Seams for later work: L{BackendPool} (the backend manager implements it) and the C{cache}
argument of L{Gateway}.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import UNKNOWN_LENGTH
from twisted.web.http_headers import Headers
from zope.interface import implementer

from proxy.affinity import REWRITTEN_OPERATIONS, AffinityError, rewrite_response, route_query
from proxy.cache import CacheRequest, Hit, Miss, ObjectCache
from proxy.cache import Outcome as CacheOutcome
from proxy.cache_invalidation import written_keys
from proxy.config import BackendConfig, Config
from proxy.errors import S3Error, error_status_in_body, render_error, service_unavailable
from proxy.forward import (
    BufferedBody,
    Clock,
    Forwarder,
    OutgoingRequest,
    ResponseRelay,
    StreamingBody,
    describe_failure,
    discard_body,
    forwardable_headers,
    response_headers,
)
from proxy.operations import RequestInfo, classify, parse_target
from proxy.sigv4 import AuthError, RequestAuth, verify_request

__all__ = [
    "BackendPool",
    "Exchange",
    "Gateway",
    "GatewayChannel",
    "GatewayFactory",
    "GatewayRequest",
    "StaticBackendPool",
]

Outcome = Literal["success", "failure", "neutral"]

# Methods S3 serves. Other methods that HTTP defines get 405, anything else 501.
_S3_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})
_HTTP_METHODS = frozenset({"OPTIONS", "PATCH", "TRACE", "CONNECT"})

# Backend statuses after which another backend may be tried.
_RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})

# After a request was rejected while its body was still arriving, at most this many further
# body bytes are read and dropped before the connection is closed. Reading a little lets the
# client receive the error instead of a connection reset.
_DRAIN_LIMIT = 1024 * 1024

# CompleteMultipartUpload may report an error inside a 200 body; this many leading bytes are
# kept to find it.
_CAPTURE_LIMIT = 64 * 1024

# Reason phrases missing from twisted.web.http.RESPONSES (Twisted 26.10 has no 431, RFC 6585).
_EXTRA_REASONS = {431: b"Request Header Fields Too Large"}


class BackendPool(Protocol):
    """
    The routing of requests to backends. The backend manager implements it, and
    L{StaticBackendPool} is the simplest implementation.
    """

    def plan(self, info: RequestInfo) -> list[BackendConfig]:
        """
        Return the backends to try for one request, in order; the first gets the request.

        The gateway tries the next one only when the previous attempt failed before any byte
        reached the client and the request body can be sent again. An empty list makes the
        gateway respond with 503 C{ServiceUnavailable} with C{Retry-After}.
        """
        ...

    def report(self, backend_id: str, outcome: Outcome, reason: str) -> None:
        """
        Record the outcome of one attempt: C{"failure"} for connection errors, timeouts and
        5xx responses, C{"success"} for other responses, C{"neutral"} for 4xx responses and
        clients that went away.
        """
        ...

    def attempt_started(self, backend_id: str) -> None:
        """Count one attempt as in flight until its L{report}."""
        ...


class StaticBackendPool:
    """A pool that sends every request to the first configured backend."""

    def __init__(self, backends: Sequence[BackendConfig]) -> None:
        if not backends:
            raise ValueError("StaticBackendPool needs at least one backend")
        self._first = backends[0]

    def plan(self, info: RequestInfo) -> list[BackendConfig]:
        return [self._first]

    def report(self, backend_id: str, outcome: Outcome, reason: str) -> None:
        pass

    def attempt_started(self, backend_id: str) -> None:
        pass


def _random_request_id() -> str:
    return os.urandom(8).hex().upper()


class Gateway:
    """
    What all requests share: configuration, metrics, the forwarder and the backend pool.

    @param metrics: the C{Metrics} of C{collector.open_monitoring}.
    @param clock: measures latency and is the signing time of SigV4 checks.
    @param cache: the object cache, consulted by L{Exchange.answer_from_cache} and told about
        every write; L{None} means every GET goes to a backend.
    @param new_request_id: returns a fresh request id; injectable for tests.
    """

    def __init__(
        self,
        config: Config,
        metrics: Any,
        forwarder: Forwarder,
        pool: BackendPool,
        clock: Clock,
        cache: ObjectCache | None = None,
        new_request_id: Callable[[], str] = _random_request_id,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.forwarder = forwarder
        self.pool = pool
        self.clock = clock
        self.cache = cache
        self.new_request_id = new_request_id
        self.users = {user.access_key: user.secret_key for user in config.users}
        self.backend_ids = frozenset(backend.id for backend in config.backends)
        self.in_flight = 0
        self.draining = False
        self._drain_waiters: list[Deferred[None]] = []

    def request_started(self) -> None:
        """Count one request as in flight until L{request_finished}."""
        self.in_flight += 1

    def request_finished(self) -> None:
        """Count one request as finished; fires the L{drain} Deferreds at zero."""
        self.in_flight -= 1
        if self.in_flight <= 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self) -> Deferred[None]:
        """
        Stop keep-alive and return a Deferred that fires when no request is in flight.

        From now on a connection closes once its request completes, so clients send no
        further request on it while the process stops. Idle keep-alive connections stay
        open until the reactor stops. The Deferred never fails.
        """
        self.draining = True
        waiter: Deferred[None] = Deferred()
        if self.in_flight <= 0:
            waiter.callback(None)
        else:
            self._drain_waiters.append(waiter)
        return waiter

    def record(self, operation: str, code: str, seconds: float) -> None:
        """Record one client request in C{requests_total} and C{request_latency_seconds}."""
        self.metrics.requests_total.labels(operation, code).inc()
        self.metrics.request_latency_seconds.labels(operation).observe(seconds)

    def record_attempt(self, backend_id: str, operation: str, code: str) -> None:
        """Record one backend attempt; C{code} is the status or C{"error"}."""
        self.metrics.backend_requests_total.labels(backend_id, operation, code).inc()


class GatewayRequest(http.Request):
    """
    An HTTP request whose body is never stored by Twisted: it goes to its L{Exchange}.

    L{headersReceived} is called by L{GatewayChannel} once the headers are complete, before
    any body byte is read.
    """

    exchange: Exchange | None = None

    def gotLength(self, length: int | None) -> None:
        # The base class would create a temporary file for the body here.
        self.content = None

    def headersReceived(
        self, command: bytes, path: bytes, version: bytes, length: int | None
    ) -> bool:
        """
        Start the exchange for this request.

        @param length: the C{Content-Length}, L{None} for a chunked body, 0 for none.
        @return: whether the body is wanted (so C{100 Continue} may be sent).
        """
        self.method = command
        self.uri = path
        self.path = path.split(b"?", 1)[0]
        self.clientproto = version
        self.args = {}
        channel: Any = self.channel
        self.exchange = Exchange(channel.gateway, self, length)
        return self.exchange.begin()

    def handleContentChunk(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body_received(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The base class parses arguments from self.content; the exchange does the work.
        if self.exchange is not None:
            self.exchange.body_complete()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.exchange is not None:
            self.exchange.client_lost(reason)


class GatewayChannel(http.HTTPChannel):
    """
    The HTTP/1.1 server protocol of the S3 listener.

    Differences from C{HTTPChannel}: headers over C{max_header_bytes} get 431, malformed
    requests get an S3 XML 400, and a head still incomplete after C{header_timeout} gets 408.
    The request receives its headers before C{100 Continue} is sent, and requests are counted
    even when they fail before the headers are complete.
    """

    requestFactory = GatewayRequest
    _log = Logger()

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.totalHeadersSize = gateway.config.server.max_header_bytes
        self.MAX_LENGTH = gateway.config.server.max_header_bytes
        self.closing = False
        self._head_deadline: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        # The idle timeout restarts with every byte, so a client that sends a head slowly, or
        # never ends a line, would keep the connection. A head must be complete in time.
        if self.line_mode and not self._handlingRequest and self._head_deadline is None:
            self._head_deadline = self.gateway.clock.callLater(
                self.gateway.config.server.header_timeout, self._head_timed_out
            )
        super().dataReceived(data)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._handlingRequest:
            return
        timeout = self.gateway.config.server.header_timeout
        self.reject(408, "RequestTimeout", f"the request head was not complete within {timeout} s")

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            if self._head_deadline.active():
                self._head_deadline.cancel()
            self._head_deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_deadline()
        super().connectionLost(reason)

    def lineReceived(self, line: bytes) -> None:
        if self.closing:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.reject(431, "RequestHeaderSectionTooLarge", "the request headers are too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reject(431, "RequestHeaderSectionTooLarge", "a request header line is too long")

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.reject(400, "BadRequest", "the request is not valid HTTP/1.1")

    def rawDataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        request: Any = self.requests[-1]
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        wanted = request.headersReceived(self._command, self._path, self._version, self.length)
        expect = request.requestHeaders.getRawHeaders(b"Expect")
        if (
            wanted
            and expect
            and expect[0].lower() == b"100-continue"
            and self._version == b"HTTP/1.1"
        ):
            self._send100Continue()

    def reject(self, status: int, code: str, message: str) -> None:
        """
        Respond to a request that cannot be parsed with an S3 error and close the connection.

        A request whose exchange has started is failed through it; otherwise the error is
        written directly and counted as operation C{other}.
        """
        if self.closing:
            return
        self.closing = True
        exchange = self.requests[-1].exchange if self.requests else None
        if exchange is not None and not exchange.completed:
            exchange.fail(S3Error(code, message, status), close=True)
            return

        gateway = self.gateway
        request_id = gateway.new_request_id()
        body = render_error(code, message, "", request_id)
        reason = _EXTRA_REASONS.get(status) or http.RESPONSES.get(status, b"Error")
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: application/xml\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n",
            b"x-amz-request-id: " + request_id.encode("ascii") + b"\r\n",
            b"x-amz-id-2: " + _host_id(request_id) + b"\r\n",
            b"\r\n",
        ]
        transport: Any = self.transport
        transport.writeSequence([*head, body])
        transport.loseConnection()
        gateway.record("other", str(status), 0.0)
        self._log.info(
            "rejected request {request_id}: {status} {code}: {message}",
            request_id=request_id,
            status=status,
            code=code,
            message=message,
        )


@implementer(IProtocolNegotiationFactory)
class GatewayFactory(ServerFactory):
    """
    Builds a L{GatewayChannel} per client connection.

    It offers C{http/1.1} over ALPN: with no protocol to offer, a TLS listener of Twisted
    26.10 with pyOpenSSL 26 fails the handshake of every client that sends ALPN, as urllib3
    (and so boto3) does.
    """

    def __init__(self, gateway: Gateway, idle_timeout: float | None = 300.0) -> None:
        self.gateway = gateway
        self.idle_timeout = idle_timeout

    def buildProtocol(self, addr: Any) -> GatewayChannel:
        channel = GatewayChannel(self.gateway)
        channel.factory = self
        channel.timeOut = self.idle_timeout  # type: ignore[assignment]  # None disables it
        channel.callLater = self.gateway.clock.callLater  # type: ignore[method-assign,assignment]
        return channel

    def log(self, request: http.Request) -> None:
        """Write nothing: L{Exchange.complete} writes the access log line."""

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


class Exchange:
    """
    One client request from its headers to the last byte of its response.

    State is kept in plain attributes: C{auth} after a successful signature check,
    C{body_mode} (C{"none"}, C{"buffered"} or C{"streaming"}), C{status} once a response
    started, and C{completed} once it was counted.
    """

    _log = Logger()

    def __init__(self, gateway: Gateway, request: GatewayRequest, length: int | None) -> None:
        self.gateway = gateway
        self.request = request
        self.length = length
        self.request_id = gateway.new_request_id()
        self.started = gateway.clock.seconds()
        self.method = request.method.decode("latin-1")
        self.operation = "other"
        self.bucket: str | None = None
        self.virtual_host = False
        self.key: str | None = None
        self.auth: RequestAuth | None = None
        self.verifier: Any = None
        self.body_mode = "none"
        self.buffer: list[bytes] = []
        self.buffered_bytes = 0
        self.streaming_body: StreamingBody | None = None
        self.body_done = False
        self.drained_bytes = 0
        self.forwarding = False
        self.plan: list[BackendConfig] = []
        self.attempt: Deferred[Any] | None = None
        self.relay: ResponseRelay | None = None
        self.status: int | None = None
        self.metric_status: int | None = None
        self.response_sent = False
        self.completed = False
        self.failed_request = False
        self.backend_id: str | None = None
        self.backend_request_id: str | None = None
        self.pinned_backend: str | None = None
        self.rewrite_buffer: list[bytes] | None = None
        self.forward_target = b""
        self.expects_body = length != 0
        self.body_wanted = False
        self.cache_lookup: Deferred[CacheOutcome] | None = None
        self.cache_fill: Any = None
        self.cache_backend_headers: dict[str, str] = {}
        self.invalidated_keys: list[str] | None = []
        # The request drops its channel when it finishes; complete() still needs it.
        self.channel: Any = request.channel
        gateway.request_started()

    # Step 1: headers.

    def begin(self) -> bool:
        """
        Check the request before its body is read.

        @return: whether the body is wanted; after a rejection the error response is already
            being sent.
        """
        request = self.request
        path, _, query = request.uri.partition(b"?")
        target = parse_target(
            path,
            request.getHeader(b"host"),
            self.gateway.config.server.virtual_host_suffixes,
        )
        self.bucket, self.key = target.bucket, target.key
        self.virtual_host = target.virtual_host
        self.operation = classify(
            request.method, target, query, request.requestHeaders.hasHeader(b"x-amz-copy-source")
        )

        try:
            self._check_method()
            self._check_host()
            self.auth = verify_request(
                self.method,
                request.uri,
                request.requestHeaders,
                self.gateway.users,
                now=self.gateway.clock.seconds(),
                region=self.gateway.config.server.region,
            )
            self.verifier = self.auth.payload_verifier()
            self._route_affinity()
            self._choose_body_mode()
        except AuthError as err:
            self.fail(S3Error(err.code, err.message, err.status))
            return False
        except AffinityError as err:
            self.fail(S3Error(err.code, str(err), err.status))
            return False
        except S3Error as err:
            self.fail(err)
            return False

        self.body_wanted = True
        if self.body_mode == "streaming":
            self.forward()
        return True

    def _check_host(self) -> None:
        # RFC 9112 section 3.2: an HTTP/1.1 request without Host gets 400.
        request = self.request
        if request.clientproto == b"HTTP/1.1" and not request.requestHeaders.hasHeader(b"host"):
            raise S3Error(
                "BadRequest", "the request has no Host header; HTTP/1.1 requires one", 400
            )

    def _check_method(self) -> None:
        if self.method in _S3_METHODS:
            return
        if self.method in _HTTP_METHODS:
            raise S3Error(
                "MethodNotAllowed",
                f"the method {self.method} is not allowed against this resource",
                405,
                headers={"Allow": "GET, HEAD, PUT, POST, DELETE"},
            )
        raise S3Error("NotImplemented", "the request method is not implemented", 501)

    def _route_affinity(self) -> None:
        """
        Find the backend that an upload ID or continuation token names, and strip the prefix
        that the proxy added to it from the target sent to the backend.

        @raise AffinityError: a token names no configured backend.
        """
        assert self.auth is not None
        path, mark, query = self.auth.forward_target.partition(b"?")
        pinned, stripped = route_query(query.decode("latin-1"), self.gateway.backend_ids)
        self.pinned_backend = pinned
        if self.virtual_host and self.bucket is not None:
            # Backends get path-style requests, because the Host header names the backend.
            path = b"/" + self.bucket.encode("ascii", "replace") + path
        self.forward_target = path + mark + stripped.encode("latin-1")

    def _declared_body_length(self) -> int | None:
        assert self.auth is not None
        if self.auth.is_aws_chunked:
            return self.auth.decoded_content_length
        return self.length

    def _choose_body_mode(self) -> None:
        server = self.gateway.config.server
        declared = self._declared_body_length()
        if declared is not None and declared > server.max_object_size:
            raise _entity_too_large(declared, server.max_object_size)
        if self.length == 0:
            self.body_mode = "none"
        elif declared is not None and declared <= server.retry_body_max_bytes:
            self.body_mode = "buffered"
        else:
            channel = self.request.channel
            self.body_mode = "streaming"
            self.streaming_body = StreamingBody(
                declared if declared is not None else UNKNOWN_LENGTH,
                pause_source=lambda: _pause(channel),
                resume_source=lambda: _resume(channel),
            )

    # Steps 2 and 3: the body.

    def body_received(self, data: bytes) -> None:
        """Pass one chunk of the request body (as received) through the verifier."""
        if self.response_sent or self.failed_request:
            self._drain(len(data))
            return
        try:
            verified = self.verifier.feed(data)
            self._check_received_size()
        except AuthError as err:
            self.fail(S3Error(err.code, err.message, err.status))
            return
        except S3Error as err:
            self.fail(err)
            return

        if self.body_mode == "buffered":
            self.buffer.append(verified)
            self.buffered_bytes += len(verified)
        elif self.streaming_body is not None:
            self.streaming_body.write(verified)

    def _check_received_size(self) -> None:
        server = self.gateway.config.server
        received = self.verifier.decoded_length
        if received > server.max_object_size:
            raise _entity_too_large(received, server.max_object_size)
        declared = self._declared_body_length()
        if declared is not None and received > declared:
            raise S3Error(
                "IncompleteBody",
                f"the body has more than the declared {declared} bytes",
                400,
            )

    def body_complete(self) -> None:
        """Check the end of the body, then forward the request or finish an early response."""
        self.body_done = True
        if self.response_sent or self.failed_request:
            self._finish_when_body_done()
            return
        try:
            tail = self.verifier.finish()
        except AuthError as err:
            self.fail(S3Error(err.code, err.message, err.status))
            return

        if self.body_mode == "streaming":
            assert self.streaming_body is not None
            self.streaming_body.write(tail)
            self.streaming_body.finish()
            return
        if self.body_mode == "buffered":
            # One joined copy replaces the received chunks, so that every later join (for
            # each attempt and for cache invalidation) returns it instead of copying again.
            self.buffer = [b"".join([*self.buffer, tail])]
        self.forward()

    def _drain(self, size: int) -> None:
        self.drained_bytes += size
        if self.drained_bytes > _DRAIN_LIMIT:
            self._close_client()

    # Step 4: forwarding.

    def forward(self) -> None:
        """Answer from the cache, or plan the backends and send the first attempt."""
        assert self.auth is not None
        self.forwarding = True
        info = RequestInfo(
            request_id=self.request_id,
            method=self.method,
            operation=self.operation,
            bucket=self.bucket,
            key=self.key,
            replayable=self.body_mode != "streaming",
            backend_id=self.pinned_backend,
        )
        self._invalidate_written_keys()
        if self.answer_from_cache(info):
            return
        self._send_to_backends(info)

    def _send_to_backends(self, info: RequestInfo) -> None:
        self.plan = list(self.gateway.pool.plan(info))
        if not self.plan:
            self.fail(service_unavailable("no backend is available; retry later"))
            return
        self._send_attempt(0)

    def answer_from_cache(self, info: RequestInfo) -> bool:
        """
        Hand a GetObject or HeadObject request to the object cache; return False without one.

        The lookup fires later when the request waits for another request's fill of the same
        object. A hit is written with L{respond_with}; a miss goes to the backends with the
        cache's fill copying the response; a request the cache does not take goes to the
        backends unchanged.
        """
        cache = self.gateway.cache
        if cache is None or self.bucket is None or self.key is None:
            return False
        if self.operation not in ("get_object", "head_object"):
            return False
        assert self.auth is not None
        request = CacheRequest.from_request(self.request, self.bucket, self.key)
        lookup = cache.lookup(self.auth, request)
        self.cache_lookup = lookup
        lookup.addCallbacks(lambda outcome: self._cache_decided(info, outcome), self._cache_gone)
        lookup.addErrback(self._bug)
        return True

    def _cache_decided(self, info: RequestInfo, outcome: CacheOutcome) -> None:
        self.cache_lookup = None
        if isinstance(outcome, Miss):
            self.cache_fill = outcome.fill
            self.cache_backend_headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in outcome.backend_headers.items()
            }
        if self.completed:
            if self.cache_fill is not None:
                self.cache_fill.abort()
            return
        if isinstance(outcome, Hit):
            assert self.gateway.cache is not None
            self.respond_with(*self.gateway.cache.render(outcome))
            return
        self._send_to_backends(info)

    def _cache_gone(self, failure: Failure) -> None:
        # The client left while its request waited for another request's cache fill.
        failure.trap(CancelledError)
        self.cache_lookup = None

    def _invalidate_written_keys(self) -> None:
        """Evict the keys a write changes before it reaches a backend (and again after)."""
        cache = self.gateway.cache
        if cache is None or self.bucket is None:
            return
        body = b"".join(self.buffer) if self.body_mode == "buffered" else None
        self.invalidated_keys = written_keys(self.operation, self.method, self.key, body)
        if self.invalidated_keys != []:
            cache.invalidate(self.bucket, self.invalidated_keys, confirm=False)

    def _outgoing(self) -> OutgoingRequest:
        assert self.auth is not None
        headers = forwardable_headers(
            self.request.requestHeaders.getAllRawHeaders(), self.auth.strip_headers
        )
        extra: dict[str, str] = {}
        if self.auth.backend_content_encoding:
            extra["content-encoding"] = self.auth.backend_content_encoding
        extra.update(self.cache_backend_headers)
        body: Any = None
        if self.body_mode == "buffered":
            body = BufferedBody(b"".join(self.buffer))
            # Trailer checksums were verified with the body; the backend gets them as headers.
            extra.update(self.verifier.checksum_headers())
        elif self.body_mode == "streaming":
            body = self.streaming_body
        sending_checksum = any(name.startswith("x-amz-checksum-") for name, _ in headers) or any(
            name.startswith("x-amz-checksum-") for name in extra
        )
        if not sending_checksum:
            # S3 rejects an announced checksum algorithm without the checksum itself, which
            # is the case for streamed trailer checksums: they were verified here instead.
            headers = [(n, v) for n, v in headers if n != "x-amz-sdk-checksum-algorithm"]
        return OutgoingRequest(
            method=self.method,
            target=self.forward_target,
            headers=headers,
            payload_sha256=self.auth.backend_payload_sha256,
            body=body,
            extra_headers=extra,
        )

    def _send_attempt(self, index: int) -> None:
        backend = self.plan[index]
        self.backend_id = backend.id
        self.gateway.pool.attempt_started(backend.id)
        attempt = self.gateway.forwarder.send(backend, self._outgoing())
        self.attempt = attempt
        attempt.addCallbacks(
            lambda response: self._response_received(index, backend, response),
            lambda failure: self._attempt_failed(index, backend, failure),
        )
        attempt.addErrback(self._bug)

    def _may_retry(self, index: int) -> bool:
        """
        Return whether attempt C{index} may be followed by one on the next planned backend.

        True when another backend is planned, nothing was sent to the client, the client is
        still there, and the body is replayable (no body, or buffered completely).
        """
        return (
            index + 1 < len(self.plan)
            and not self.response_sent
            and not self.completed
            and self.body_mode != "streaming"
        )

    def _attempt_failed(self, index: int, backend: BackendConfig, failure: Failure) -> None:
        self.attempt = None
        self.gateway.record_attempt(backend.id, self.operation, "error")
        if self.completed or self.failed_request:
            # The client went away or its body failed verification, and the attempt was
            # aborted for that reason, so its outcome is no evidence about the backend.
            self.gateway.pool.report(backend.id, "neutral", "request aborted by the proxy")
            return

        status, code, reason = describe_failure(failure)
        self.gateway.pool.report(backend.id, "failure", reason)
        self._log.warn(
            "request {request_id}: backend {backend_id} failed: {reason}",
            request_id=self.request_id,
            backend_id=backend.id,
            reason=reason,
        )
        if self._may_retry(index):
            self._send_attempt(index + 1)
            return
        self.fail(S3Error(code, f"backend {backend.id!r} failed: {reason}", status))

    def _response_received(self, index: int, backend: BackendConfig, response: Any) -> None:
        self.attempt = None
        status = response.code
        if self.completed:
            self.gateway.record_attempt(backend.id, self.operation, str(status))
            self.gateway.pool.report(backend.id, "neutral", "client went away")
            discard_body(response)
            return
        if status in _RETRYABLE_STATUSES and self._may_retry(index):
            self.gateway.record_attempt(backend.id, self.operation, str(status))
            self.gateway.pool.report(backend.id, "failure", f"HTTP {status}")
            self._log.warn(
                "request {request_id}: backend {backend_id} responded with {status}, retrying",
                request_id=self.request_id,
                backend_id=backend.id,
                status=status,
            )
            discard_body(response)
            self._send_attempt(index + 1)
            return
        if self.invalidated_keys != [] and self.gateway.cache is not None:
            # Evict again once the write is done, everywhere, before the client learns of it,
            # so that no proxy serves older bytes to a client that saw this response.
            assert self.bucket is not None
            published = self.gateway.cache.invalidate(self.bucket, self.invalidated_keys)
            published.addCallback(lambda _: self._relay_unless_gone(backend, response))
            published.addErrback(self._bug)
            return
        self._relay(backend, response)

    def _relay_unless_gone(self, backend: BackendConfig, response: Any) -> None:
        if self.completed:
            self.gateway.record_attempt(backend.id, self.operation, str(response.code))
            self.gateway.pool.report(backend.id, "neutral", "client went away")
            discard_body(response)
            return
        self._relay(backend, response)

    # Step 5: the response.

    def _relay(self, backend: BackendConfig, response: Any) -> None:
        status = response.code
        if not 100 <= status <= 599:
            self.gateway.record_attempt(backend.id, self.operation, "error")
            self.gateway.pool.report(backend.id, "failure", f"invalid status {status}")
            discard_body(response)
            self.fail(S3Error("BadGateway", f"backend {backend.id!r} sent status {status}", 502))
            return

        if self.cache_fill is not None:
            headers = Headers(dict(response_headers(response, self.method)))
            hit = self.cache_fill.start(status, headers)
            if hit is not None:
                # The backend confirmed the cached copy (304 to the cache's If-None-Match).
                assert self.gateway.cache is not None
                self.gateway.record_attempt(backend.id, self.operation, str(status))
                self.gateway.pool.report(backend.id, _outcome_for(status), f"HTTP {status}")
                discard_body(response)
                self.respond_with(*self.gateway.cache.render(hit))
                return

        request = self.request
        fill = self.cache_fill
        # The client gets the proxy's request id; the backend's goes to the access log.
        backend_ids = response.headers.getRawHeaders(b"x-amz-request-id") or [None]
        if backend_ids[0] is not None:
            self.backend_request_id = backend_ids[0].decode("latin-1")
        request.setResponseCode(status, response.phrase or None)
        for name, values in response_headers(response, self.method):
            request.responseHeaders.setRawHeaders(name, values)
        self._set_request_id_headers()
        if not self.body_done:
            # The backend responded before the client finished sending the body.
            self._prepare_early_close()
        self.status = status
        self.metric_status = status

        capture = _CAPTURE_LIMIT if self.operation == "complete_multipart_upload" else 0
        # Upload IDs and continuation tokens get the backend id before the client sees them,
        # so these small XML bodies are collected and written by _relay_finished.
        collected: list[bytes] | None = None
        if self.operation in REWRITTEN_OPERATIONS and 200 <= status < 300:
            collected = self.rewrite_buffer = []

        def write(data: bytes) -> None:
            if fill is not None:
                fill.write(data)
            if collected is not None:
                collected.append(data)
                return
            request.write(data)

        def unregister() -> None:
            # A client that went away took the request's channel with it, and
            # Request.unregisterProducer would raise AttributeError before relay.done fires.
            if request.channel is not None:
                request.unregisterProducer()

        relay = ResponseRelay(
            write,
            request.registerProducer,
            unregister,
            capture_limit=capture,
        )
        self.relay = relay
        if collected is None:
            request.write(b"")
        response.deliverBody(relay)
        relay.done.addCallbacks(
            lambda _: self._relay_finished(backend, relay),
            lambda failure: self._relay_failed(backend, failure),
        )
        relay.done.addErrback(self._bug)

    def _relay_finished(self, backend: BackendConfig, relay: ResponseRelay) -> None:
        self.relay = None
        if self.cache_fill is not None:
            self.cache_fill.finish()
        if self.rewrite_buffer is not None and not self.completed:
            body = rewrite_response(self.operation, b"".join(self.rewrite_buffer), backend.id)
            length = str(len(body)).encode("ascii")
            self.request.responseHeaders.setRawHeaders(b"Content-Length", [length])
            self.request.write(body)
        status = self.status or 502
        if status == 200 and relay.captured:
            in_body = error_status_in_body(relay.captured)
            if in_body is not None:
                self.metric_status = in_body
        code = self.metric_status or status
        self.gateway.record_attempt(backend.id, self.operation, str(code))
        self.gateway.pool.report(backend.id, _outcome_for(code), f"HTTP {code}")
        if self.completed:
            return
        self.response_sent = True
        self._finish_when_body_done()

    def _relay_failed(self, backend: BackendConfig, failure: Failure) -> None:
        self.relay = None
        self.gateway.record_attempt(backend.id, self.operation, str(self.status))
        if self.completed:
            self.gateway.pool.report(backend.id, "neutral", "client went away")
            return
        self.gateway.pool.report(backend.id, "failure", "response body cut off")
        self.response_sent = True
        self._log.warn(
            "request {request_id}: backend {backend_id} response body was cut off: {reason}",
            request_id=self.request_id,
            backend_id=backend.id,
            reason=failure.getErrorMessage(),
        )
        # The status line is out, so the only signal left to the client is a short body.
        self._close_client()

    def respond_with(
        self, status: int, headers: Sequence[tuple[bytes, list[bytes]]], body: bytes
    ) -> None:
        """Send a complete response that did not come from a backend (errors, the cache)."""
        request = self.request
        request.setResponseCode(status)
        for name, values in headers:
            request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        self._set_request_id_headers()
        self.status = status
        self.metric_status = status
        if not self.body_done:
            self._prepare_early_close()
        request.write(body)
        self.response_sent = True
        self._finish_when_body_done()

    def fail(self, error: S3Error, close: bool = False) -> None:
        """
        Answer with an S3 XML error, or close the connection if a response already started.

        Aborts a streaming upload first, so that the backend never gets a complete body.

        @param close: close the connection after the response even if the body was read.
        """
        self.failed_request = True
        if self.streaming_body is not None:
            self.streaming_body.fail(Failure(error))
        if self.attempt is not None:
            self.attempt.cancel()
        if self.completed:
            return
        if close:
            self.request.channel.persistent = False
        if self.request.startedWriting or self.response_sent:
            self._close_client()
            return

        self._log.info(
            "request {request_id}: {status} {code}: {message}",
            request_id=self.request_id,
            status=error.status,
            code=error.code,
            message=error.message,
        )
        resource = self.request.path.decode("latin-1")
        body = render_error(error.code, error.message, resource, self.request_id)
        headers = [(b"Content-Type", [b"application/xml"])]
        headers += [(k.encode("latin-1"), [v.encode("latin-1")]) for k, v in error.headers.items()]
        self.respond_with(error.status, headers, body)
        if close:
            self._close_client()

    def _set_request_id_headers(self) -> None:
        headers = self.request.responseHeaders
        headers.setRawHeaders(b"x-amz-request-id", [self.request_id.encode("ascii")])
        headers.setRawHeaders(b"x-amz-id-2", [_host_id(self.request_id)])

    def _prepare_early_close(self) -> None:
        # The rest of the request body will not be used, so the connection cannot carry
        # another request after this response.
        if not self.expects_body:
            return
        self.request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        self.request.channel.persistent = False

    def _finish_when_body_done(self) -> None:
        """
        Finish the response once the request body has been read.

        A client that sent C{Expect: 100-continue} and got no C{100 Continue} sends no
        body, so its connection is closed at once instead.
        """
        if self.completed or not self.response_sent:
            return
        if self.body_done:
            self.request.finish()
            self.complete(self.metric_status or self.status or 500)
            return
        expect = self.request.requestHeaders.getRawHeaders(b"Expect") or []
        if expect and expect[0].lower() == b"100-continue" and not self.body_wanted:
            self._close_client()

    def _close_client(self) -> None:
        channel: Any = self.request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()

    # Step 6: accounting.

    def client_lost(self, reason: Failure) -> None:
        """
        Stop everything for a client connection that closed.

        A response that was sent completely counts with its status, anything else as 499.
        """
        # Count first, so that the attempt cancelled below is seen as aborted by the client.
        if not self.completed:
            code = (self.metric_status or self.status or 499) if self.response_sent else 499
            self.complete(code)
        if self.streaming_body is not None:
            self.streaming_body.fail(reason)
        if self.attempt is not None:
            self.attempt.cancel()
        if self.relay is not None:
            self.relay.stop()

    def complete(self, code: int) -> None:
        """Record the request's metrics and access log line; later calls do nothing."""
        if self.completed:
            return
        self.completed = True
        if self.gateway.draining:
            # The process is stopping: close the connection once this response is written
            # (loseConnection sends what is buffered first), so no new request comes on it.
            transport = getattr(self.channel, "transport", None)
            if transport is not None:
                transport.loseConnection()
        if self.cache_lookup is not None:
            self.cache_lookup.cancel()
        if self.cache_fill is not None:
            self.cache_fill.abort()
        elapsed = max(0.0, self.gateway.clock.seconds() - self.started)
        self.gateway.record(self.operation, str(code), elapsed)

        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.request.path.decode("latin-1"),
            "operation": self.operation,
            "status": code,
            "backend_id": self.backend_id,
            "access_key": self.auth.access_key if self.auth is not None else None,
            "seconds": round(elapsed, 6),
            "bytes_sent": getattr(self.request, "sentLength", 0),
            "backend_request_id": self.backend_request_id,
        }
        if self.gateway.config.server.access_log_json:
            self._log.info("{access_json}", access_json=json.dumps(fields), **fields)
        else:
            self._log.info(
                "{request_id} {method} {path} {operation} {status} backend={backend_id}"
                " {seconds}s {bytes_sent}B",
                **fields,
            )
        self.gateway.request_finished()

    def _bug(self, failure: Failure) -> None:
        self._log.failure(
            "BUG: request {request_id} failed inside the gateway",
            failure=failure,
            request_id=self.request_id,
        )
        if not self.completed:
            if self.request.startedWriting:
                self._close_client()
            else:
                self.fail(S3Error("InternalError", "the proxy failed; retry the request", 500))


def _host_id(request_id: str) -> bytes:
    # S3 sends an opaque extended request id in x-amz-id-2; clients only log it.
    return base64.b64encode(request_id.encode("ascii") * 2)


def _entity_too_large(size: int, limit: int) -> S3Error:
    return S3Error(
        "EntityTooLarge",
        f"the body of {size} bytes exceeds the maximum object size of {limit} bytes",
        400,
    )


def _outcome_for(status: int) -> Outcome:
    if status >= 500:
        return "failure"
    if status >= 400:
        return "neutral"
    return "success"


def _pause(channel: Any) -> None:
    if channel.transport is not None:
        channel.transport.pauseProducing()


def _resume(channel: Any) -> None:
    if channel.transport is not None:
        channel.transport.resumeProducing()
