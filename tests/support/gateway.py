"""Fakes for driving proxy.gateway in memory: metrics, the forwarder and the backend pool."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from proxy.config import BackendConfig
from proxy.forward import OutgoingRequest
from proxy.operations import RequestInfo

ACCESS_KEY = "client"
SECRET_KEY = "client-secret"
NOW = 1_700_000_000.0
HOST = "127.0.0.1:9000"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class FakeChild:
    def __init__(self, family: FakeFamily, labels: tuple[str, ...]) -> None:
        self.family = family
        self.labels = labels

    def inc(self, amount: float = 1) -> None:
        self.family.values[self.labels] += amount

    def observe(self, value: float) -> None:
        self.family.values[self.labels] += 1
        self.family.observed.append((self.labels, value))


class FakeFamily:
    def __init__(self) -> None:
        self.values: Counter[tuple[str, ...]] = Counter()
        self.observed: list[tuple[tuple[str, ...], float]] = []

    def labels(self, *values: str) -> FakeChild:
        return FakeChild(self, tuple(values))


class FakeMetrics:
    """Records what the gateway counts, by label values."""

    def __init__(self) -> None:
        self.requests_total = FakeFamily()
        self.request_latency_seconds = FakeFamily()
        self.backend_requests_total = FakeFamily()


@dataclass
class FakeForwarder:
    """Hands out one Deferred per attempt and keeps what was sent."""

    sent: list[tuple[BackendConfig, OutgoingRequest, Deferred[Any]]] = field(default_factory=list)

    def send(self, backend: BackendConfig, request: OutgoingRequest) -> Deferred[Any]:
        attempt: Deferred[Any] = Deferred()
        self.sent.append((backend, request, attempt))
        return attempt

    @property
    def attempts(self) -> list[Deferred[Any]]:
        """The Deferred of each attempt, in order; the test fires them."""
        return [attempt for _, _, attempt in self.sent]

    @property
    def requests(self) -> list[OutgoingRequest]:
        """The request of each attempt, in order."""
        return [request for _, request, _ in self.sent]


class RecordingPool:
    """Plans every configured backend in order and records the reports."""

    def __init__(self, backends: tuple[BackendConfig, ...]) -> None:
        self.backends = list(backends)
        self.reports: list[tuple[str, str]] = []

    def plan(self, info: RequestInfo) -> list[BackendConfig]:
        return list(self.backends)

    def report(self, backend_id: str, outcome: str, reason: str) -> None:
        self.reports.append((backend_id, outcome))

    def attempt_started(self, backend_id: str) -> None:
        pass
