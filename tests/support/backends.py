"""Fakes for unit tests of the backend manager and the health checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from proxy.backends import BackendManager
from proxy.config import BackendConfig, HealthConfig
from proxy.health import HealthCheckError
from proxy.operations import RequestInfo


class FakeGaugeChild:
    def __init__(self, gauge: FakeGauge, label: str) -> None:
        self._gauge = gauge
        self._label = label

    def set(self, value: float) -> None:
        self._gauge.values[self._label] = value
        self._gauge.history.append((self._label, value))


class FakeGauge:
    """Records every ``set`` of every label value."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.history: list[tuple[str, float]] = []

    def labels(self, backend_id: str) -> FakeGaugeChild:
        return FakeGaugeChild(self, backend_id)

    def steps(self, backend_id: str) -> list[float]:
        """Return the values set for ``backend_id``, in order."""
        return [value for label, value in self.history if label == backend_id]


class FakeInfoGauge:
    """Records the label values of every ``set`` of ``backend_info``."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], float] = {}

    def labels(self, *values: str) -> FakeInfoChild:
        return FakeInfoChild(self, values)


class FakeInfoChild:
    def __init__(self, gauge: FakeInfoGauge, values: tuple[str, ...]) -> None:
        self._gauge = gauge
        self._values = values

    def set(self, value: float) -> None:
        self._gauge.values[self._values] = value


class FakeMetrics:
    """The ``backend_state`` and ``backend_info`` gauges of ``collector.Metrics``, in memory."""

    def __init__(self) -> None:
        self.backend_state = FakeGauge()
        self.backend_info = FakeInfoGauge()


class FakeProbe:
    """A health check whose result each test sets per backend.

    ``answers[backend_id]`` is ``"ok"`` (healthy), ``"fail"`` (HTTP 503), ``"raise"`` (the
    probe raises) or ``"hang"`` (a Deferred that never fires unless cancelled).
    """

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.calls: list[str] = []
        self.hanging: list[Deferred[None]] = []
        self.cancelled = 0

    def __call__(self, backend: BackendConfig) -> Deferred[None]:
        self.calls.append(backend.id)
        answer = self.answers.get(backend.id, "ok")
        if answer == "ok":
            return succeed(None)
        if answer == "fail":
            return fail(HealthCheckError("HTTP 503"))
        if answer == "raise":
            raise RuntimeError("probe broke")

        def cancel(d: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancel)
        self.hanging.append(d)
        return d


def request(backend_id: str | None = None) -> RequestInfo:
    """Return a GetObject request, pinned to ``backend_id`` when given."""
    return RequestInfo("req", "GET", "get_object", "bucket", "key", True, backend_id)


def backend(backend_id: str, priority: int = 0) -> BackendConfig:
    """Return a backend configuration with made-up credentials."""
    return BackendConfig(
        id=backend_id,
        endpoint=f"http://127.0.0.1:1/{backend_id}",
        access_key="test-access",
        secret_key="test-secret",
        priority=priority,
    )


HEALTH = HealthConfig(
    interval=5.0,
    timeout=2.0,
    failures_to_down=3,
    successes_to_up=2,
    cooldown=10.0,
    probe_requests=1,
    jitter=0.0,
    retry_budget=0.2,
)


@dataclasses.dataclass
class Harness:
    """A manager with its clock, probe and metrics."""

    manager: BackendManager
    clock: Clock
    probe: FakeProbe
    metrics: FakeMetrics

    def fail(self, backend_id: str, times: int = 1, reason: str = "connection refused") -> None:
        for _ in range(times):
            self.manager.report(backend_id, "failure", reason)

    def succeed(self, backend_id: str, times: int = 1) -> None:
        for _ in range(times):
            self.manager.report(backend_id, "success", "HTTP 200")

    def plan(self, backend_id: str | None = None) -> list[str]:
        """Return the ids of the backends planned for one request."""
        return [config.id for config in self.manager.plan(request(backend_id))]

    def first(self) -> str | None:
        """Return the id of the backend that would get the next request."""
        plan = self.manager.plan(request())
        return plan[0].id if plan else None


def make_manager(
    backends: list[BackendConfig] | None = None,
    routing: str = "failover",
    random: Callable[[], float] = lambda: 0.5,
    start: bool = True,
    **health: Any,
) -> Harness:
    """Build a manager on a fresh Clock; ``health`` overrides fields of ``HEALTH``."""
    clock = Clock()
    probe = FakeProbe()
    metrics = FakeMetrics()
    manager = BackendManager(
        backends if backends is not None else [backend("a"), backend("b", priority=1)],
        dataclasses.replace(HEALTH, **health),
        routing,  # type: ignore[arg-type]  # tests pass invalid modes on purpose
        metrics,
        clock,
        probe,
        random=random,
    )
    if start:
        manager.startService()
    return Harness(manager, clock, probe, metrics)
