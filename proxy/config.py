"""
Load and validate the TOML configuration of C{twistd s3proxy}.

The file has the sections C{[server]}, C{[metrics]}, C{[[users]]}, C{[[backends]]}, C{[health]}
and C{[cache]}. Every key is checked when the file is loaded: an unknown key, a wrong type, a
value out of range, a duplicate backend id, a bad URL or a bad endpoint description raises
L{ConfigError}, whose message names the key path (for example C{backends[1].endpoint}), the
offending value and what is accepted. Secret values never appear in messages.

A secret (C{secret_key}) may be given in the file or, with C{secret_key_env = "NAME"}, read from
the environment variable C{NAME} when the file is loaded.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString

from collector.connection import HA_SCHEMES, metrics_url, parse_ha_url
from collector.store import redact_url

__all__ = [
    "BackendConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "HealthConfig",
    "MetricsConfig",
    "ServerConfig",
    "UserConfig",
    "load_config",
    "parse_config",
]

Routing = Literal["failover", "round_robin"]

_BACKEND_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Loose on purpose: S3-compatible servers differ in which bucket names they accept, but none
# allows a '/' or whitespace, which would change the path of the health check.
_HEALTH_BUCKET = re.compile(r"[^/\s]{1,255}")


class ConfigError(ValueError):
    """
    An invalid configuration file or override.

    The message names the key path, the offending value (never a secret) and what is accepted.
    """


@dataclass(frozen=True)
class ServerConfig:
    """
    The S3 listener and the limits applied to client requests.

    Sizes are in bytes and times in seconds. C{header_timeout} bounds how long a client may take
    to send a complete request head (request line and headers). C{shutdown_timeout} bounds how
    long a stop (SIGTERM) waits for requests in flight before the last metrics flush; 0 does not
    wait.
    """

    listen: str = "tcp:9000"
    region: str = "us-east-1"
    routing: Routing = "failover"
    max_object_size: int = 5 * 1024**3
    max_header_bytes: int = 16384
    request_timeout: float = 300.0
    connect_timeout: float = 5.0
    retry_body_max_bytes: int = 8 * 1024**2
    access_log_json: bool = False
    virtual_host_suffixes: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    header_timeout: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    """
    The C{/metrics} listener and the Redis store behind it.

    An empty C{listen} turns the listener off in this process. C{redis_url} L{None} selects the
    embedded single-process store. C{flush_interval} is in seconds.

    C{redis_url} is the effective store URL: C{sentinels} with C{sentinel_service} become a
    C{redis+sentinel://} URL, and C{cluster} turns a C{redis://} URL into C{redis+cluster://}.
    C{max_pending_series} caps the counter and histogram series a process keeps while Redis
    cannot be reached; deltas of further new series are merged into one overflow series per
    family and counted in C{s3proxy_metrics_overflow_total}. C{wait_replicas} > 0 makes every
    batch count as written only once that many replicas acknowledged it (Redis C{WAIT}), so
    that a Sentinel failover cannot lose it; it is not supported with C{cluster}.
    """

    listen: str = "tcp:9091"
    redis_url: str | None = None
    namespace: str = "s3proxy"
    flush_interval: float = 1.0
    sentinels: tuple[str, ...] = ()
    sentinel_service: str | None = None
    cluster: bool = False
    max_pending_series: int = 100000
    wait_replicas: int = 0


@dataclass(frozen=True)
class UserConfig:
    """A client credential the proxy accepts for SigV4."""

    access_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class BackendConfig:
    """
    An S3-compatible backend and the credential the proxy signs with for it.

    Backends with a lower C{priority} are tried first. C{health_path}, when set, is requested with
    GET by health checks; C{health_bucket}, when set, is checked with HEAD instead of C{GET /}.
    """

    id: str
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    priority: int = 0
    health_path: str | None = None
    health_bucket: str | None = None


@dataclass(frozen=True)
class HealthConfig:
    """
    Health checking of backends; times in seconds.

    C{jitter} is a fraction of C{interval}; C{retry_budget} caps retries as a fraction of
    requests.
    """

    interval: float = 5.0
    timeout: float = 2.0
    failures_to_down: int = 3
    successes_to_up: int = 2
    cooldown: float = 10.0
    probe_requests: int = 1
    jitter: float = 0.1
    retry_budget: float = 0.2


@dataclass(frozen=True)
class CacheConfig:
    """The object cache; sizes in bytes, C{ttl} in seconds."""

    enabled: bool = False
    max_bytes: int = 256 * 1024**2
    max_object_bytes: int = 1024**2
    ttl: float = 60.0


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    server: ServerConfig
    metrics: MetricsConfig
    users: tuple[UserConfig, ...]
    backends: tuple[BackendConfig, ...]
    health: HealthConfig
    cache: CacheConfig


def load_config(
    path: str,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """
    Read the TOML file at C{path} and validate it.

    @param overrides: values that replace keys of the file, by dotted key path, for example
        C{{"server.listen": "tcp:9001", "metrics.redis_url": "redis://127.0.0.1/0"}}. A value
        L{None} leaves the file's value. Overrides are validated like the file.
    @param environ: where C{secret_key_env} names are looked up; default C{os.environ}.
    @raise ConfigError: the file cannot be read, is not TOML, or a value is invalid.
    """
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as err:
        raise ConfigError(
            f"cannot read config file {path!r}: {err.strerror}; check the --config path"
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path!r} is not valid TOML: {err}") from err
    return parse_config(raw, overrides, environ)


def parse_config(
    raw: Mapping[str, Any],
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """
    Validate an already parsed TOML document; see L{load_config} for the arguments.

    @raise ConfigError: a value is invalid.
    """
    document = _apply_overrides(raw, overrides or {})
    env = os.environ if environ is None else environ
    _check_keys(document, "", {"server", "metrics", "users", "backends", "health", "cache"})

    server = _parse_server(_table(document, "server"))
    metrics = _parse_metrics(_table(document, "metrics"), env)
    users = _parse_users(_array_of_tables(document, "users"), env)
    backends = _parse_backends(_array_of_tables(document, "backends"), env)
    health = _parse_health(_table(document, "health"))
    cache = _parse_cache(_table(document, "cache"))
    return Config(server, metrics, users, backends, health, cache)


# Overrides


def _apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, object]) -> dict[str, Any]:
    document: dict[str, Any] = dict(raw)
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key or section not in ("server", "metrics"):
            raise ConfigError(
                f"override {dotted!r} is not supported; use a key of [server] or [metrics]"
            )
        table = document.get(section, {})
        if not isinstance(table, dict):
            table = {}
        table = {**table, key: value}
        if dotted == "metrics.redis_url":
            # --redis-url replaces the file's URL however the file gives it.
            table.pop("redis_url_env", None)
        document[section] = table
    return document


# Sections


def _parse_server(table: Mapping[str, Any]) -> ServerConfig:
    defaults = ServerConfig()
    _check_keys(table, "server", set(ServerConfig.__dataclass_fields__))
    routing = _string(table, "server", "routing", defaults.routing)
    if routing not in ("failover", "round_robin"):
        raise ConfigError(
            f"server.routing {routing!r} is invalid; use 'failover' or 'round_robin'"
        )
    suffixes = _string_list(table, "server", "virtual_host_suffixes")
    for index, suffix in enumerate(suffixes):
        if not _HOST_NAME.fullmatch(suffix):
            raise ConfigError(
                f"server.virtual_host_suffixes[{index}] {suffix!r} is not a host name;"
                " use a DNS name such as 's3.local'"
            )
    return ServerConfig(
        listen=_endpoint(table, "server", "listen", defaults.listen, allow_empty=False),
        region=_nonempty_string(table, "server", "region", defaults.region),
        routing=routing,  # type: ignore[arg-type]  # checked against the Literal above
        max_object_size=_int(table, "server", "max_object_size", defaults.max_object_size, 1),
        max_header_bytes=_int(
            table, "server", "max_header_bytes", defaults.max_header_bytes, 1024
        ),
        request_timeout=_float(table, "server", "request_timeout", defaults.request_timeout),
        connect_timeout=_float(table, "server", "connect_timeout", defaults.connect_timeout),
        retry_body_max_bytes=_int(
            table, "server", "retry_body_max_bytes", defaults.retry_body_max_bytes, 0
        ),
        access_log_json=_bool(table, "server", "access_log_json", defaults.access_log_json),
        virtual_host_suffixes=tuple(s.lower() for s in suffixes),
        shutdown_timeout=_float(
            table, "server", "shutdown_timeout", defaults.shutdown_timeout, allow_zero=True
        ),
        header_timeout=_float(table, "server", "header_timeout", defaults.header_timeout),
    )


def _parse_metrics(table: Mapping[str, Any], env: Mapping[str, str]) -> MetricsConfig:
    defaults = MetricsConfig()
    _check_keys(table, "metrics", set(MetricsConfig.__dataclass_fields__) | {"redis_url_env"})
    redis_url: str | None = None
    if "redis_url" in table and "redis_url_env" in table:
        raise ConfigError(
            "metrics sets both redis_url and redis_url_env; keep only one of them"
        )
    if "redis_url_env" in table:
        # A URL with a password belongs in the environment rather than in the file.
        redis_url = _from_environment(table, "metrics", "redis_url_env", env)
    elif "redis_url" in table:
        redis_url = _nonempty_string(table, "metrics", "redis_url", "")
    if redis_url is not None:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", "rediss", "unix", *HA_SCHEMES) or not (
            parts.netloc or parts.path
        ):
            raise ConfigError(
                f"metrics.redis_url {redact_url(redis_url)!r} is not a Redis URL;"
                " use redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///PATH,"
                " redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE[/DB] or"
                " redis+cluster://HOST:PORT[,HOST:PORT]"
            )
        if parts.scheme in HA_SCHEMES:
            try:
                parse_ha_url(redis_url)
            except ValueError as err:
                raise ConfigError(
                    f"metrics.redis_url {redact_url(redis_url)!r} is invalid: {err}"
                ) from None
    sentinels = tuple(_string_list(table, "metrics", "sentinels"))
    sentinel_service = _optional_string(table, "metrics", "sentinel_service")
    cluster = _bool(table, "metrics", "cluster", defaults.cluster)
    try:
        store_url = metrics_url(redis_url, sentinels, sentinel_service, cluster)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    namespace = _nonempty_string(table, "metrics", "namespace", defaults.namespace)
    if not _BACKEND_ID.fullmatch(namespace):
        raise ConfigError(
            f"metrics.namespace {namespace!r} is invalid; use 1 to 64 of A-Z a-z 0-9 _ . -"
        )
    return MetricsConfig(
        listen=_endpoint(table, "metrics", "listen", defaults.listen, allow_empty=True),
        redis_url=store_url,
        namespace=namespace,
        flush_interval=_float(table, "metrics", "flush_interval", defaults.flush_interval),
        sentinels=sentinels,
        sentinel_service=sentinel_service,
        cluster=cluster,
        max_pending_series=_int(
            table, "metrics", "max_pending_series", defaults.max_pending_series, 1
        ),
        wait_replicas=_wait_replicas(table, store_url),
    )


def _wait_replicas(table: Mapping[str, Any], store_url: str | None) -> int:
    replicas = _int(table, "metrics", "wait_replicas", MetricsConfig.wait_replicas, 0)
    if replicas and store_url is not None and store_url.startswith("redis+cluster://"):
        raise ConfigError(
            f"metrics.wait_replicas {replicas!r} is not supported with Redis Cluster;"
            " set it to 0 or remove it"
        )
    return replicas


def _parse_users(tables: list[Mapping[str, Any]], env: Mapping[str, str]) -> tuple[UserConfig, ...]:
    if not tables:
        raise ConfigError(
            "users is missing; add at least one [[users]] table with access_key and secret_key"
        )
    users = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        path = f"users[{index}]"
        _check_keys(table, path, {"access_key", "secret_key", "secret_key_env"})
        access_key = _required_string(table, path, "access_key")
        if access_key in seen:
            raise ConfigError(
                f"{path}.access_key {access_key!r} is a duplicate; every user needs its own"
                " access key"
            )
        seen.add(access_key)
        users.append(UserConfig(access_key, _secret(table, path, env)))
    return tuple(users)


def _parse_backends(
    tables: list[Mapping[str, Any]], env: Mapping[str, str]
) -> tuple[BackendConfig, ...]:
    if not tables:
        raise ConfigError("backends is missing; add at least one [[backends]] table")
    backends = []
    seen: set[str] = set()
    allowed = set(BackendConfig.__dataclass_fields__) | {"secret_key_env"}
    for index, table in enumerate(tables):
        path = f"backends[{index}]"
        _check_keys(table, path, allowed)
        backend_id = _required_string(table, path, "id")
        if not _BACKEND_ID.fullmatch(backend_id):
            raise ConfigError(
                f"{path}.id {backend_id!r} is invalid; use 1 to 64 of A-Z a-z 0-9 _ . -"
            )
        if backend_id in seen:
            raise ConfigError(
                f"{path}.id {backend_id!r} is a duplicate; backend ids must be unique"
            )
        seen.add(backend_id)
        health_path = _optional_string(table, path, "health_path")
        if health_path is not None and not health_path.startswith("/"):
            raise ConfigError(
                f"{path}.health_path {health_path!r} is invalid; it must start with '/'"
            )
        health_bucket = _optional_string(table, path, "health_bucket")
        if health_bucket is not None and not _HEALTH_BUCKET.fullmatch(health_bucket):
            raise ConfigError(
                f"{path}.health_bucket {health_bucket!r} is invalid; give a bucket name of"
                " 1 to 255 characters without '/' or spaces"
            )
        backends.append(
            BackendConfig(
                id=backend_id,
                endpoint=_backend_endpoint(table, path),
                access_key=_required_string(table, path, "access_key"),
                secret_key=_secret(table, path, env),
                region=_nonempty_string(table, path, "region", "us-east-1"),
                priority=_int(table, path, "priority", 0, None),
                health_path=health_path,
                health_bucket=health_bucket,
            )
        )
    return tuple(backends)


def _parse_health(table: Mapping[str, Any]) -> HealthConfig:
    d = HealthConfig()
    _check_keys(table, "health", set(HealthConfig.__dataclass_fields__))
    return HealthConfig(
        interval=_float(table, "health", "interval", d.interval),
        timeout=_float(table, "health", "timeout", d.timeout),
        failures_to_down=_int(table, "health", "failures_to_down", d.failures_to_down, 1),
        successes_to_up=_int(table, "health", "successes_to_up", d.successes_to_up, 1),
        # 0 would put a dead backend back to PROBING at once, in a loop of checks and logs.
        cooldown=_float(table, "health", "cooldown", d.cooldown),
        probe_requests=_int(table, "health", "probe_requests", d.probe_requests, 1),
        jitter=_fraction(table, "health", "jitter", d.jitter),
        retry_budget=_fraction(table, "health", "retry_budget", d.retry_budget),
    )


def _parse_cache(table: Mapping[str, Any]) -> CacheConfig:
    d = CacheConfig()
    _check_keys(table, "cache", set(CacheConfig.__dataclass_fields__))
    return CacheConfig(
        enabled=_bool(table, "cache", "enabled", d.enabled),
        max_bytes=_int(table, "cache", "max_bytes", d.max_bytes, 1),
        max_object_bytes=_int(table, "cache", "max_object_bytes", d.max_object_bytes, 1),
        ttl=_float(table, "cache", "ttl", d.ttl),
    )


# Typed accessors. Each names the key path in its error message.


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_keys(table: Mapping[str, Any], path: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            where = f"in [{path}]" if path else "at the top level"
            raise ConfigError(
                f"unknown key {_key(path, key)!r} {where}; accepted keys: "
                + ", ".join(sorted(allowed))
            )


def _table(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table [{name}], not a {_type_name(value)}")
    return value


def _array_of_tables(document: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    value = document.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(
            f"{name} must be an array of tables [[{name}]], not a {_type_name(value)}"
        )
    return value


def _string(table: Mapping[str, Any], path: str, key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(
            f"{_key(path, key)} {value!r} has type {_type_name(value)}; it must be a string"
        )
    return value


def _nonempty_string(table: Mapping[str, Any], path: str, key: str, default: str) -> str:
    value = _string(table, path, key, default)
    if not value:
        raise ConfigError(f"{_key(path, key)} is empty; it must be a non-empty string")
    return value


def _required_string(table: Mapping[str, Any], path: str, key: str) -> str:
    if key not in table:
        raise ConfigError(f"{_key(path, key)} is missing; it is required")
    return _nonempty_string(table, path, key, "")


def _optional_string(table: Mapping[str, Any], path: str, key: str) -> str | None:
    if key not in table:
        return None
    return _nonempty_string(table, path, key, "")


def _string_list(table: Mapping[str, Any], path: str, key: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f"{_key(path, key)} {value!r} is invalid; it must be a list of strings"
        )
    return value


def _bool(table: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(
            f"{_key(path, key)} {value!r} has type {_type_name(value)}; use true or false"
        )
    return value


def _int(
    table: Mapping[str, Any], path: str, key: str, default: int, minimum: int | None
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{_key(path, key)} {value!r} has type {_type_name(value)}; it must be an integer"
        )
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_key(path, key)} {value!r} is too small; it must be >= {minimum}")
    return value


def _float(
    table: Mapping[str, Any], path: str, key: str, default: float, allow_zero: bool = False
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{_key(path, key)} {value!r} has type {_type_name(value)}; it must be a number"
        )
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{_key(path, key)} {value!r} is invalid; it must be a finite number")
    if number < 0 or (number == 0 and not allow_zero):
        accepted = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{_key(path, key)} {value!r} is out of range; it must be {accepted}")
    return number


def _fraction(table: Mapping[str, Any], path: str, key: str, default: float) -> float:
    value = _float(table, path, key, default, allow_zero=True)
    if value > 1:
        raise ConfigError(
            f"{_key(path, key)} {value!r} is out of range; it must be between 0 and 1"
        )
    return value


def _endpoint(
    table: Mapping[str, Any], path: str, key: str, default: str, allow_empty: bool
) -> str:
    value = _string(table, path, key, default)
    if not value:
        if allow_empty:
            return value
        raise ConfigError(
            f"{_key(path, key)} is empty; use a Twisted endpoint description such as"
            " 'tcp:9000:interface=127.0.0.1'"
        )
    try:
        # Parsing builds the endpoint object without listening; an ssl description also loads
        # its certificate and key files here, so a missing file is reported now.
        serverFromString(None, value)
    except Exception as err:
        raise ConfigError(
            f"{_key(path, key)} {value!r} is not a valid endpoint description ({err});"
            " use for example 'tcp:9000:interface=127.0.0.1' or"
            " 'ssl:9443:privateKey=key.pem:certKey=cert.pem'"
        ) from err
    return value


def _backend_endpoint(table: Mapping[str, Any], path: str) -> str:
    value = _required_string(table, path, "endpoint")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"{path}.endpoint {value!r} has an invalid port ({err})") from err
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or (port is not None and port == 0)
    ):
        raise ConfigError(
            f"{path}.endpoint {value!r} is not a valid backend URL;"
            " use http://HOST[:PORT] or https://HOST[:PORT] without a path or credentials"
        )
    return value.rstrip("/")


def _from_environment(
    table: Mapping[str, Any], path: str, key: str, env: Mapping[str, str]
) -> str:
    """Return the value of the environment variable that ``table[key]`` names."""
    name = _nonempty_string(table, path, key, "")
    if not _ENV_NAME.fullmatch(name):
        raise ConfigError(f"{path}.{key} {name!r} is not an environment variable name")
    value = env.get(name)
    if not value:
        raise ConfigError(
            f"{path}.{key} names the environment variable {name!r}, which is"
            " not set or empty; export it before starting the proxy"
        )
    return value


def _secret(table: Mapping[str, Any], path: str, env: Mapping[str, str]) -> str:
    has_value = "secret_key" in table
    has_env = "secret_key_env" in table
    if has_value and has_env:
        raise ConfigError(
            f"{path} sets both secret_key and secret_key_env; keep only one of them"
        )
    if has_value:
        value = table["secret_key"]
        if not isinstance(value, str) or not value:
            # The value itself is a secret, so only its type goes into the message.
            raise ConfigError(
                f"{path}.secret_key has type {_type_name(value)} or is empty;"
                " it must be a non-empty string"
            )
        return value
    if has_env:
        return _from_environment(table, path, "secret_key_env", env)
    raise ConfigError(f"{path}.secret_key is missing; set secret_key or secret_key_env")
