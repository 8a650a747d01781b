"""The invalidation bus publishes from threads of its own, not from the reactor's thread pool.

With Redis hung (SIGSTOP, a black-holed route), every publish holds its thread for the socket
timeout. When publishes ran in the reactor's pool, a burst of writes filled it and name
resolution for new backend connections waited behind them: a GET took 16 to 19 s.
"""

from __future__ import annotations

import threading
from typing import Any

import fakeredis
import pytest

from proxy.invalidation_bus import PUBLISH_THREADS, RedisInvalidationBus
from tests.proxy.test_cache_invalidation import ThreadReactor


class PoollessReactor(ThreadReactor):
    """A reactor whose thread pool must not be used."""

    def getThreadPool(self) -> Any:
        pytest.fail("the invalidation bus used the reactor's thread pool")


class SilentRedis(fakeredis.FakeRedis):
    """A client whose PUBLISH blocks until ``replied`` is set, like a Redis that hangs."""

    def __init__(self, replied: threading.Event, threads: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._replied = replied
        self._threads = threads

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        self._threads.append(threading.current_thread().name)
        self._replied.wait(timeout=10)
        return super().publish(channel, message, **kwargs)


def test_publish_own_pool() -> None:
    """Blocked publishes fill the bus's own threads and leave the reactor's pool alone."""
    replied = threading.Event()
    threads: list[str] = []
    reactor = PoollessReactor()
    bus = RedisInvalidationBus(
        lambda: SilentRedis(replied, threads, server=fakeredis.FakeServer()),
        "test",
        "proxy-a",
        reactor,  # type: ignore[arg-type]
        publish_timeout=None,
    )
    published: list[None] = []
    for number in range(PUBLISH_THREADS + 2):
        bus.publish("bucket", [f"key-{number}"]).addCallback(published.append)

    waited = 0
    while len(threads) < PUBLISH_THREADS and waited < 100:
        threading.Event().wait(0.1)
        waited += 1
    replied.set()
    reactor.run_until(lambda: len(published) == PUBLISH_THREADS + 2)

    closed: list[Any] = []
    bus.close().addBoth(closed.append)
    reactor.run_until(lambda: bool(closed))

    assert len(threads) == PUBLISH_THREADS + 2
    assert all("cache-invalidation publish" in name for name in threads)
    assert closed == [None]
