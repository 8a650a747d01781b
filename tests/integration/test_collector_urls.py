"""Redis URLs with a password and a unix socket against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from collector import open_monitoring
from collector.store import RedisStore, encode_field
from tests.support.collector import run_now
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw"


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with a password and a unix socket next to its TCP port."""
    # Unix socket paths are limited to about 100 bytes, so keep this one short.
    socket_path = Path("/tmp") / f"s3proxy-test-{tmp_path.name[-20:]}.sock"
    server = RedisServer(tmp_path, extra_args=["--unixsocket", str(socket_path)]).start()
    server.client().config_set("requirepass", PASSWORD)
    server.socket_path = socket_path  # type: ignore[attr-defined]
    yield server
    server.stop()


def _flush_one(url: str) -> tuple[object, list[dict[str, object]]]:
    clock = Clock()
    monitoring = open_monitoring(url, namespace="urls", reactor=clock, run_in_thread=run_now,
                                 writer_id="h:1:a")
    with capturedLogs() as events:
        monitoring.service.startService()
        monitoring.metrics.cache_hits_total.inc(3)
        clock.advance(1)
        monitoring.service.stopService()
    return monitoring, list(events)


def _hits(store: RedisStore) -> float:
    fields = store.read(["s3proxy_cache_hits_total"]).families["s3proxy_cache_hits_total"]
    return float(fields[encode_field([])])


def test_password_url(protected_redis: RedisServer) -> None:
    """redis://:password@host:port/db writes through a password-protected Redis."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{protected_redis.port}/3"
    monitoring, _ = _flush_one(url)
    assert _hits(monitoring.store) == 3  # type: ignore[attr-defined]


def test_unix_socket_url(protected_redis: RedisServer) -> None:
    """unix:///path?db=N&password=... writes through the unix socket."""
    socket_path = protected_redis.socket_path  # type: ignore[attr-defined]
    url = f"unix://{socket_path}?db=2&password={PASSWORD}"
    monitoring, _ = _flush_one(url)
    assert _hits(monitoring.store) == 3  # type: ignore[attr-defined]


def test_wrong_password_not_logged(protected_redis: RedisServer) -> None:
    """With a wrong password the flush fails and no log event contains the password."""
    wrong = "wrong-pw-123"
    url = f"redis://:{wrong}@127.0.0.1:{protected_redis.port}/0"
    monitoring, events = _flush_one(url)

    assert monitoring.service.pending is not None  # type: ignore[attr-defined]
    logged = " ".join(repr(event) for event in events)
    assert "flush of batch" in logged
    assert wrong not in logged
