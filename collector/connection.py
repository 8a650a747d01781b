"""Redis clients for the metrics store: one server, Redis Sentinel or Redis Cluster.

The store is named by one URL:

``redis://``, ``rediss://``, ``unix://``
    one server, as redis-py's ``Redis.from_url`` accepts it.
``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]``
    the primary that the Sentinels at ``host:port`` name for ``service_name``. The
    credentials are those of the data nodes; the Sentinels are contacted without them.
``redis+cluster://[[user]:password@]host:port[,host:port...]``
    a Redis Cluster reached through any of the listed nodes. A cluster has database 0 only.

Every key of one deployment carries the hash tag ``{namespace}``, so in a cluster they all
map to one slot and the store's Lua scripts run on that slot's primary.

:func:`metrics_url` turns the ``[metrics]`` keys ``sentinels``, ``sentinel_service`` and
``cluster`` into such a URL, so the proxy and the exporter accept both forms.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import Encoder
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

__all__ = [
    "HA_SCHEMES",
    "HaTarget",
    "LazyCluster",
    "metrics_url",
    "open_ha_client",
    "open_pubsub_client",
    "parse_ha_url",
]

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
HA_SCHEMES = (SENTINEL_SCHEME, CLUSTER_SCHEME)


@dataclass(frozen=True)
class HaTarget:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL.

    :ivar kind: ``sentinel`` or ``cluster``.
    :ivar nodes: ``(host, port)`` of the Sentinels, or of the cluster's startup nodes.
    :ivar service: the Sentinel service name (the ``sentinel monitor`` name); None for a
        cluster.
    :ivar db: the database number; always 0 for a cluster.
    """

    kind: Literal["sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_ha_url(url: str) -> HaTarget:
    """Parse a ``redis+sentinel://`` or ``redis+cluster://`` URL.

    :raises ValueError: with the reason, never containing the password.
    """
    parts = urlsplit(url)
    if parts.scheme not in HA_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(HA_SCHEMES)}")
    if parts.query or parts.fragment:
        raise ValueError("query strings and fragments are not supported")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = tuple(_node(text) for text in hosts.split(","))

    path = [segment for segment in parts.path.split("/") if segment]
    if parts.scheme == CLUSTER_SCHEME:
        if path and path != ["0"]:
            raise ValueError(f"a cluster has database 0 only, not path {parts.path!r}")
        return HaTarget("cluster", nodes, None, 0, username, password)

    if not path or len(path) > 2:
        raise ValueError(
            f"path {parts.path!r} must be /service_name or /service_name/db"
        )
    service = unquote(path[0])
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"the database {path[1]!r} is not a number")
        db = int(path[1])
    return HaTarget("sentinel", nodes, service, db, username, password)


def _node(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"node {text!r} must be host:port with a port from 1 to 65535")
    return host.strip("[]"), int(port)


def open_ha_client(url: str, timeout: float = 5.0) -> redis.Redis | LazyCluster:
    """Create a client for a ``redis+sentinel://`` or ``redis+cluster://`` URL.

    No connection is made here. A Sentinel client asks the Sentinels for the current
    primary whenever it opens a connection, so after a failover the next command that
    fails makes it reconnect to the new primary.

    :param timeout: socket connect and read timeout of every connection, in seconds.
    :raises ValueError: when the URL is invalid.
    """
    target = parse_ha_url(url)
    if target.kind == "cluster":
        return LazyCluster(target, timeout)
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    assert target.service is not None
    return sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
    )


def open_pubsub_client(url: str, timeout: float = 5.0) -> redis.Redis:
    """Create a client for publishing and subscribing through a Sentinel or cluster URL.

    With Sentinel it is a client of the current primary. In a cluster, PUBLISH reaches
    subscribers on every node, so it is a client of the first listed node.
    NOTE: in a cluster the subscription does not move to another node when that node
    fails.

    :raises ValueError: when the URL is invalid.
    """
    target = parse_ha_url(url)
    if target.kind == "sentinel":
        client = open_ha_client(url, timeout)
        assert isinstance(client, redis.Redis)
        return client
    host, port = target.nodes[0]
    return redis.Redis(
        host=host,
        port=port,
        username=target.username,
        password=target.password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


class LazyCluster:
    """A ``RedisCluster`` that is built on first use.

    ``RedisCluster()`` connects to read the slot map and raises when no node answers, but a
    proxy must start while Redis is down. Until a build succeeds, every call tries again
    and raises the cluster error, which callers handle like any other Redis error.
    Thread-safe.
    """

    def __init__(self, target: HaTarget, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()
        self._encoder = Encoder("utf-8", "strict", False)

    def cluster(self) -> RedisCluster:
        """Return the cluster client, building it now if needed.

        :raises redis.RedisError: when no startup node responds.
        """
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self.target.nodes],
                    username=self.target.username,
                    password=self.target.password,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                )
            return self._client

    def get_encoder(self) -> Encoder:
        """Return the encoder for scripts, without connecting."""
        return self._encoder

    def register_script(self, script: str) -> Script:
        """Return a script object bound to this client; no connection is made."""
        return Script(self, script)

    def pipeline(self, transaction: bool = False) -> _ClusterPipeline:
        """Return a pipeline whose ``execute`` raises Redis errors only."""
        with _as_redis_error():
            return _ClusterPipeline(self.cluster().pipeline(transaction=transaction))

    def __getattr__(self, name: str) -> Any:
        with _as_redis_error():
            attribute = getattr(self.cluster(), name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with _as_redis_error():
                return attribute(*args, **kwargs)

        return call


class _ClusterPipeline:
    """A cluster pipeline whose ``execute`` raises Redis errors only."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline

    def __enter__(self) -> _ClusterPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pipeline.reset()

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with _as_redis_error():
            return list(self._pipeline.execute(raise_on_error=raise_on_error))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


@contextmanager
def _as_redis_error() -> Iterator[None]:
    # redis-py raises RedisClusterException (no RedisError) when no node responds or a
    # slot has no node; callers handle Redis errors only.
    try:
        yield
    except RedisClusterException as err:
        raise redis.ConnectionError(f"Redis Cluster unavailable: {err}") from err


def metrics_url(
    redis_url: str | None,
    sentinels: Sequence[str] = (),
    sentinel_service: str | None = None,
    cluster: bool = False,
) -> str | None:
    """Combine the ``[metrics]`` connection keys into one store URL.

    :param redis_url: the ``redis_url`` key, or None.
    :param sentinels: ``host:port`` of each Sentinel; needs ``sentinel_service`` and no
        ``redis_url``.
    :param cluster: true turns a ``redis://host:port`` URL into ``redis+cluster://``.
    :return: the URL, or None when no key names a store.
    :raises ValueError: when the keys contradict each other; the message names them.
    """
    if sentinels or sentinel_service is not None:
        if redis_url is not None:
            raise ValueError(
                "metrics.redis_url and metrics.sentinels are both set; give the Sentinels "
                "either in the URL (redis+sentinel://host:port,.../service) or as "
                "metrics.sentinels, not both"
            )
        if cluster:
            raise ValueError("metrics.cluster and metrics.sentinels exclude each other")
        if not sentinels or not sentinel_service:
            raise ValueError(
                "metrics.sentinels and metrics.sentinel_service must be given together, "
                'e.g. sentinels = ["127.0.0.1:26379"] and sentinel_service = "mymaster"'
            )
        for index, node in enumerate(sentinels):
            try:
                _node(node)
            except ValueError as err:
                raise ValueError(f"metrics.sentinels[{index}] is invalid: {err}") from None
        url = f"{SENTINEL_SCHEME}://{','.join(sentinels)}/{sentinel_service}"
        parse_ha_url(url)
        return url

    if not cluster or redis_url is None:
        if cluster:
            raise ValueError(
                "metrics.cluster is true but metrics.redis_url is missing; "
                "give a node as redis_url = \"redis://host:port\""
            )
        return redis_url
    parts = urlsplit(redis_url)
    if parts.scheme == CLUSTER_SCHEME:
        return redis_url
    if parts.scheme != "redis":
        raise ValueError(
            "metrics.cluster needs metrics.redis_url to start with redis:// or "
            f"{CLUSTER_SCHEME}://"
        )
    url = f"{CLUSTER_SCHEME}://{parts.netloc}{parts.path}"
    parse_ha_url(url)
    return url
