"""
Options and service for C{twistd s3proxy}.

C{makeService} builds one L{SequentialMultiService} holding the metrics flusher, the S3
listener, the C{/metrics} and C{/status} listener (unless turned off with
C{[metrics] listen = ""}), the backend manager with its health checks, and the backend
connection pools; they stop one at a time, the listeners first and the flusher last. An invalid
configuration raises C{usage.UsageError} from L{Options.postOptions}, so twistd prints the
message and exits non-zero before listening.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from collector.connection import HA_SCHEMES, open_ha_client, open_pubsub_client
from proxy.backends import BackendManager, StatusResource
from proxy.cache import ObjectCache
from proxy.cache_invalidation import InvalidationBus, LocalInvalidationBus
from proxy.config import Config, ConfigError, load_config
from proxy.forward import Forwarder, make_agent
from proxy.gateway import Gateway, GatewayFactory
from proxy.health import HttpProbe
from proxy.invalidation_bus import RedisInvalidationBus
from proxy.shutdown import DrainService, SequentialMultiService
from proxy.sigv4 import sign_request

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Command-line options of C{twistd s3proxy}; they override the configuration file."""

    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file (required)."],
        ["listen", None, None, "S3 listener endpoint description; overrides [server] listen."],
        [
            "metrics-listen",
            None,
            None,
            "/metrics endpoint description, or '' for none; overrides [metrics] listen.",
        ],
        [
            "redis-url",
            None,
            None,
            "Redis URL of the shared metrics store; overrides [metrics] redis_url.",
        ],
    ]

    config: Config

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is missing; pass the path of the TOML file")
        overrides = {
            "server.listen": self["listen"],
            "metrics.listen": self["metrics-listen"],
            "metrics.redis_url": self["redis-url"],
        }
        try:
            self.config = load_config(self["config"], overrides)
        except ConfigError as err:
            raise usage.UsageError(f"invalid configuration: {err}") from err


class _ConnectionPoolService(Service):
    """Closes the cached backend connections when the application stops."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._pool.closeCachedConnections()


def _invalidation_bus(
    redis_url: str, namespace: str, origin: str, reactor: Any
) -> InvalidationBus:
    # Sentinel and Cluster URLs need clients that redis-py's from_url cannot build. In a
    # cluster, subscriptions stay on one node while the registry script goes to its slot.
    if urlsplit(redis_url).scheme not in HA_SCHEMES:
        return RedisInvalidationBus.from_url(redis_url, namespace, origin, reactor)
    return RedisInvalidationBus(
        lambda: open_pubsub_client(redis_url),
        namespace,
        origin,
        reactor,
        command_client=open_ha_client(redis_url),
    )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the service tree of one proxy process.

    @param reactor: the reactor; the global one when L{None}.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    # The collector package is imported here, so that `twistd --help` works without it.
    from collector import open_monitoring

    config = options.config
    # Children stop one at a time, last added first: the S3 listener stops accepting, the
    # drain waits for requests in flight, and the metrics flusher, added first, writes the
    # last batch after them.
    root = SequentialMultiService()

    monitoring = open_monitoring(
        redis_url=config.metrics.redis_url,
        namespace=config.metrics.namespace,
        flush_interval=config.metrics.flush_interval,
        reactor=reactor,
        max_pending_series=config.metrics.max_pending_series,
        wait_replicas=config.metrics.wait_replicas,
    )
    monitoring.service.setServiceParent(root)

    agent, pool = make_agent(reactor, config.server.connect_timeout)
    _ConnectionPoolService(pool).setServiceParent(root)
    forwarder = Forwarder(agent, reactor, config.server.request_timeout)

    # Health checks use their own connection pool, whose connect timeout is the check timeout.
    # The manager is added after that pool, so it stops (and its checks end) before the pool.
    probe_agent, probe_pool = make_agent(reactor, config.health.timeout)
    _ConnectionPoolService(probe_pool).setServiceParent(root)
    manager = BackendManager(
        config.backends,
        config.health,
        config.server.routing,
        monitoring.metrics,
        reactor,
        HttpProbe(probe_agent, reactor, sign_request),
    )
    manager.setServiceParent(root)
    # Invalidations go through the metrics Redis; without one the cache is local only.
    bus: InvalidationBus = LocalInvalidationBus()
    if config.metrics.redis_url is not None:
        origin = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        bus = _invalidation_bus(config.metrics.redis_url, config.metrics.namespace, origin, reactor)
    cache = ObjectCache(config.cache, monitoring.metrics, reactor, bus)
    cache.setServiceParent(root)
    gateway = Gateway(
        config,
        monitoring.metrics,
        forwarder,
        manager,
        reactor,
        cache=cache,
    )
    gateway_factory: Any = GatewayFactory(gateway)
    DrainService(gateway, config.server.shutdown_timeout, reactor).setServiceParent(root)
    strports.service(config.server.listen, gateway_factory).setServiceParent(root)

    if config.metrics.listen:
        metrics_root = Resource()
        metrics_resource: Any = monitoring.resource
        metrics_root.putChild(b"metrics", metrics_resource)
        status_resource: Any = StatusResource(manager)
        metrics_root.putChild(b"status", status_resource)
        site: Any = Site(metrics_root)
        strports.service(config.metrics.listen, site).setServiceParent(root)
    return root
