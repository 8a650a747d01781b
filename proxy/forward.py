"""
Forward one request to one S3 backend over a persistent connection, streaming both ways.

L{Forwarder.send} re-signs the request with the backend's credentials (C{sign_request}) and
sends it with C{twisted.web.client.Agent} on an C{HTTPConnectionPool}. Request bodies are
L{IBodyProducer}s: L{StreamingBody} passes verified bytes from the client connection through
with backpressure, and L{BufferedBody} sends a body that was received completely and can be
sent again to another backend. L{ResponseRelay} copies a backend response body to the client
request and pauses the backend connection while the client reads slowly.

Errors: C{send} fails its Deferred with L{BackendTimeout} when no response headers arrived in
C{request_timeout} seconds after the request body was sent, and with the Agent's connection
errors otherwise (see L{describe_failure}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    UNKNOWN_LENGTH,
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from proxy.config import BackendConfig
from proxy.sigv4 import sign_request

__all__ = [
    "BackendTimeout",
    "Clock",
    "HTTPAgent",
    "BufferedBody",
    "Forwarder",
    "OutgoingRequest",
    "ResponseRelay",
    "StreamingBody",
    "describe_failure",
    "make_agent",
]

# Headers that describe one HTTP connection and never go to the next hop (RFC 9110 section 7.6.1),
# plus the ones that the Agent writes itself or that only make sense between client and proxy.
_REQUEST_HEADERS_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
        "authorization",
        "x-amz-security-token",
    }
)

_RESPONSE_HEADERS_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


# The parts of IReactorTime and IAgent used here, as Protocols, because mypy without the
# zope.interface plugin cannot check calls through an Interface type. The reactor,
# twisted.internet.task.Clock and twisted.web.client.Agent match them.
class _DelayedCall(TypingProtocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(TypingProtocol):
    """The time functions of the reactor (C{IReactorTime})."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> _DelayedCall: ...


class HTTPAgent(TypingProtocol):
    """C{twisted.web.iweb.IAgent}."""

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[Any]: ...


class BackendTimeout(Exception):
    """No response headers arrived from the backend within the request timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no response headers within {seconds:g} s")
        self.seconds = seconds


def describe_failure(failure: Failure) -> tuple[int, str, str]:
    """
    Map a failed backend attempt to the status, S3 code and reason the client receives.

    @return: C{(status, code, reason)}: 504 C{GatewayTimeout} for timeouts (connect or
        response), 502 C{BadGateway} for refused, reset or malformed connections.
    """
    value = failure.value
    if isinstance(value, BackendTimeout):
        return 504, "GatewayTimeout", str(value)
    if isinstance(value, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return 504, "GatewayTimeout", "connect timed out"
    if isinstance(value, net_error.ConnectionRefusedError):
        return 502, "BadGateway", "connection refused"
    if isinstance(value, net_error.DNSLookupError):
        return 502, "BadGateway", "host name lookup failed"
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)):
        reasons = ", ".join(type(r.value).__name__ for r in value.reasons)
        return 502, "BadGateway", f"connection failed before a response ({reasons})"
    if isinstance(value, net_error.ConnectError):
        return 502, "BadGateway", f"connect failed ({type(value).__name__})"
    return 502, "BadGateway", f"request failed ({type(value).__name__})"


class _QuietClientFactory(_HTTP11ClientFactory):
    # Without this, every new backend connection logs "Starting factory" and "Stopping
    # factory" lines between the access log lines.
    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


def make_agent(
    reactor: Any, connect_timeout: float, max_persistent_per_host: int = 16
) -> tuple[HTTPAgent, HTTPConnectionPool]:
    """
    Build the Agent that talks to backends, with a persistent connection pool.

    @param connect_timeout: seconds allowed for the TCP (and TLS) connect.
    @return: the agent and its pool; call C{pool.closeCachedConnections()} at shutdown.
    """
    pool = _QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_persistent_per_host
    pool.retryAutomatically = False  # the gateway decides about retries
    return Agent(reactor, connectTimeout=connect_timeout, pool=pool), pool


@dataclass
class OutgoingRequest:
    """
    A request to send to a backend, before signing.

    @ivar target: the request target as it goes on the wire (path and query, percent-encoded
        exactly as the client sent it, without presigned-URL parameters).
    @ivar headers: (lower-case name, value) pairs to forward and sign, in order.
    @ivar payload_sha256: the literal body hash, or C{UNSIGNED-PAYLOAD}.
    @ivar body: the body producer, or L{None} for no body.
    """

    method: str
    target: bytes
    headers: list[tuple[str, str]]
    payload_sha256: str
    body: IBodyProducer | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


def forwardable_headers(
    headers: Iterable[tuple[bytes, Iterable[bytes]]], strip: Iterable[str]
) -> list[tuple[str, str]]:
    """
    Select the client request headers that go to the backend.

    Connection-level headers, the client's signature headers (C{strip}) and the headers named
    in C{Connection} are dropped; names are lower-cased and repeated headers joined with
    commas, as SigV4 canonicalizes them.
    """
    collected: dict[str, list[str]] = {}
    connection_tokens: set[str] = set()
    for raw_name, raw_values in headers:
        name = raw_name.decode("latin-1").lower()
        values = [v.decode("latin-1") for v in raw_values]
        if name == "connection":
            for value in values:
                connection_tokens.update(t.strip().lower() for t in value.split(","))
        collected.setdefault(name, []).extend(values)
    dropped = _REQUEST_HEADERS_NOT_FORWARDED | set(strip) | connection_tokens
    return [(name, ",".join(values)) for name, values in collected.items() if name not in dropped]


def response_headers(response: Any, method: str) -> list[tuple[bytes, list[bytes]]]:
    """
    Return the backend response headers that go to the client, Content-Length included.

    The Agent keeps C{Content-Length} out of C{response.headers} except for HEAD, so it is
    restored from C{response.length}.
    """
    result = []
    for name, values in response.headers.getAllRawHeaders():
        if name.decode("latin-1").lower() in _RESPONSE_HEADERS_NOT_FORWARDED:
            if not (method == "HEAD" and name.lower() == b"content-length"):
                continue
        result.append((name, list(values)))
    if method != "HEAD" and response.length is not UNKNOWN_LENGTH:
        result.append((b"Content-Length", [str(response.length).encode("ascii")]))
    return result


class Forwarder:
    """
    Send requests to backends with one shared Agent.

    @param agent: an Agent with a persistent pool (see L{make_agent}).
    @param clock: the time source for signing and the response timeout.
    @param request_timeout: seconds to wait for response headers after the body was sent.
    """

    _log = Logger()

    def __init__(self, agent: HTTPAgent, clock: Clock, request_timeout: float) -> None:
        self._agent = agent
        self._clock = clock
        self._request_timeout = request_timeout

    def send(self, backend: BackendConfig, request: OutgoingRequest) -> Deferred[Any]:
        """
        Sign C{request} for C{backend} and send it.

        Cancelling the returned Deferred before it fires aborts the backend connection.

        @return: a Deferred firing with the response once its headers arrived; the body is
            read with L{ResponseRelay} or discarded with L{discard_body}. It fails with
            L{BackendTimeout} or a connection error.
        """
        url = backend.endpoint + request.target.decode("latin-1")
        to_sign = dict(request.headers)
        to_sign.update(request.extra_headers)
        signed = sign_request(
            request.method,
            url,
            to_sign,
            request.payload_sha256,
            backend.access_key,
            backend.secret_key,
            backend.region,
            self._clock.seconds(),
        )
        headers = Headers()
        for name, value in signed.items():
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))

        attempt = self._agent.request(
            request.method.encode("ascii"), url.encode("latin-1"), headers, request.body
        )
        return self._with_timeout(attempt, request.body)

    def _with_timeout(self, attempt: Deferred[Any], body: Any) -> Deferred[Any]:
        # The timeout covers the wait for response headers, which starts once the body has
        # been sent: a large upload may take longer than the timeout by itself.
        timer: list[Any] = []
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            attempt.cancel()

        def arm(_: object = None) -> None:
            if not attempt.called:
                timer.append(self._clock.callLater(self._request_timeout, expire))

        def disarm(result: object) -> object:
            for call in timer:
                if call.active():
                    call.cancel()
            if timed_out and isinstance(result, Failure) and result.check(CancelledError):
                return Failure(BackendTimeout(self._request_timeout))
            return result

        when_sent = getattr(body, "when_sent", None)
        if when_sent is None:
            arm()
        else:
            when_sent().addCallback(arm)
        attempt.addBoth(disarm)
        return attempt


@implementer(IBodyProducer)
class BufferedBody:
    """A complete request body in memory; it can be produced any number of times."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class StreamingBody:
    """
    A request body passed from the client connection to one backend request as it arrives.

    The gateway calls L{write} with verified bytes, then L{finish}, or L{fail} to abort the
    backend request so that the backend never receives a complete body. Backpressure: while
    the backend connection is not connected or its send buffer is full, L{write} buffers
    and calls C{pause_source} once more than C{high_water} bytes wait; C{resume_source} is
    called when they have been written. The buffer thus contains at most C{high_water} plus
    what the client connection delivered before the pause took effect.

    @param length: the body length in bytes, or C{UNKNOWN_LENGTH} (sent chunked).
    """

    def __init__(
        self,
        length: int | object,
        pause_source: Callable[[], None],
        resume_source: Callable[[], None],
        high_water: int = 256 * 1024,
    ) -> None:
        self.length = length
        self._pause_source = pause_source
        self._resume_source = resume_source
        self._high_water = high_water
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._consumer: Any = None
        self._consumer_paused = False
        self._source_paused = False
        self._finished = False
        self._failure: Failure | None = None
        self._stopped = False
        self._done: Deferred[None] | None = None
        self._sent_waiters: list[Deferred[None]] = []

    # The gateway side.

    def write(self, data: bytes) -> None:
        """Queue verified body bytes for the backend."""
        if self._stopped or self._failure is not None or not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._flush()
        if self._pending_bytes > self._high_water and not self._source_paused:
            self._source_paused = True
            self._pause_source()

    def finish(self) -> None:
        """Mark the end of the body; the backend request completes once it is written."""
        self._finished = True
        self._flush()

    def fail(self, reason: Failure) -> None:
        """Abort the backend request: the body is incomplete or failed verification."""
        if self._failure is not None or self._stopped:
            return
        self._failure = reason
        self._pending = []
        self._pending_bytes = 0
        self._resume()
        if self._done is not None and not self._done.called:
            self._done.errback(reason)

    def when_sent(self) -> Deferred[None]:
        """Return a Deferred that fires once the whole body was written to the backend."""
        waiter: Deferred[None] = Deferred()
        self._sent_waiters.append(waiter)
        return waiter

    # IBodyProducer, called by the Agent.

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        # A body that arrived completely before the backend connected is written and
        # finished inside _flush, which clears self._done, so the Deferred is kept here.
        done: Deferred[None] = Deferred()
        self._done = done
        if self._failure is not None:
            done.errback(self._failure)
        else:
            self._flush()
        return done

    def pauseProducing(self) -> None:
        self._consumer_paused = True

    def resumeProducing(self) -> None:
        self._consumer_paused = False
        self._flush()

    def stopProducing(self) -> None:
        # The backend request was cancelled or its connection was lost; the Agent does not
        # expect the Deferred of startProducing to fire after this.
        self._stopped = True
        self._pending = []
        self._pending_bytes = 0
        self._resume()

    def _flush(self) -> None:
        if self._consumer is None or self._stopped or self._failure is not None:
            return
        while self._pending and not self._consumer_paused:
            chunk = self._pending.pop(0)
            self._pending_bytes -= len(chunk)
            self._consumer.write(chunk)
        if self._pending_bytes <= self._high_water // 2:
            self._resume()
        if self._finished and not self._pending and self._done is not None:
            done, self._done = self._done, None
            if not done.called:
                done.callback(None)
            waiters, self._sent_waiters = self._sent_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _resume(self) -> None:
        if self._source_paused:
            self._source_paused = False
            self._resume_source()


class ResponseRelay(Protocol):
    """
    Copy a backend response body to a client request, with backpressure.

    The backend connection is registered as the streaming producer of the client request, so
    the client connection pauses it while its send buffer is full.

    @param write: receives each body chunk.
    @param register: C{request.registerProducer}; C{unregister}: C{request.unregisterProducer}.
    @param capture_limit: this many leading body bytes are also kept in L{captured}, for
        CompleteMultipartUpload, whose errors arrive in a 200 body.
    @ivar done: fires with L{None} when the body ended, or fails with the reason the body
        was cut off.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        register: Callable[[IPushProducer, bool], None],
        unregister: Callable[[], None],
        capture_limit: int = 0,
    ) -> None:
        self._write = write
        self._register = register
        self._unregister = unregister
        self._capture_limit = capture_limit
        self.captured = b""
        self.bytes_relayed = 0
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        # The Agent's transport here is a TransportProxyProducer, an IPushProducer.
        producer: Any = self.transport
        self._register(producer, True)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_relayed += len(data)
        if len(self.captured) < self._capture_limit:
            self.captured += data[: self._capture_limit - len(self.captured)]
        self._write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._unregister()
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def stop(self) -> None:
        """Abort the backend connection, for a client that went away."""
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()


class _Discard(Protocol):
    def __init__(self, done: Deferred[None]) -> None:
        self._done = done

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._done.callback(None)


def discard_body(response: Any) -> Deferred[None]:
    """Read and drop a response body so that its connection can return to the pool."""
    done: Deferred[None] = Deferred()
    response.deliverBody(_Discard(done))
    return done


def header_pairs(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Return C{headers} as lower-case (name, value) pairs."""
    return [(name.lower(), value) for name, value in headers.items()]
