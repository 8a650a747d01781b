"""Fleet-wide metrics for s3proxy: recording, flushing to Redis and Prometheus exposition.

Every process records into an in-process :class:`~collector.metrics.Metrics` buffer. A
flusher ships the deltas to a shared store, and a collector builds metric families from
the store's contents on every scrape. :func:`open_monitoring` wires these parts together.
This package never imports the proxy, so the standalone exporter runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.threads import deferToThreadPool

from collector.buffer import DeltaBuffer
from collector.collector import RedisCollector, default_gauge_ttl
from collector.definitions import APPLICATION_METRICS, MetricDefinition
from collector.flusher import Flusher, RunInThread, make_writer_id
from collector.metrics import Metrics
from collector.resource import MetricsResource
from collector.store import EmbeddedStore, MetricStore, RedisStore, open_redis

__all__ = [
    "APPLICATION_METRICS",
    "Metrics",
    "MetricDefinition",
    "Monitoring",
    "open_monitoring",
    "thread_pool_runner",
]


@dataclass(frozen=True)
class Monitoring:
    """The parts :func:`open_monitoring` builds.

    :ivar metrics: the recording API, passed to every module that records.
    :ivar service: the flusher; start it with the application, and its ``stopService``
        flushes once more and fires when done.
    :ivar resource: the ``/metrics`` resource; mount it on the metrics listener.
    :ivar collector: the collector behind ``resource``.
    :ivar store: where the flusher writes and the collector reads.
    :ivar writer_id: this process's id in the store, ``host:pid:boot id``.
    """

    metrics: Metrics
    service: Flusher
    resource: MetricsResource
    collector: RedisCollector
    store: MetricStore
    writer_id: str


def thread_pool_runner(reactor: Any) -> RunInThread:
    """Return a runner that calls functions in the reactor's thread pool."""
    return partial(deferToThreadPool, reactor, reactor.getThreadPool())


def open_monitoring(
    redis_url: str | None = None,
    namespace: str = "s3proxy",
    flush_interval: float = 1.0,
    reactor: Any = None,
    *,
    gauge_ttl: float | None = None,
    max_pending_series: int | None = 100_000,
    wait_replicas: int = 0,
    scrape_timeout: float = 10.0,
    writer_id: str | None = None,
    run_in_thread: RunInThread | None = None,
    store: MetricStore | None = None,
) -> Monitoring:
    """Build the metrics, the flusher service and the ``/metrics`` resource.

    Nothing connects to Redis here; the flusher's ``startService`` does.

    :param redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL of the shared Redis;
        None keeps metrics in this process only (for a single process).
    :param namespace: the deployment name; all Redis keys start with ``{namespace}:``.
    :param flush_interval: seconds between flushes; default 1.
    :param reactor: provides time and the thread pool; default the global reactor.
    :param gauge_ttl: seconds without heartbeat after which a process's gauges are
        dropped; default ``max(15, 3 x flush_interval)``.
    :param max_pending_series: the most counter and histogram series the buffer keeps,
        e.g. while Redis cannot be reached; deltas of further new series are added to
        their family's overflow series (label values ``_overflow``) and counted in
        ``s3proxy_metrics_overflow_total``. None for no cap.
    :param wait_replicas: replicas that must acknowledge each batch before the flusher
        drops it (Redis ``WAIT``); 0 trusts the primary's reply. See :class:`RedisStore`.
    :param scrape_timeout: seconds a ``/metrics`` collection may take before a 503.
    :param writer_id: this process's id; default host name, pid and a random boot id.
    :param run_in_thread: runs blocking store calls; default the reactor's thread pool.
    :param store: use this store instead of one built from ``redis_url`` (for tests).
    :raises ValueError: for an invalid URL (shown without password), namespace, interval
        or TTL.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if run_in_thread is None:
        run_in_thread = thread_pool_runner(reactor)
    if store is None:
        store = (
            EmbeddedStore()
            if redis_url is None
            else RedisStore(open_redis(redis_url), namespace=namespace,
                            wait_replicas=wait_replicas)
        )
    if writer_id is None:
        writer_id = make_writer_id()

    metrics = Metrics(DeltaBuffer(clock=reactor.seconds, max_series=max_pending_series))
    flusher = Flusher(
        store, metrics, writer_id, reactor, run_in_thread, interval=flush_interval
    )
    collector = RedisCollector(
        store,
        reactor,
        definitions=metrics.definitions,
        gauge_ttl=default_gauge_ttl(flush_interval) if gauge_ttl is None else gauge_ttl,
    )
    registry = CollectorRegistry()
    registry.register(collector)
    resource = MetricsResource(
        registry,
        reactor,
        run_in_thread,
        timeout=scrape_timeout,
        on_timeout=collector.record_timeout,
    )
    return Monitoring(metrics, flusher, resource, collector, store, writer_id)
