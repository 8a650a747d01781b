"""Tests for the fleet keys of the configuration: Redis Sentinel and Cluster, caps, stop."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse_config

BASE: dict[str, Any] = {
    "users": [{"access_key": "client", "secret_key": "secret"}],
    "backends": [
        {"id": "b1", "endpoint": "http://127.0.0.1:9", "access_key": "k", "secret_key": "s"}
    ],
}


def _parse(**sections: Any) -> Any:
    return parse_config({**BASE, **sections})


def test_defaults() -> None:
    """Without fleet keys: 30 s shutdown timeout, a 100000 series cap, no HA store."""
    config = _parse()
    assert config.server.shutdown_timeout == 30.0
    assert config.metrics.max_pending_series == 100000
    assert config.metrics.sentinels == ()
    assert config.metrics.cluster is False
    assert config.metrics.wait_replicas == 0


def test_sentinel_keys_url() -> None:
    """sentinels and sentinel_service become the store URL."""
    config = _parse(metrics={"sentinels": ["127.0.0.1:26379"], "sentinel_service": "mymaster"})
    assert config.metrics.redis_url == "redis+sentinel://127.0.0.1:26379/mymaster"


def test_cluster_key_url() -> None:
    """cluster = true turns the redis:// URL into a cluster URL."""
    config = _parse(metrics={"redis_url": "redis://127.0.0.1:7000", "cluster": True})
    assert config.metrics.redis_url == "redis+cluster://127.0.0.1:7000"


def test_ha_urls_accepted() -> None:
    """redis+sentinel and redis+cluster URLs are valid redis_url values."""
    for url in ("redis+sentinel://h1:26379,h2:26379/svc/1", "redis+cluster://h1:7000"):
        assert _parse(metrics={"redis_url": url}).metrics.redis_url == url


def test_shutdown_timeout_zero() -> None:
    """A shutdown timeout of 0 means: do not wait for requests in flight."""
    assert _parse(server={"shutdown_timeout": 0}).server.shutdown_timeout == 0.0


@pytest.mark.parametrize(
    ("section", "table", "key"),
    [
        ("server", {"shutdown_timeout": -1}, "server.shutdown_timeout"),
        ("server", {"shutdown_timeout": "30"}, "server.shutdown_timeout"),
        ("metrics", {"max_pending_series": 0}, "metrics.max_pending_series"),
        ("metrics", {"max_pending_series": 1.5}, "metrics.max_pending_series"),
        ("metrics", {"sentinels": ["127.0.0.1:26379"]}, "metrics.sentinel"),
        ("metrics", {"sentinels": ["nohost"], "sentinel_service": "m"}, "metrics.sentinels"),
        ("metrics", {"cluster": True}, "metrics.cluster"),
        ("metrics", {"cluster": "yes", "redis_url": "redis://h:1"}, "metrics.cluster"),
        ("metrics", {"redis_url": "redis+sentinel://h1:26379"}, "metrics.redis_url"),
        (
            "metrics",
            {"redis_url": "redis://h:1", "sentinels": ["h:2"], "sentinel_service": "m"},
            "metrics.redis_url",
        ),
    ],
)
def test_invalid_fleet_keys(section: str, table: dict[str, Any], key: str) -> None:
    """Invalid fleet keys raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as caught:
        _parse(**{section: table})
    assert key in str(caught.value)


def test_password_not_in_message() -> None:
    """An invalid HA URL is reported without its password."""
    with pytest.raises(ConfigError) as caught:
        _parse(metrics={"redis_url": "redis+sentinel://u:hunter2@h1:26379"})
    assert "hunter2" not in str(caught.value)


def test_wait_replicas() -> None:
    """wait_replicas is read as an integer >= 0."""
    config = _parse(metrics={"redis_url": "redis+sentinel://h:26379/m", "wait_replicas": 1})
    assert config.metrics.wait_replicas == 1


@pytest.mark.parametrize("value", [-1, 1.0, "1"])
def test_wait_replicas_invalid(value: object) -> None:
    """A negative or non-integer wait_replicas is rejected."""
    with pytest.raises(ConfigError) as caught:
        _parse(metrics={"wait_replicas": value})
    assert "metrics.wait_replicas" in str(caught.value)


def test_wait_replicas_cluster() -> None:
    """wait_replicas with a cluster is rejected."""
    with pytest.raises(ConfigError) as caught:
        _parse(metrics={"redis_url": "redis+cluster://h:7000", "wait_replicas": 1})
    assert "metrics.wait_replicas" in str(caught.value)
