"""Unit tests of the cache invalidation bus on fakeredis pub/sub."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fakeredis
import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from proxy.cache import Miss, ObjectCache
from proxy.cache_invalidation import (
    RedisInvalidationBus,
    decode_message,
    encode_message,
    invalidation_channel,
    written_keys,
)
from tests.proxy.test_cache import AUTH, FakeMetrics, Settings, request, result, store

CHANNEL = invalidation_channel("test")


class ThreadReactor:
    """Collects callFromThread calls; the test thread runs them, as the reactor would."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        self.calls.put((function, args))

    def run_until(self, condition: Callable[[], bool]) -> None:
        """Run delivered calls until ``condition`` holds; fail after 10 s without a call."""
        while not condition():
            try:
                function, args = self.calls.get(timeout=10)
            except queue.Empty:
                pytest.fail("the subscriber thread delivered nothing for 10 s")
            function(*args)


class RecordingListener:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def subscription_ready(self) -> None:
        self.events.append(("ready",))

    def subscription_lost(self, reason: str) -> None:
        self.events.append(("lost",))

    def invalidation_received(self, bucket: str, keys: Sequence[str]) -> None:
        self.events.append(("invalidate", bucket, list(keys)))


def run_inline(work: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(work)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def make_bus(
    server: fakeredis.FakeServer, origin: str, reactor: ThreadReactor
) -> RedisInvalidationBus:
    return RedisInvalidationBus(
        lambda: fakeredis.FakeRedis(server=server),
        CHANNEL,
        origin,
        reactor,  # type: ignore[arg-type]
        run_in_thread=run_inline,
        max_backoff=0.2,
        publish_timeout=None,
    )


@pytest.fixture
def buses(server: fakeredis.FakeServer) -> Iterator[list[RedisInvalidationBus]]:
    created: list[RedisInvalidationBus] = []
    yield created
    for bus in created:
        bus.close()


def test_message_round_trip() -> None:
    """An encoded message decodes to the same origin, bucket and keys."""
    payload = encode_message("proxy-1", "photos", ["a.jpg", "ü/b"])
    assert decode_message(payload) == ("proxy-1", "photos", ["a.jpg", "ü/b"])


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"origin": "p", "bucket": "b"}',
        b'{"origin": "p", "bucket": "b", "keys": [1]}',
    ],
)
def test_malformed_message_rejected(payload: bytes) -> None:
    """A payload that is not a complete invalidation message raises ValueError."""
    with pytest.raises(ValueError):
        decode_message(payload)


def test_channel_in_hash_tag() -> None:
    """The channel name carries the deployment's hash tag."""
    assert invalidation_channel("s3proxy") == "{s3proxy}:cache:invalidate"


def test_subscriber_delivers(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """The subscriber reports readiness, then delivers other proxies' invalidations only."""
    reactor = ThreadReactor()
    listener = RecordingListener()
    receiver = make_bus(server, "proxy-a", reactor)
    sender = make_bus(server, "proxy-b", ThreadReactor())
    buses.extend([receiver, sender])
    receiver.subscribe(listener)
    reactor.run_until(lambda: ("ready",) in listener.events)

    receiver.publish("bucket", ["own"])
    sender.publish("bucket", ["k1", "k2"])
    reactor.run_until(lambda: len(listener.events) >= 2)
    assert listener.events == [("ready",), ("invalidate", "bucket", ["k1", "k2"])]


def test_subscriber_reports_loss(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """A broken connection is reported as lost, and a new subscription as ready again."""
    reactor = ThreadReactor()
    listener = RecordingListener()
    bus = make_bus(server, "proxy-a", reactor)
    buses.append(bus)
    bus.subscribe(listener)
    reactor.run_until(lambda: ("ready",) in listener.events)

    server.connected = False
    reactor.run_until(lambda: ("lost",) in listener.events)
    server.connected = True
    reactor.run_until(lambda: listener.events[-1] == ("ready",))
    assert listener.events[0] == ("ready",)
    assert ("lost",) in listener.events


def test_publish_failure_is_logged(server: fakeredis.FakeServer) -> None:
    """A failed publish logs a warning and still fires its Deferred with None."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bus = make_bus(server, "proxy-a", ThreadReactor())
        server.connected = False
        outcome: list[Any] = []
        bus.publish("bucket", ["key"]).addBoth(outcome.append)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcome == [None]
    assert any(event.get("bucket") == "bucket" for event in events)


def test_publish_timeout_releases_caller() -> None:
    """A publish that Redis does not answer releases its caller after publish_timeout."""
    clock = Clock()
    pending: Deferred[Any] = Deferred()

    class ClockReactor(ThreadReactor):
        def callLater(self, delay: float, function: Callable[..., Any], *args: Any) -> Any:
            return clock.callLater(delay, function, *args)

    bus = RedisInvalidationBus(
        lambda: fakeredis.FakeRedis(server=fakeredis.FakeServer()),
        CHANNEL,
        "proxy-a",
        ClockReactor(),  # type: ignore[arg-type]
        run_in_thread=lambda work: pending,
        publish_timeout=1.0,
    )
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)
    clock.advance(0.9)
    assert outcome == []
    clock.advance(0.1)
    assert outcome == [None]


def test_fleet_invalidation_evicts(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """An invalidation by proxy B evicts proxy A's entry through pub/sub."""
    reactor_a = ThreadReactor()
    bus_a = make_bus(server, "proxy-a", reactor_a)
    bus_b = make_bus(server, "proxy-b", ThreadReactor())
    buses.extend([bus_a, bus_b])
    cache_a = ObjectCache(Settings(), FakeMetrics(), Clock(), bus_a)
    cache_b = ObjectCache(Settings(enabled=False), FakeMetrics(), Clock(), bus_b)
    cache_a.startService()
    cache_b.startService()
    reactor_a.run_until(lambda: cache_a.caching)
    store(cache_a, "key", b"old")
    assert len(cache_a) == 1

    cache_b.invalidate("bucket", ["key"])
    reactor_a.run_until(lambda: len(cache_a) == 0)
    assert ("bucket", "key", None) not in cache_a


def test_cache_off_until_subscribed(server: fakeredis.FakeServer) -> None:
    """Before the first subscription is confirmed, the cache neither answers nor stores."""
    bus = make_bus(server, "proxy-a", ThreadReactor())
    cache = ObjectCache(Settings(), FakeMetrics(), Clock(), bus)
    store(cache, "key", b"hello")
    assert len(cache) == 0
    assert not cache.caching
    assert isinstance(result(cache.lookup(AUTH, request())), Miss)


def test_null_keys_round_trip() -> None:
    """A message for unknown keys carries null and decodes to None."""
    assert decode_message(encode_message("p", "bucket", None)) == ("p", "bucket", None)


DELETE_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Object><Key>a.txt</Key></Object>"
    b"<Object><Key>dir/b &amp; c.txt</Key><VersionId>v1</VersionId></Object>"
    b"<Quiet>true</Quiet></Delete>"
)


@pytest.mark.parametrize(
    ("operation", "method", "key", "body", "expected"),
    [
        ("put_object", "PUT", "k", None, ["k"]),
        ("copy_object", "PUT", "k", None, ["k"]),
        ("delete_object", "DELETE", "k", None, ["k"]),
        ("complete_multipart_upload", "POST", "k", None, ["k"]),
        ("other", "PUT", "k", None, ["k"]),
        ("upload_part", "PUT", "k", None, []),
        ("create_multipart_upload", "POST", "k", None, []),
        ("abort_multipart_upload", "DELETE", "k", None, []),
        ("get_object", "GET", "k", None, []),
        ("create_bucket", "PUT", None, None, []),
        ("delete_objects", "POST", None, DELETE_BODY, ["a.txt", "dir/b & c.txt"]),
        ("delete_objects", "POST", None, None, None),
        ("delete_objects", "POST", None, b"<Delete><Object>", None),
        ("delete_objects", "POST", None, b'<!doctype d [<!ENTITY e "k">]><Delete/>', None),
    ],
)
def test_written_keys(
    operation: str, method: str, key: str | None, body: bytes | None, expected: list[str] | None
) -> None:
    """Writes name the keys they change; DeleteObjects names them in its body."""
    assert written_keys(operation, method, key, body) == expected


def test_unknown_keys_empty_cache() -> None:
    """Invalidating unknown keys (None) empties the whole cache."""
    cache = ObjectCache(Settings(), FakeMetrics(), Clock())
    cache.startService()
    store(cache, "key", b"hello")
    store(cache, "other", b"hello")
    cache.invalidate("bucket", None)
    assert len(cache) == 0


def test_outage_warns_once(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """Repeated failed attempts during one outage log one warning, not one per attempt."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = ThreadReactor()
        listener = RecordingListener()
        bus = make_bus(server, "proxy-a", reactor)
        buses.append(bus)
        server.connected = False
        bus.subscribe(listener)
        reactor.run_until(lambda: listener.events.count(("lost",)) >= 3)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [
        event
        for event in events
        if event["log_level"].name == "warn"
        and event.get("log_namespace", "").startswith("proxy.cache_invalidation")
    ]
    assert len(warnings) == 1
