"""Tests for collector.connection: Sentinel and Cluster URLs and the [metrics] keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from collector.connection import (
    LazyCluster,
    metrics_url,
    open_ha_client,
    open_pubsub_client,
    parse_ha_url,
)
from collector.store import RedisStore, open_redis


def test_sentinel_url_parts() -> None:
    """A Sentinel URL gives its nodes, service, database and credentials."""
    target = parse_ha_url("redis+sentinel://user:s%40cret@h1:26379,h2:26380/mymaster/2")
    assert target.kind == "sentinel"
    assert target.nodes == (("h1", 26379), ("h2", 26380))
    assert target.service == "mymaster"
    assert target.db == 2
    assert target.username == "user"
    assert target.password == "s@cret"


def test_sentinel_url_default_db() -> None:
    """Without a database segment a Sentinel URL selects database 0."""
    assert parse_ha_url("redis+sentinel://127.0.0.1:26379/mymaster").db == 0


def test_cluster_url_parts() -> None:
    """A cluster URL gives its startup nodes and database 0."""
    target = parse_ha_url("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001")
    assert target.kind == "cluster"
    assert target.nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001))
    assert target.password == "pw"
    assert target.username is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379",
        "redis+sentinel://h1:26379/svc/x",
        "redis+sentinel://h1/svc",
        "redis+sentinel://h1:0/svc",
        "redis+sentinel://h1:26379/svc/0/extra",
        "redis+cluster://h1:7000/3",
        "redis+cluster://h1:7000?x=1",
    ],
)
def test_invalid_ha_urls(url: str) -> None:
    """Malformed Sentinel and cluster URLs raise ValueError."""
    with pytest.raises(ValueError):
        parse_ha_url(url)


def test_open_redis_hides_password() -> None:
    """open_redis names an invalid HA URL without its password."""
    with pytest.raises(ValueError) as caught:
        open_redis("redis+sentinel://u:topsecret@h1/svc")
    assert "topsecret" not in str(caught.value)


def test_sentinel_client_offline() -> None:
    """A Sentinel client is built without connecting to anything."""
    client = open_ha_client("redis+sentinel://127.0.0.1:1/mymaster")
    assert isinstance(client, redis.Redis)


def test_cluster_client_lazy() -> None:
    """A cluster client and a store on it are built without a reachable node."""
    client = open_redis("redis+cluster://127.0.0.1:1", timeout=0.2)
    store = RedisStore(client, namespace="lazy")
    assert isinstance(client, LazyCluster)
    assert store.family_key("x") == "{lazy}:family:x"


def test_cluster_client_unreachable() -> None:
    """Using a cluster client with no reachable node raises a Redis error."""
    client = open_redis("redis+cluster://127.0.0.1:1", timeout=0.2)
    with pytest.raises(redis.RedisError):
        client.ping()


def test_pubsub_client_cluster_node() -> None:
    """In a cluster, publishing goes through the first listed node."""
    client = open_pubsub_client("redis+cluster://127.0.0.1:7005,127.0.0.1:7006")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["port"] == 7005


def test_metrics_url_sentinels() -> None:
    """sentinels and sentinel_service become a redis+sentinel URL."""
    url = metrics_url(None, ["127.0.0.1:26379", "127.0.0.1:26380"], "mymaster")
    assert url == "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"


def test_metrics_url_cluster() -> None:
    """cluster = true turns a redis:// URL into a redis+cluster URL."""
    assert metrics_url("redis://127.0.0.1:7000", cluster=True) == "redis+cluster://127.0.0.1:7000"


def test_metrics_url_plain() -> None:
    """Without HA keys the redis_url is returned unchanged."""
    assert metrics_url("redis://127.0.0.1:6379/1") == "redis://127.0.0.1:6379/1"


@pytest.mark.parametrize(
    ("redis_url", "sentinels", "service", "cluster"),
    [
        ("redis://h:1", ["h:26379"], "svc", False),
        (None, ["h:26379"], None, False),
        (None, [], "svc", False),
        (None, ["h:26379"], "svc", True),
        (None, ["nope"], "svc", False),
        (None, [], None, True),
        ("unix:///tmp/r.sock", [], None, True),
    ],
)
def test_metrics_url_conflicts(
    redis_url: str | None, sentinels: list[str], service: str | None, cluster: bool
) -> None:
    """Contradicting or incomplete [metrics] connection keys raise ValueError."""
    with pytest.raises(ValueError):
        metrics_url(redis_url, sentinels, service, cluster)


def test_exporter_sentinel_options() -> None:
    """--sentinels and --sentinel-service give the exporter a Sentinel URL."""
    from collector.exporter_tap import Options

    options = Options()
    options.parseOptions(["--sentinels", "127.0.0.1:26379,127.0.0.1:26380",
                          "--sentinel-service", "mymaster"])
    assert options["redis-url"] == "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"


def test_exporter_cluster_config(tmp_path: Path) -> None:
    """cluster = true in the config file gives the exporter a cluster URL."""
    from collector.exporter_tap import Options

    config = tmp_path / "proxy.toml"
    config.write_text('[metrics]\nredis_url = "redis://127.0.0.1:7000"\ncluster = true\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert options["redis-url"] == "redis+cluster://127.0.0.1:7000"


def test_exporter_sentinel_without_service() -> None:
    """--sentinels without --sentinel-service is a usage error."""
    from twisted.python.usage import UsageError

    from collector.exporter_tap import Options

    with pytest.raises(UsageError):
        Options().parseOptions(["--sentinels", "127.0.0.1:26379"])
