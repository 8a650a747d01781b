"""Options and service for ``twistd s3proxy-exporter``: one ``/metrics`` for the fleet.

The exporter reads every family from the shared Redis and serves ``/metrics`` and
``/healthz``. It renders families from the definitions the proxies stored in Redis and
imports no proxy code.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from collector import thread_pool_runner
from collector.collector import RedisCollector, default_gauge_ttl
from collector.connection import metrics_url
from collector.resource import MetricsResource, metrics_root
from collector.store import RedisStore, check_namespace, open_redis, redact_url

__all__ = ["Options", "makeService"]

_log = Logger()


class Options(usage.Options):
    """Command line of ``twistd s3proxy-exporter``; options override ``--config``."""

    synopsis = "[--config FILE] [--redis-url URL] [--listen ENDPOINT] [--namespace NAME]"
    longdesc = (
        "Serve the metrics of every s3proxy process, read from their shared Redis, on "
        "/metrics for Prometheus, and 'ok' on /healthz."
    )
    optParameters = [
        ["config", "c", None, "TOML file of the proxies; its [metrics] table is read."],
        ["redis-url", "r", None, "Redis URL: redis://[user:password@]host:port/db, "
         "rediss://..., unix:///path, redis+sentinel://host:port[,host:port]/service[/db] "
         "or redis+cluster://host:port[,host:port]. Overrides the store keys of --config."],
        ["sentinels", None, None, "Comma-separated host:port of the Redis Sentinels; needs "
         "--sentinel-service. Overrides metrics.sentinels."],
        ["sentinel-service", None, None, "Service name the Sentinels monitor, e.g. mymaster. "
         "Overrides metrics.sentinel_service."],
        ["listen", "l", "tcp:9091", "Endpoint description to serve HTTP on."],
        ["namespace", "n", None, "Key namespace of the deployment (default s3proxy). "
         "Overrides metrics.namespace."],
        ["gauge-ttl", None, None, "Seconds without heartbeat after which a proxy's gauges "
         "are dropped; default max(15, 3 x metrics.flush_interval)."],
        ["scrape-timeout", None, "10", "Seconds a collection may take before /metrics "
         "answers 503."],
    ]

    optFlags = [
        ["cluster", None, "The Redis URL names a node of a Redis Cluster. Overrides "
         "metrics.cluster."],
    ]

    def postOptions(self) -> None:
        metrics = _metrics_table(self["config"]) if self["config"] else {}

        redis_url = _store_url(self, metrics)
        if not redis_url:
            raise usage.UsageError(
                "no Redis URL given; pass --redis-url or --sentinels, or set "
                "metrics.redis_url or metrics.sentinels in --config"
            )
        try:
            open_redis(redis_url)
        except ValueError as err:
            raise usage.UsageError(str(err)) from None
        self["redis-url"] = redis_url

        namespace = self["namespace"] or metrics.get("namespace", "s3proxy")
        if not isinstance(namespace, str):
            raise usage.UsageError(f"metrics.namespace {namespace!r} is invalid; give a string")
        try:
            check_namespace(namespace)
        except ValueError as err:
            raise usage.UsageError(str(err)) from None
        self["namespace"] = namespace

        try:
            # Parses the description only; nothing listens until the service starts.
            strports.service(self["listen"], IProtocolFactory(Factory()))
        except ValueError as err:
            raise usage.UsageError(
                f"--listen {self['listen']!r} is invalid: {err}; give an endpoint description"
                " such as tcp:9091:interface=127.0.0.1"
            ) from None

        flush_interval = _seconds(metrics.get("flush_interval", 1.0), "metrics.flush_interval")
        if self["gauge-ttl"] is None:
            self["gauge-ttl"] = default_gauge_ttl(flush_interval)
        else:
            self["gauge-ttl"] = _seconds(self["gauge-ttl"], "--gauge-ttl")
        self["scrape-timeout"] = _seconds(self["scrape-timeout"], "--scrape-timeout")


def _store_url(options: Options, metrics: dict[str, Any]) -> str | None:
    # Command-line options replace every store key of the file: --redis-url (with
    # --cluster) or --sentinels with --sentinel-service.
    try:
        if options["redis-url"]:
            return metrics_url(options["redis-url"], cluster=bool(options["cluster"]))
        if options["sentinels"] or options["sentinel-service"]:
            sentinels = [node for node in (options["sentinels"] or "").split(",") if node]
            return metrics_url(None, sentinels, options["sentinel-service"])

        redis_url = metrics.get("redis_url")
        if redis_url is not None and not isinstance(redis_url, str):
            raise usage.UsageError(f"metrics.redis_url {redis_url!r} is invalid; give a string")
        if "redis_url_env" in metrics:
            if redis_url is not None:
                raise usage.UsageError(
                    "metrics sets both redis_url and redis_url_env; keep only one of them"
                )
            redis_url = _url_from_environment(metrics["redis_url_env"])
        sentinels = metrics.get("sentinels", [])
        if not isinstance(sentinels, list) or not all(isinstance(n, str) for n in sentinels):
            raise usage.UsageError(
                f"metrics.sentinels {sentinels!r} is invalid; give a list of \"host:port\""
            )
        service = metrics.get("sentinel_service")
        if service is not None and not isinstance(service, str):
            raise usage.UsageError(
                f"metrics.sentinel_service {service!r} is invalid; give a string"
            )
        cluster = metrics.get("cluster", False)
        if not isinstance(cluster, bool):
            raise usage.UsageError(f"metrics.cluster {cluster!r} is invalid; use true or false")
        return metrics_url(redis_url, sentinels, service, cluster or bool(options["cluster"]))
    except ValueError as err:
        raise usage.UsageError(str(err)) from None


def _url_from_environment(name: object) -> str:
    """Return the Redis URL held by the environment variable that ``redis_url_env`` names."""
    if not isinstance(name, str) or not name:
        raise usage.UsageError(
            f"metrics.redis_url_env {name!r} is invalid; give the name of an environment variable"
        )
    value = os.environ.get(name)
    if not value:
        raise usage.UsageError(
            f"metrics.redis_url_env names the environment variable {name!r}, which is not set"
            " or empty; export it before starting the exporter"
        )
    return value


def _metrics_table(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as file:
            document = tomllib.load(file)
    except OSError as err:
        raise usage.UsageError(f"cannot read config file {path!r}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise usage.UsageError(f"config file {path!r} is not valid TOML: {err}") from None
    table = document.get("metrics", {})
    if not isinstance(table, dict):
        raise usage.UsageError(f"[metrics] in {path!r} is invalid; it must be a table")
    return table


def _seconds(value: object, name: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise usage.UsageError(f"{name} {value!r} is invalid; give seconds > 0")
    return seconds


def makeService(options: Options) -> IService:
    """Build the exporter: an HTTP listener on ``--listen`` serving the Redis collector."""
    from twisted.internet import reactor

    store = RedisStore(open_redis(options["redis-url"]), namespace=options["namespace"])
    collector = RedisCollector(store, reactor, gauge_ttl=options["gauge-ttl"])
    registry = CollectorRegistry()
    registry.register(collector)
    resource = MetricsResource(
        registry,
        reactor,
        thread_pool_runner(reactor),
        timeout=options["scrape-timeout"],
        on_timeout=collector.record_timeout,
    )

    _log.info(
        "s3proxy exporter reading {url} namespace {namespace}, gauge TTL {ttl} s, "
        "listening on {listen}",
        url=redact_url(options["redis-url"]),
        namespace=options["namespace"],
        ttl=options["gauge-ttl"],
        listen=options["listen"],
    )
    service = MultiService()
    site = IProtocolFactory(Site(metrics_root(resource)))
    listener = strports.service(options["listen"], site)
    listener.setServiceParent(service)
    return IService(service)
