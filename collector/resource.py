"""Twisted resources: ``/metrics`` (Prometheus exposition) and ``/healthz``.

``/metrics`` negotiates the format from ``Accept`` the way prometheus_client's own HTTP
handlers do (text 0.0.4 by default, text 1.0.0, OpenMetrics), compresses with gzip when
``Accept-Encoding`` allows it and honours ``name[]`` query parameters. Collection blocks on
the store, so it runs in a thread. When a collection takes longer than the timeout, the
response is a 503. Concurrent requests for the same format and names share one collection,
so a slow store does not pile up threads.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from collector.flusher import RunInThread

__all__ = ["HealthResource", "MetricsResource", "metrics_root"]


_RenderKey = tuple[str, str, tuple[str, ...]]
"""Accept header, Accept-Encoding header and ``name[]`` values of a request."""

_Rendered = tuple[str, bytes, bool]
"""Content type, body and whether the body is gzip-compressed."""


class _NameFilter:
    """A registry view with only the samples named in ``name[]``, as prometheus_client does."""

    def __init__(self, registry: Collector, names: Sequence[str]) -> None:
        self._registry = registry
        self._names = set(names)

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            samples = [sample for sample in family.samples if sample.name in self._names]
            if samples:
                filtered = Metric(family.name, family.documentation, family.type, family.unit)
                filtered.samples = samples
                yield filtered


class MetricsResource(Resource):
    """Serve the metrics of ``registry`` in the format the client accepts.

    :param registry: what to expose, usually a fresh ``CollectorRegistry`` holding one
        :class:`~collector.collector.RedisCollector`.
    :param clock: schedules the timeout.
    :param run_in_thread: runs the blocking collection off the reactor thread.
    :param timeout: seconds a collection may take before the response is a 503; default 10.
    :param on_timeout: called on the reactor thread after each timeout, e.g.
        ``RedisCollector.record_timeout``.

    Note: a timed-out collection keeps running in its thread until the store replies or
    its client times out; only the response is given up. Requests that arrive meanwhile
    wait for that collection instead of starting another one.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        registry: Collector,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        timeout: float = 10.0,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        if not timeout > 0:
            raise ValueError(f"scrape timeout {timeout!r} is invalid; give seconds > 0")
        self.registry = registry
        self.clock = clock
        self.timeout = timeout
        self._run_in_thread = run_in_thread
        self._on_timeout = on_timeout
        self._waiting: dict[_RenderKey, list[Deferred[_Rendered]]] = {}

    def render_GET(self, request: Request) -> object:
        accept = _header(request, b"accept")
        accept_encoding = _header(request, b"accept-encoding")
        names = [name.decode("utf-8", "replace") for name in request.args.get(b"name[]", [])]

        rendering = self._shared_render((accept, accept_encoding, tuple(names)))
        rendering.addTimeout(self.timeout, self.clock)
        finished = False

        def client_gone(_: object) -> None:
            nonlocal finished
            if not finished:
                finished = True
                rendering.cancel()

        request.notifyFinish().addErrback(client_gone)

        def respond(result: _Rendered) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            content_type, body, compressed = result
            request.setHeader(b"content-type", content_type.encode("ascii"))
            if compressed:
                request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()

        def fail(failure: Failure) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if failure.check(TimeoutError):
                self._log.warn(
                    "Metrics collection timed out after {timeout} s; responding with 503",
                    timeout=self.timeout,
                )
                if self._on_timeout is not None:
                    self._on_timeout()
                _plain(
                    request,
                    503,
                    f"metrics collection timed out after {self.timeout} s; "
                    "check that the metrics Redis is reachable and not overloaded\n",
                )
            else:
                self._log.failure("BUG: metrics collection failed", failure)
                _plain(request, 500, "metrics collection failed; see the server log\n")

        rendering.addCallbacks(respond, fail)
        rendering.addErrback(lambda failure: self._log.failure("BUG: could not respond", failure))
        return NOT_DONE_YET

    def _shared_render(self, key: _RenderKey) -> Deferred[_Rendered]:
        # Each request gets its own Deferred, so that a timeout or a client that went
        # away cancels only that request and not the collection others wait for.
        mine: Deferred[_Rendered] = Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(mine)
            return mine

        # The runner may call back at once (a synchronous runner in tests), so the
        # waiter list must exist before the collection starts.
        self._waiting[key] = [mine]
        rendering = self._run_in_thread(self._render, *key)
        rendering.addBoth(self._deliver, key)
        return mine

    def _deliver(self, result: _Rendered | Failure, key: _RenderKey) -> None:
        for waiter in self._waiting.pop(key):
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _render(
        self, accept: str, accept_encoding: str, names: Sequence[str]
    ) -> _Rendered:
        # Runs in a thread.
        encoder, content_type = choose_encoder(accept)
        registry: Collector = _NameFilter(self.registry, names) if names else self.registry
        body = encoder(registry)
        if gzip_accepted(accept_encoding):
            return content_type, gzip.compress(body), True
        return content_type, body, False


class HealthResource(Resource):
    """Respond 200 ``ok`` while the process serves HTTP, without reading the store."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


def metrics_root(metrics: Resource) -> Resource:
    """Return a root resource with ``/metrics`` and ``/healthz``."""
    root = Resource()
    root.putChild(b"metrics", IResource(metrics))
    root.putChild(b"healthz", IResource(HealthResource()))
    return root


def _header(request: Request, name: bytes) -> str:
    value = request.getHeader(name)
    return value.decode("latin-1") if value else ""


def _plain(request: Request, code: int, message: str) -> None:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.write(message.encode("utf-8"))
    request.finish()


