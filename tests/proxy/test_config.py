"""Tests for proxy.config: defaults, overrides and every error path naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_config, parse_config

SECRET = "do-not-leak-this-secret"


def minimal() -> dict[str, Any]:
    """Return the smallest valid document: one user and one backend."""
    return {
        "users": [{"access_key": "client", "secret_key": SECRET}],
        "backends": [
            {
                "id": "primary",
                "endpoint": "http://127.0.0.1:9100",
                "access_key": "backend",
                "secret_key": SECRET,
            }
        ],
    }


def error_of(document: dict[str, Any], **kwargs: Any) -> str:
    """Return the ConfigError message for an invalid document."""
    with pytest.raises(ConfigError) as info:
        parse_config(document, **kwargs)
    return str(info.value)


def test_defaults() -> None:
    """A minimal document gets the documented defaults."""
    config = parse_config(minimal())
    assert config.server.listen == "tcp:9000"
    assert config.server.max_object_size == 5368709120
    assert config.server.retry_body_max_bytes == 8388608
    assert config.metrics.listen == "tcp:9091"
    assert config.metrics.redis_url is None
    assert config.health.failures_to_down == 3
    assert config.cache.enabled is False
    assert config.backends[0].priority == 0


def test_full_schema(tmp_path: Path) -> None:
    """Every documented key is accepted from a TOML file."""
    path = tmp_path / "proxy.toml"
    path.write_text(
        """
[server]
listen = "tcp:9000:interface=127.0.0.1"
region = "eu-west-1"
routing = "round_robin"
max_object_size = 1000
max_header_bytes = 16384
request_timeout = 30.0
connect_timeout = 2
retry_body_max_bytes = 0
access_log_json = true
virtual_host_suffixes = ["S3.local"]
[metrics]
listen = ""
redis_url = "redis://127.0.0.1:6379/0"
namespace = "fleet"
flush_interval = 0.5
[[users]]
access_key = "a"
secret_key_env = "S3PROXY_TEST_SECRET"
[[backends]]
id = "one"
endpoint = "https://example.test:9443/"
region = "us-east-1"
access_key = "b"
secret_key = "s"
priority = 1
health_path = "/minio/health/live"
health_bucket = "bucket"
[health]
interval = 5.0
timeout = 2.0
failures_to_down = 3
successes_to_up = 2
cooldown = 0.5
probe_requests = 1
jitter = 0.1
retry_budget = 0.2
[cache]
enabled = true
max_bytes = 10
max_object_bytes = 5
ttl = 1.5
"""
    )
    config = load_config(str(path), environ={"S3PROXY_TEST_SECRET": "from-env"})
    assert config.server.routing == "round_robin"
    assert config.server.virtual_host_suffixes == ("s3.local",)
    assert config.metrics.listen == ""
    assert config.users[0].secret_key == "from-env"
    assert config.backends[0].endpoint == "https://example.test:9443"
    assert config.cache.ttl == 1.5


def test_overrides_replace_file_values() -> None:
    """Command-line overrides replace [server] and [metrics] keys; None keeps the file's."""
    config = parse_config(
        minimal(),
        overrides={
            "server.listen": "tcp:9001:interface=127.0.0.1",
            "metrics.listen": None,
            "metrics.redis_url": "redis://127.0.0.1:6380/1",
        },
    )
    assert config.server.listen == "tcp:9001:interface=127.0.0.1"
    assert config.metrics.listen == "tcp:9091"
    assert config.metrics.redis_url == "redis://127.0.0.1:6380/1"


def test_override_is_validated() -> None:
    """An invalid override is reported with its key."""
    message = error_of(minimal(), overrides={"server.listen": "bogus:1"})
    assert "server.listen" in message


def test_secret_not_in_repr() -> None:
    """Secrets do not appear in the repr of the configuration."""
    config = parse_config(minimal())
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "listen", "bogus:1", "server.listen"),
        ("server", "listen", "", "server.listen"),
        ("server", "listen", 9000, "server.listen"),
        ("server", "routing", "random", "server.routing"),
        ("server", "max_object_size", "5GB", "server.max_object_size"),
        ("server", "max_object_size", 0, "server.max_object_size"),
        ("server", "max_object_size", True, "server.max_object_size"),
        ("server", "max_header_bytes", 10, "server.max_header_bytes"),
        ("server", "request_timeout", -1.0, "server.request_timeout"),
        ("server", "connect_timeout", float("nan"), "server.connect_timeout"),
        ("server", "access_log_json", "yes", "server.access_log_json"),
        ("server", "virtual_host_suffixes", "s3.local", "server.virtual_host_suffixes"),
        ("server", "virtual_host_suffixes", ["bad host"], "server.virtual_host_suffixes[0]"),
        ("server", "region", "", "server.region"),
        ("server", "colour", "blue", "server.colour"),
        ("metrics", "listen", "tcp:notaport", "metrics.listen"),
        ("metrics", "redis_url", "http://127.0.0.1", "metrics.redis_url"),
        ("metrics", "namespace", "a b", "metrics.namespace"),
        ("metrics", "flush_interval", 0, "metrics.flush_interval"),
        ("health", "jitter", 1.5, "health.jitter"),
        ("health", "failures_to_down", 0, "health.failures_to_down"),
        ("health", "interval", "5s", "health.interval"),
        ("cache", "enabled", 1, "cache.enabled"),
        ("cache", "max_bytes", -1, "cache.max_bytes"),
    ],
)
def test_section_errors_name_key(section: str, key: str, value: Any, expected: str) -> None:
    """Each invalid section value raises ConfigError naming the key path."""
    document = minimal()
    document[section] = {key: value}
    message = error_of(document)
    assert expected in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"endpoint": "ftp://host"}, "backends[1].endpoint"),
        ({"endpoint": "http://host/path"}, "backends[1].endpoint"),
        ({"endpoint": "http://user:pw@host"}, "backends[1].endpoint"),
        ({"endpoint": "http://host:99999"}, "backends[1].endpoint"),
        ({"id": "primary"}, "backends[1].id"),
        ({"id": "has space"}, "backends[1].id"),
        ({"id": "x" * 65}, "backends[1].id"),
        ({"priority": 1.5}, "backends[1].priority"),
        ({"health_path": "health"}, "backends[1].health_path"),
        ({"weight": 2}, "backends[1].weight"),
        ({"access_key": ""}, "backends[1].access_key"),
    ],
)
def test_backend_errors_name_key(change: dict[str, Any], expected: str) -> None:
    """An invalid second backend raises ConfigError naming backends[1] and the key."""
    document = minimal()
    second = {
        "id": "secondary",
        "endpoint": "http://127.0.0.1:9200",
        "access_key": "backend",
        "secret_key": SECRET,
    }
    second.update(change)
    document["backends"].append(second)
    message = error_of(document)
    assert expected in message


def test_missing_backend_key() -> None:
    """A backend without an endpoint is reported as missing."""
    document = minimal()
    del document["backends"][0]["endpoint"]
    message = error_of(document)
    assert "backends[0].endpoint is missing" in message


def test_no_backends() -> None:
    """A document without backends is rejected."""
    document = minimal()
    del document["backends"]
    assert "backends" in error_of(document)


def test_no_users() -> None:
    """A document without users is rejected."""
    document = minimal()
    del document["users"]
    assert "users" in error_of(document)


def test_unknown_top_level_key() -> None:
    """An unknown section is rejected by name."""
    document = minimal()
    document["sever"] = {}
    assert "'sever'" in error_of(document)


def test_missing_secret() -> None:
    """A user without secret_key or secret_key_env is rejected."""
    document = minimal()
    del document["users"][0]["secret_key"]
    assert "users[0].secret_key is missing" in error_of(document)


def test_both_secret_forms() -> None:
    """secret_key and secret_key_env together are rejected."""
    document = minimal()
    document["users"][0]["secret_key_env"] = "X"
    assert "users[0]" in error_of(document)


def test_missing_secret_env() -> None:
    """An unset secret_key_env variable is named in the error."""
    document = minimal()
    document["backends"][0] = dict(document["backends"][0])
    del document["backends"][0]["secret_key"]
    document["backends"][0]["secret_key_env"] = "S3PROXY_UNSET_VARIABLE"
    message = error_of(document, environ={})
    assert "S3PROXY_UNSET_VARIABLE" in message


def test_wrong_secret_type_hides_value() -> None:
    """A secret_key of the wrong type is reported without its value."""
    document = minimal()
    document["users"][0]["secret_key"] = 12345678
    message = error_of(document)
    assert "12345678" not in message


def test_errors_never_contain_secret() -> None:
    """An error in a table holding a secret does not print the secret."""
    document = minimal()
    document["users"][0]["colour"] = "blue"
    message = error_of(document)
    assert SECRET not in message


def test_duplicate_user() -> None:
    """Two users with one access key are rejected."""
    document = minimal()
    document["users"].append({"access_key": "client", "secret_key": "other"})
    assert "users[1].access_key" in error_of(document)


def test_users_not_array() -> None:
    """users given as a table instead of an array of tables is rejected."""
    document = minimal()
    document["users"] = {"access_key": "a"}
    assert "[[users]]" in error_of(document)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file names its path."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.toml"))
    assert "absent.toml" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML is rejected with the parser's reason."""
    path = tmp_path / "bad.toml"
    path.write_text("[server\nlisten = 1")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "not valid TOML" in str(info.value)


def test_ssl_listen_missing_file() -> None:
    """An ssl listen description whose key file is missing is rejected before listening."""
    document = minimal()
    document["server"] = {"listen": "ssl:9443:privateKey=/nonexistent.pem"}
    assert "server.listen" in error_of(document)


def test_unsupported_override() -> None:
    """An override outside [server] and [metrics] is rejected."""
    assert "cache.enabled" in error_of(minimal(), overrides={"cache.enabled": True})


def test_redis_url_from_environment() -> None:
    """metrics.redis_url_env reads the URL, password included, from the environment."""
    document = minimal()
    document["metrics"] = {"redis_url_env": "S3PROXY_REDIS_URL"}
    url = "redis://:pa55word@127.0.0.1:6379/0"
    config = parse_config(document, environ={"S3PROXY_REDIS_URL": url})
    assert config.metrics.redis_url == url


def test_redis_url_env_unset() -> None:
    """An unset redis_url_env variable is named in the error."""
    document = minimal()
    document["metrics"] = {"redis_url_env": "S3PROXY_REDIS_URL"}
    message = error_of(document, environ={})
    assert "metrics.redis_url_env" in message
    assert "S3PROXY_REDIS_URL" in message


def test_redis_url_both_forms() -> None:
    """redis_url and redis_url_env together are rejected."""
    document = minimal()
    document["metrics"] = {"redis_url": "redis://127.0.0.1/0", "redis_url_env": "X"}
    assert "redis_url_env" in error_of(document, environ={"X": "redis://127.0.0.1/1"})


def test_redis_url_env_hides_password() -> None:
    """An invalid URL from the environment is shown without its password."""
    document = minimal()
    document["metrics"] = {"redis_url_env": "S3PROXY_REDIS_URL"}
    message = error_of(document, environ={"S3PROXY_REDIS_URL": "http://:pa55word@host/0"})
    assert "metrics.redis_url" in message
    assert "pa55word" not in message


def test_redis_url_override_beats_env() -> None:
    """--redis-url replaces a URL that the file takes from the environment."""
    document = minimal()
    document["metrics"] = {"redis_url_env": "S3PROXY_REDIS_URL"}
    config = parse_config(
        document, overrides={"metrics.redis_url": "redis://127.0.0.1:6390/0"}, environ={}
    )
    assert config.metrics.redis_url == "redis://127.0.0.1:6390/0"


@pytest.mark.parametrize("key", ["max_bytes", "max_object_bytes"])
def test_cache_size_zero_rejected(key: str) -> None:
    """A cache size of 0 is a config error naming the key, not a failure at start."""
    document = minimal()
    document["cache"] = {"enabled": True, key: 0}
    assert f"cache.{key}" in error_of(document)


def test_health_cooldown_zero_rejected() -> None:
    """A cooldown of 0 is rejected, naming the key, because it makes DOWN never last."""
    document = minimal()
    document["health"] = {"cooldown": 0}
    assert "health.cooldown" in error_of(document)
