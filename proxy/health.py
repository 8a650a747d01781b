"""Active health checks: one cheap request per backend, every interval with jitter.

:class:`HealthChecker` schedules the checks and applies the timeout; the HTTP request itself is
an injected :data:`Probe`, so unit tests drive the checker without sockets. :class:`HttpProbe`
is the real one, on ``twisted.web.client.Agent``:

- ``health_path`` set: a plain, unsigned ``GET <endpoint><health_path>``; any 2xx is healthy.
- ``health_bucket`` set: a signed ``HEAD /<bucket>``; any 2xx is healthy.
- otherwise: a signed ``GET /`` (ListBuckets). It is healthy only when the status is 2xx and
  the body is a ``ListAllMyBucketsResult`` XML document, so a proxy or captive portal that
  returns 200 with another body does not count as a healthy S3 server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast
from urllib.parse import quote
from xml.etree import ElementTree

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

__all__ = [
    "Clock",
    "DelayedCall",
    "HealthCheckError",
    "HealthChecker",
    "HttpProbe",
    "Probe",
    "jittered_interval",
]


# The parts of IReactorTime, DelayedCall and IAgent used here, as Protocols: mypy without the
# zope.interface plugin cannot check calls through an Interface type. The reactor and
# twisted.internet.task.Clock both match.
class DelayedCall(Protocol):
    """A call scheduled with ``callLater`` (``DelayedCall``)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The time functions of the reactor (``IReactorTime``)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> DelayedCall: ...


class _Agent(Protocol):
    """``twisted.web.iweb.IAgent``."""

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> Deferred[IResponse]: ...


Probe = Callable[[Any], "Deferred[None]"]
"""Send one health check to a backend; fires with None when healthy, fails otherwise."""

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class HealthCheckError(Exception):
    """A backend responded to a health check, but the response was not healthy."""


def jittered_interval(interval: float, jitter: float, random: Callable[[], float]) -> float:
    """Return the delay before the next check: ``interval`` spread by ``jitter``.

    The result is uniform in ``[interval * (1 - jitter), interval * (1 + jitter)]``, so the
    checks of a fleet of proxies do not arrive at a backend in step.

    :param interval: seconds between checks on average.
    :param jitter: fraction of ``interval``, from 0 (none) to below 1.
    :param random: returns a float in [0, 1).
    """
    return interval * (1.0 + jitter * (2.0 * random() - 1.0))


def _describe(failure: Failure) -> str:
    """Return a short text for a failed check, without tracebacks."""
    if failure.check(TimeoutError):
        return "timed out"
    value = failure.value
    text = str(value) or type(value).__name__
    return text if failure.check(HealthCheckError) else f"{type(value).__name__}: {text}"


class HealthChecker:
    """Scheduler of the active checks of every backend.

    Each backend has its own chain: run the probe with a timeout, report the result, schedule
    the next one. Checks of one backend never overlap. A probe that raises or fails is
    reported as unhealthy; nothing a probe does stops the chain.

    :param backend_configs: the backends; only ``id`` is read here, the probe gets the object.
    :param probe: sends one check; see :data:`Probe`.
    :param clock: schedules the checks and the timeouts.
    :param interval: seconds between checks of one backend, before jitter.
    :param timeout: seconds a check may take before it counts as failed; the probe's
        Deferred is cancelled then.
    :param jitter: see :func:`jittered_interval`.
    :param random: returns a float in [0, 1).
    :param should_check: returns False for a backend that is skipped at this tick (DOWN).
    :param on_result: called with ``(backend_id, healthy, reason)`` after each check.
    """

    _log = Logger()

    def __init__(
        self,
        backend_configs: Sequence[Any],
        probe: Probe,
        clock: Clock,
        interval: float,
        timeout: float,
        jitter: float,
        random: Callable[[], float],
        should_check: Callable[[str], bool],
        on_result: Callable[[str, bool, str], None],
    ) -> None:
        self._configs = {config.id: config for config in backend_configs}
        self._probe = probe
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._jitter = jitter
        self._random = random
        self._should_check = should_check
        self._on_result = on_result
        self._running = False
        self._calls: dict[str, DelayedCall] = {}
        self._in_flight: dict[str, Deferred[None]] = {}

    def start(self) -> None:
        """Run the first check of every backend at once."""
        self._running = True
        for backend_id in self._configs:
            self._schedule(backend_id, 0.0)

    def stop(self) -> Deferred[None]:
        """Cancel the scheduled checks; the Deferred fires when the running ones are done.

        Results that arrive after ``stop`` are not reported.
        """
        self._running = False
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        waiting = [_settled(d) for d in self._in_flight.values()]
        done: Deferred[Any] = DeferredList(waiting)
        return done.addCallback(lambda _: None)

    def check_now(self, backend_id: str) -> None:
        """Run a check of ``backend_id`` now, unless one is running already."""
        if not self._running or backend_id in self._in_flight:
            return
        call = self._calls.pop(backend_id, None)
        if call is not None and call.active():
            call.cancel()
        self._tick(backend_id)

    def _schedule(self, backend_id: str, delay: float) -> None:
        if self._running:
            self._calls[backend_id] = self._clock.callLater(delay, self._tick, backend_id)

    def _next(self, backend_id: str) -> None:
        self._schedule(
            backend_id, jittered_interval(self._interval, self._jitter, self._random)
        )

    def _tick(self, backend_id: str) -> None:
        self._calls.pop(backend_id, None)
        if not self._should_check(backend_id):
            self._next(backend_id)
            return

        # maybeDeferred turns a probe that raises into a failed Deferred, so the chain goes on.
        d: Deferred[None] = maybeDeferred(self._probe, self._configs[backend_id])
        d.addTimeout(self._timeout, cast(IReactorTime, self._clock))
        self._in_flight[backend_id] = d
        d.addCallbacks(
            lambda _: self._finished(backend_id, True, "ok"),
            lambda failure: self._finished(backend_id, False, _describe(failure)),
        )

    def _finished(self, backend_id: str, healthy: bool, reason: str) -> None:
        self._in_flight.pop(backend_id, None)
        if not self._running:
            return
        try:
            self._on_result(backend_id, healthy, reason)
        except Exception:
            self._log.failure("BUG: handling the health check result of {backend_id} failed",
                              backend_id=backend_id)
        self._next(backend_id)


# Large enough for the ListBuckets answer of about 20,000 buckets. A backend with more should
# be checked with health_bucket or health_path, which need no body.
MAX_HEALTH_BODY_BYTES = 4 * 1024**2


class _BoundedBody(TwistedProtocol):
    """Collect a response body of at most ``limit`` bytes and fire ``finished`` once."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(
                HealthCheckError(f"response body is larger than {self.limit} bytes")
            )
            self.abort()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # After a cancel (the check timed out) or an oversized body, finished has fired already.
        if self.finished.called:
            return
        if reason.check(ResponseDone):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)

    def abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()


def read_bounded_body(response: IResponse, limit: int = MAX_HEALTH_BODY_BYTES) -> Deferred[bytes]:
    """Read the body of ``response``, failing with HealthCheckError past ``limit`` bytes.

    Unlike ``twisted.web.client.readBody``, a cancelled read fires its Deferred only once:
    the canceller aborts the connection, and the connectionLost that follows is ignored.
    """
    protocol: _BoundedBody | None = None

    def cancel(_: Deferred[bytes]) -> None:
        if protocol is not None:
            protocol.abort()

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BoundedBody(finished, limit)
    # zope interfaces declare methods without self, which mypy cannot call through.
    cast(Any, response).deliverBody(protocol)
    return finished


def _settled(d: Deferred[None]) -> Deferred[None]:
    """Return a Deferred that fires with None when ``d`` fires, whatever its result."""
    settled: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        settled.callback(None)
        return result

    d.addBoth(fire)
    return settled


class HttpProbe:
    """Health check over HTTP with ``twisted.web.client.Agent``.

    :param agent: the agent; give it its own connection pool so checks do not wait behind
        live traffic.
    :param clock: supplies the signing time.
    :param sign: ``proxy.sigv4.sign_request``; takes ``(method, url, headers,
        payload_sha256, access_key, secret_key, region, now)`` and returns the headers to send.
    """

    def __init__(self, agent: _Agent, clock: Clock, sign: Callable[..., Any]) -> None:
        self._agent = agent
        self._clock = clock
        self._sign = sign

    def __call__(self, backend: Any) -> Deferred[None]:
        """Send the check configured for ``backend``; see the module docstring."""
        endpoint = str(backend.endpoint).rstrip("/")
        if getattr(backend, "health_path", None):
            method, url, signed = b"GET", endpoint + backend.health_path, False
        elif getattr(backend, "health_bucket", None):
            path = "/" + quote(backend.health_bucket, safe="")
            method, url, signed = b"HEAD", endpoint + path, True
        else:
            method, url, signed = b"GET", endpoint + "/", True

        headers = Headers({b"User-Agent": [b"s3proxy-health-check"]})
        if signed:
            signed_headers = self._sign(
                method.decode("ascii"), url, {}, _EMPTY_SHA256, backend.access_key,
                backend.secret_key, backend.region, self._clock.seconds(),
            )
            for name, value in _header_items(signed_headers):
                headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])

        list_buckets = method == b"GET" and not getattr(backend, "health_path", None)
        d = self._agent.request(method, url.encode("ascii"), headers, None)
        return d.addCallback(self._read, list_buckets)

    def _read(self, response: IResponse, list_buckets: bool) -> Deferred[None]:
        # The body is always read, so the connection goes back to the pool.
        body = read_bounded_body(response)
        return body.addCallback(self._judge, response.code, list_buckets)

    @staticmethod
    def _judge(body: bytes, code: int, list_buckets: bool) -> None:
        if not 200 <= code < 300:
            raise HealthCheckError(f"HTTP {code}")
        if list_buckets:
            try:
                root = ElementTree.fromstring(body)
            except ElementTree.ParseError as error:
                raise HealthCheckError(
                    f"HTTP {code} with a body that is not XML: {error}"
                ) from error
            if root.tag.rpartition("}")[2] != "ListAllMyBucketsResult":
                raise HealthCheckError(
                    f"HTTP {code} with <{root.tag}> instead of <ListAllMyBucketsResult>"
                )


def _header_items(headers: Any) -> list[tuple[str, str]]:
    """Return ``(name, value)`` pairs from a mapping or a sequence of pairs."""
    items = headers.items() if hasattr(headers, "items") else headers
    return [(str(name), str(value)) for name, value in items]
