"""Fixtures for the collector unit tests."""

from __future__ import annotations

import fakeredis
import pytest
from twisted.internet.task import Clock

from collector.store import RedisStore


@pytest.fixture
def clock() -> Clock:
    """A task.Clock at 1000 s."""
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    """A fresh fakeredis server with Lua support."""
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def redis_store(fake_redis: fakeredis.FakeRedis) -> RedisStore:
    """A RedisStore on fakeredis with namespace ``test``."""
    return RedisStore(fake_redis, namespace="test")
