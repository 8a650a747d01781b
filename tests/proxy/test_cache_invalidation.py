"""Unit tests of the cache invalidation bus on fakeredis pub/sub."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fakeredis
import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from proxy.cache import Miss, ObjectCache
from proxy.cache_invalidation import (
    Invalidation,
    confirmation_channel,
    decode_confirmation,
    decode_message,
    encode_confirmation,
    encode_message,
    invalidation_channel,
    registry_key,
    written_keys,
)
from proxy.invalidation_bus import RedisInvalidationBus
from tests.proxy.test_cache import AUTH, FakeMetrics, Settings, request, result, store

CHANNEL = invalidation_channel("test")
CONFIRMATIONS_B = confirmation_channel("test", "proxy-b")
REGISTRY = registry_key("test")


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

    def run_pending(self) -> None:
        """Run the calls delivered so far."""
        while not self.calls.empty():
            function, args = self.calls.get_nowait()
            function(*args)


class ClockReactor(ThreadReactor):
    """A ThreadReactor whose time is a task.Clock."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()

    def callLater(self, delay: float, function: Callable[..., Any], *args: Any) -> Any:
        return self.clock.callLater(delay, function, *args)

    def seconds(self) -> float:
        return self.clock.seconds()


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
    server: fakeredis.FakeServer,
    origin: str,
    reactor: ThreadReactor,
    publish_timeout: float | None = None,
) -> RedisInvalidationBus:
    clock = reactor.clock.seconds if isinstance(reactor, ClockReactor) else time.monotonic
    return RedisInvalidationBus(
        lambda: fakeredis.FakeRedis(server=server),
        "test",
        origin,
        reactor,  # type: ignore[arg-type]
        run_in_thread=run_inline,
        max_backoff=0.2,
        publish_timeout=publish_timeout,
        clock=clock,
    )


@pytest.fixture
def buses(server: fakeredis.FakeServer) -> Iterator[list[RedisInvalidationBus]]:
    created: list[RedisInvalidationBus] = []
    yield created
    for bus in created:
        bus.close()


def caching_bus(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus], origin: str
) -> tuple[ThreadReactor, RecordingListener, RedisInvalidationBus]:
    """Return a bus with a listener, once both of its subscriptions are confirmed."""
    reactor = ThreadReactor()
    listener = RecordingListener()
    bus = make_bus(server, origin, reactor)
    buses.append(bus)
    bus.subscribe(listener)
    reactor.run_until(lambda: ("ready",) in listener.events and bus.confirming)
    return reactor, listener, bus


def test_message_round_trip() -> None:
    """An encoded message decodes to the same origin, bucket and keys."""
    payload = encode_message("proxy-1", "photos", ["a.jpg", "ü/b"])
    assert decode_message(payload) == Invalidation("proxy-1", "photos", ["a.jpg", "ü/b"])
    numbered = encode_message("proxy-1", "photos", ["a.jpg"], message_id=7)
    assert decode_message(numbered) == Invalidation("proxy-1", "photos", ["a.jpg"], 7)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"origin": "p", "bucket": "b"}',
        b'{"origin": "p", "bucket": "b", "keys": [1]}',
        b'{"origin": "p", "bucket": "b", "keys": [], "id": 0}',
        b'{"origin": "p", "bucket": "b", "keys": [], "id": true}',
        b'{"origin": "p", "bucket": "b", "keys": [], "id": "7"}',
    ],
)
def test_malformed_message_rejected(payload: bytes) -> None:
    """A payload that is not a complete invalidation message raises ValueError."""
    with pytest.raises(ValueError):
        decode_message(payload)


def test_channel_in_hash_tag() -> None:
    """The channel name carries the deployment's hash tag."""
    assert invalidation_channel("s3proxy") == "{s3proxy}:cache:invalidate"
    assert confirmation_channel("s3proxy", "h:1") == "{s3proxy}:cache:confirm:h:1"


def test_confirmation_round_trip() -> None:
    """A confirmation decodes to the confirming origin and the message id."""
    assert decode_confirmation(encode_confirmation("proxy-2", 41)) == ("proxy-2", 41)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{}", b'{"origin": "p"}', b'{"id": 3}', b'{"origin": "p", "id": -1}', b"[1]"],
)
def test_malformed_confirmation_rejected(payload: bytes) -> None:
    """A payload that is not a confirmation raises ValueError."""
    with pytest.raises(ValueError):
        decode_confirmation(payload)


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
    reactor, listener, bus = caching_bus(server, buses, "proxy-a")

    server.connected = False
    reactor.run_until(lambda: ("lost",) in listener.events)
    server.connected = True
    reactor.run_until(lambda: listener.events[-1] == ("ready",))
    assert listener.events[0] == ("ready",)
    assert ("lost",) in listener.events


def test_publish_failure_is_logged(server: fakeredis.FakeServer) -> None:
    """A failed publish logs a warning and still fires its Deferred, with False."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bus = make_bus(server, "proxy-a", ThreadReactor())
        server.connected = False
        outcome: list[Any] = []
        bus.publish("bucket", ["key"]).addBoth(outcome.append)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcome == [False]
    assert any(event.get("bucket") == "bucket" for event in events)


def test_publish_timeout_releases_caller() -> None:
    """A publish that Redis does not answer releases its caller after publish_timeout."""
    reactor = ClockReactor()
    pending: Deferred[Any] = Deferred()
    bus = RedisInvalidationBus(
        lambda: fakeredis.FakeRedis(server=fakeredis.FakeServer()),
        "test",
        "proxy-a",
        reactor,  # type: ignore[arg-type]
        run_in_thread=lambda work: pending,
        publish_timeout=1.0,
    )
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)
    reactor.clock.advance(0.9)
    assert outcome == []
    reactor.clock.advance(0.1)
    assert outcome == [False]
    assert reactor.clock.getDelayedCalls() == []


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
    assert decode_message(encode_message("p", "bucket", None)) == Invalidation("p", "bucket", None)


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
        and event.get("log_namespace", "").startswith("proxy.invalidation_bus")
    ]
    assert len(warnings) == 1


def subscribed_pair(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus], publish_timeout: float | None
) -> tuple[ThreadReactor, RecordingListener, ClockReactor, RedisInvalidationBus]:
    """Proxy A caches (listener), proxy B has the cache off; both subscriptions confirmed."""
    reactor_a, listener, _bus_a = caching_bus(server, buses, "proxy-a")
    reactor_b = ClockReactor()
    bus_b = make_bus(server, "proxy-b", reactor_b, publish_timeout)
    buses.append(bus_b)
    bus_b.subscribe(None)
    reactor_b.run_until(lambda: bus_b.confirming)
    return reactor_a, listener, reactor_b, bus_b


def test_publish_waits_for_eviction(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """A confirmed publish fires only after the other proxy's reactor has run the eviction."""
    reactor_a, listener, reactor_b, bus_b = subscribed_pair(server, buses, None)
    outcome: list[Any] = []
    bus_b.publish("bucket", ["key"]).addBoth(outcome.append)

    # A's subscriber thread hands the message to A's reactor, which has not run it yet: no
    # confirmation can exist, whatever B's reactor does.
    waited = 0.0
    while reactor_a.calls.empty():
        assert waited < 10, "proxy A's subscriber thread delivered nothing for 10 s"
        threading.Event().wait(0.01)
        waited += 0.01
    reactor_b.run_pending()
    assert outcome == []
    assert ("invalidate", "bucket", ["key"]) not in listener.events

    reactor_a.run_until(lambda: ("invalidate", "bucket", ["key"]) in listener.events)
    reactor_b.run_until(lambda: outcome != [])
    assert outcome == [True]


def test_publish_confirmed_by_itself(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """A caching proxy receives its own message and confirms it without evicting again."""
    reactor, listener, bus = caching_bus(server, buses, "proxy-a")
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)
    reactor.run_until(lambda: outcome != [])
    assert outcome == [True]
    assert listener.events == [("ready",)]


def confirming_writer(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> tuple[ClockReactor, RedisInvalidationBus]:
    """Return a writer with the cache off, once its confirmation subscription is ready."""
    reactor = ClockReactor()
    bus = make_bus(server, "proxy-b", reactor, publish_timeout=1.0)
    buses.append(bus)
    bus.subscribe(None)
    reactor.run_until(lambda: bus.confirming)
    return reactor, bus


def test_publish_without_registered_proxies_confirmed(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """With no caching proxy registered there is nothing to wait for, strangers or not."""
    reactor, bus = confirming_writer(server, buses)
    # A client that is not a proxy, as redis-cli SUBSCRIBE: PUBLISH counts it, the bus does not.
    stranger = fakeredis.FakeRedis(server=server).pubsub()
    stranger.subscribe(CHANNEL)
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)
    assert outcome == [True]
    assert reactor.clock.getDelayedCalls() == []
    assert fakeredis.FakeRedis(server=server).zcard(REGISTRY) == 0


def test_publish_before_subscription_unconfirmed(server: fakeredis.FakeServer) -> None:
    """Without its confirmation subscription a bus cannot confirm; it does not wait either."""
    bus = make_bus(server, "proxy-b", ThreadReactor())
    listener = fakeredis.FakeRedis(server=server).pubsub()
    listener.subscribe(CHANNEL)
    confirmed: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(confirmed.append)
    unasked: list[Any] = []
    bus.publish("bucket", ["key"], confirm=False).addBoth(unasked.append)
    assert confirmed == [False]
    assert unasked == [True]
    listener.get_message(timeout=1)
    first = listener.get_message(timeout=1)
    assert first is not None
    assert decode_message(first["data"]).message_id is None


def warnings_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        event
        for event in events
        if event["log_level"].name == "warn"
        and event.get("log_namespace", "").startswith("proxy.invalidation_bus")
    ]


def writer_with_ghost(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> tuple[ClockReactor, RedisInvalidationBus]:
    """
    Return a writer whose confirmation subscription is ready, and register a ghost proxy.

    The ghost, ``proxy-x``, is in the registry but has no subscription, like a proxy whose
    connection Redis dropped without the proxy noticing. Its score lies an hour ahead, so it
    does not expire during the test.
    """
    reactor, bus = confirming_writer(server, buses)
    redis_client = fakeredis.FakeRedis(server=server)
    seconds, microseconds = redis_client.time()
    redis_client.zadd(REGISTRY, {"proxy-x": (seconds + 3600) * 1000 + microseconds // 1000})
    return reactor, bus


def test_missing_confirmation_times_out(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """A registered proxy that never confirms releases the write after the timeout."""
    reactor, bus = writer_with_ghost(server, buses)

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        outcomes: list[Any] = []
        for published in range(3):
            bus.publish("bucket", ["key"]).addBoth(outcomes.append)
            reactor.clock.advance(0.999)
            assert len(outcomes) == published
            reactor.clock.advance(0.001)
        reactor.clock.advance(RedisInvalidationBus.WARNING_INTERVAL)
        bus.publish("bucket", ["key"]).addBoth(outcomes.append)
        reactor.clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcomes == [False] * 4
    warnings = warnings_of(events)
    assert [event["problem"] for event in warnings] == [
        "0 of 1 registered proxies confirmed the eviction; missing: proxy-x"
    ] * 2
    assert [event["skipped"] for event in warnings] == [0, 2]


def test_subscription_loss_releases_waiting_writes(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """When the confirmation subscription drops, waiting writes are unconfirmed at the timeout."""
    reactor, bus = writer_with_ghost(server, buses)
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)
    assert outcome == []

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server.connected = False
        reactor.run_until(lambda: not bus.confirming)
        # Held back: a proxy cut off at the same moment may still have a lease.
        assert outcome == []
        reactor.clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcome == [False]
    problems = [event["problem"] for event in warnings_of(events) if "problem" in event]
    assert problems == ["the writer's own confirmation subscription was lost"]
    server.connected = True
    reactor.run_until(lambda: bus.confirming)


def test_unconfirmable_write_held_back(server: fakeredis.FakeServer) -> None:
    """A write that cannot be confirmed fires its Deferred at the timeout, not at once."""
    reactor = ClockReactor()
    bus = make_bus(server, "proxy-b", reactor, publish_timeout=1.0)
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)
    reactor.clock.advance(0.999)
    assert outcome == []
    reactor.clock.advance(0.001)
    assert outcome == [False]


def test_cacheless_fleet_not_held_back(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """With its cache off and an empty registry, a failed publish fires False at once."""
    reactor, bus = confirming_writer(server, buses)
    confirmed: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(confirmed.append)
    assert confirmed == [True]

    server.connected = False
    failed: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(failed.append)
    assert failed == [False]
    assert reactor.clock.getDelayedCalls() == []


def test_malformed_confirmation_ignored(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """Garbage and unknown ids on the confirmation channel neither crash nor confirm."""
    reactor, bus = writer_with_ghost(server, buses)
    outcome: list[Any] = []
    bus.publish("bucket", ["key"]).addBoth(outcome.append)

    sender = fakeredis.FakeRedis(server=server)
    sender.publish(CONFIRMATIONS_B, b"not json")
    sender.publish(CONFIRMATIONS_B, b"[" * 100_000)
    sender.publish(CONFIRMATIONS_B, encode_confirmation("proxy-x", 999))
    sender.publish(CONFIRMATIONS_B, encode_confirmation("proxy-x", 1))
    reactor.run_until(lambda: outcome != [])
    # The last one confirms the only registered proxy, so the earlier ones were survived.
    assert outcome == [True]


def test_caching_bus_registers(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """A caching proxy is in the registry while subscribed; one with the cache off never is."""
    redis_client = fakeredis.FakeRedis(server=server)
    _reactor, _listener, bus = caching_bus(server, buses, "proxy-a")
    writer_reactor = ThreadReactor()
    writer = make_bus(server, "proxy-b", writer_reactor)
    buses.append(writer)
    writer.subscribe(None)
    writer_reactor.run_until(lambda: writer.confirming)
    assert redis_client.zrange(REGISTRY, 0, -1) == [b"proxy-a"]

    closed: list[Any] = []
    bus.close().addBoth(closed.append)
    assert closed == [None]
    assert redis_client.zcard(REGISTRY) == 0


def test_lease_follows_pongs(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """Serving stops when no PING sent within the lease has its PONG, and resumes after one."""
    reactor = ClockReactor()
    listener = RecordingListener()
    bus = make_bus(server, "proxy-a", reactor)
    buses.append(bus)
    assert not bus.serving_allowed()
    bus.subscribe(listener)
    reactor.run_until(bus.serving_allowed)

    reactor.clock.advance(0.76)
    assert not bus.serving_allowed()
    # The next PING carries the advanced time, and its PONG renews the lease.
    reactor.run_until(bus.serving_allowed)

    server.connected = False
    reactor.run_until(lambda: ("lost",) in listener.events)
    assert not bus.serving_allowed()


def test_deeply_nested_message_survived(
    server: fakeredis.FakeServer, buses: list[RedisInvalidationBus]
) -> None:
    """A message nested too deeply for json empties the cache; the subscriber goes on."""
    reactor, listener, _bus = caching_bus(server, buses, "proxy-a")
    sender = fakeredis.FakeRedis(server=server)
    sender.publish(CHANNEL, b"[" * 100_000)
    sender.publish(CHANNEL, encode_message("proxy-b", "bucket", ["after"]))
    reactor.run_until(lambda: ("invalidate", "bucket", ["after"]) in listener.events)
    assert listener.events[1:3] == [("lost",), ("ready",)]


def test_unexpected_error_resubscribes(
    server: fakeredis.FakeServer,
    buses: list[RedisInvalidationBus],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception in the subscriber counts as a lost subscription."""
    reactor, listener, _bus = caching_bus(server, buses, "proxy-a")
    calls: list[bytes] = []

    def decode_once_wrongly(payload: bytes) -> Invalidation:
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("a bug in decoding")
        return decode_message(payload)

    monkeypatch.setattr("proxy.invalidation_bus.decode_message", decode_once_wrongly)
    sender = fakeredis.FakeRedis(server=server)
    sender.publish(CHANNEL, encode_message("proxy-b", "bucket", ["first"]))
    reactor.run_until(lambda: ("lost",) in listener.events)
    reactor.run_until(lambda: listener.events[-1] == ("ready",))
    sender.publish(CHANNEL, encode_message("proxy-b", "bucket", ["second"]))
    reactor.run_until(lambda: ("invalidate", "bucket", ["second"]) in listener.events)


def test_lease_after_registry_gap(server: fakeredis.FakeServer) -> None:
    """After a lapsed registration, only a PING sent after the new one renews the lease."""
    reactor = ClockReactor()
    bus = make_bus(server, "proxy-a", reactor)
    # The subscriber thread hands these over; calling them directly pins their order.
    bus._registration_refreshed(0.0)
    bus._heard(0.1)
    assert bus.serving_allowed()

    reactor.clock.advance(1.0)
    assert not bus.serving_allowed()
    bus._registration_refreshed(1.0)
    # A PONG for a PING sent before the new registration: writers may have skipped this proxy.
    bus._heard(0.95)
    assert not bus.serving_allowed()
    bus._heard(1.05)
    assert bus.serving_allowed()
