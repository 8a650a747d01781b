"""Tests for the graceful stop: sequential service stop and the drain of requests."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxy.config import parse_config
from proxy.gateway import Gateway, StaticBackendPool
from proxy.shutdown import DrainService, SequentialMultiService


class _RecordingService(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self.stopped


class _Target:
    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.waiters: list[Deferred[None]] = []

    def drain(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def finish_all(self) -> None:
        self.in_flight = 0
        for waiter in self.waiters:
            waiter.callback(None)


def test_sequential_reverse_order() -> None:
    """Children stop last added first, each after the previous one finished."""
    log: list[str] = []
    root = SequentialMultiService()
    first = _RecordingService("flusher", log)
    second = _RecordingService("listener", log)
    first.setServiceParent(root)
    second.setServiceParent(root)
    root.startService()

    done = root.stopService()
    assert log == ["stop listener"]
    second.stopped.callback(None)
    assert log == ["stop listener", "stop flusher"]
    assert not done.called
    first.stopped.callback(None)
    assert done.called


def test_sequential_continues_after_failure() -> None:
    """A child whose stop fails does not keep the others running."""
    log: list[str] = []
    root = SequentialMultiService()
    first = _RecordingService("flusher", log)
    second = _RecordingService("listener", log)
    first.setServiceParent(root)
    second.setServiceParent(root)
    root.startService()

    done = root.stopService()
    second.stopped.errback(RuntimeError("boom"))
    first.stopped.callback(None)
    assert log == ["stop listener", "stop flusher"]
    assert done.called


def test_drain_waits_for_requests() -> None:
    """The drain fires once the requests in flight have finished."""
    clock = Clock()
    target = _Target(2)
    service = DrainService(target, 30.0, clock)
    service.startService()

    done = service.stopService()
    assert not done.called
    target.finish_all()
    assert done.called
    assert clock.getDelayedCalls() == []


def test_drain_timeout() -> None:
    """The drain fires after the timeout even with requests still in flight."""
    clock = Clock()
    target = _Target(1)
    service = DrainService(target, 5.0, clock)
    service.startService()

    done = service.stopService()
    clock.advance(4.9)
    assert not done.called
    clock.advance(0.2)
    assert done.called


def test_drain_nothing_in_flight() -> None:
    """With no request in flight the drain fires at once."""
    service = DrainService(_Target(0), 30.0, Clock())
    service.startService()
    assert service.stopService().called


def _gateway() -> Gateway:
    config = parse_config(
        {
            "users": [{"access_key": "a", "secret_key": "s"}],
            "backends": [
                {"id": "b", "endpoint": "http://127.0.0.1:1", "access_key": "k",
                 "secret_key": "s"}
            ],
        }
    )
    return Gateway(config, None, None, StaticBackendPool(config.backends), Clock())  # type: ignore[arg-type]


def test_gateway_drain_waits() -> None:
    """Gateway.drain fires when the last request in flight finishes."""
    gateway = _gateway()
    gateway.request_started()
    gateway.request_started()
    drained = gateway.drain()
    gateway.request_finished()
    assert not drained.called
    gateway.request_finished()
    assert drained.called


def test_gateway_drain_idle() -> None:
    """Gateway.drain fires at once without requests and marks the gateway draining."""
    gateway = _gateway()
    drained = gateway.drain()
    assert drained.called
    assert gateway.draining
