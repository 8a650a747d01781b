"""The backend manager: health state per backend, routing of requests, and the retry budget.

Every backend is in one of three states:

- ``UP``: receives traffic. ``failures_to_down`` consecutive failures make it ``DOWN``.
- ``DOWN``: receives nothing, and is not checked. After ``cooldown`` seconds it becomes
  ``PROBING``.
- ``PROBING``: the health check runs at once and then every interval, and at most
  ``probe_requests`` live requests are admitted during the period. ``successes_to_up``
  consecutive successes make it ``UP``; one failure makes it ``DOWN`` again.

Active checks (see :mod:`proxy.health`) and the outcomes of live requests (``report``) feed the
same counters. A backend starts ``UP``: a restarted proxy serves from its first second, while
its first health check runs at once. A backend that is dead at start goes ``DOWN`` after the
same number of failures as at any other time, and the gateway retries the failed live requests
on the next backend meanwhile.

Every transition is logged with the backend id, the old and new state and the reason, and sets
the ``backend_state`` gauge to 1 (``UP``), 0.5 (``PROBING``) or 0 (``DOWN``).
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from proxy.affinity import BACKEND_ID_PATTERN
from proxy.health import Clock, DelayedCall, HealthChecker, Probe
from proxy.operations import RequestInfo

__all__ = [
    "BackendManager",
    "BackendState",
    "Outcome",
    "RetryBudget",
    "StatusResource",
]

Outcome = Literal["success", "failure", "neutral"]
Routing = Literal["failover", "round_robin"]


class BackendState(enum.Enum):
    """Health state of one backend; the value is what the ``backend_state`` gauge shows."""

    UP = 1.0
    PROBING = 0.5
    DOWN = 0.0


class HealthSettings(Protocol):
    """The ``[health]`` settings that the manager reads; times are in seconds."""

    @property
    def interval(self) -> float: ...

    @property
    def timeout(self) -> float: ...

    @property
    def failures_to_down(self) -> int: ...

    @property
    def successes_to_up(self) -> int: ...

    @property
    def cooldown(self) -> float: ...

    @property
    def probe_requests(self) -> int: ...

    @property
    def jitter(self) -> float: ...

    @property
    def retry_budget(self) -> float: ...


class RetryBudget:
    """Token bucket that limits retries to a fraction of the requests.

    Every request deposits ``ratio`` tokens, and every failed attempt spends one, whether the
    gateway retries it or not, so retries never exceed the spent tokens. A retry is allowed
    while at least one token is left. The bucket contains at most ``capacity`` tokens, which is
    the burst of retries an idle proxy allows, and may fall to ``-capacity`` when many
    requests fail at once, so a dying cluster pays back the retries it got before new ones are
    allowed. With ``ratio`` 0 no retry is ever allowed.

    :param ratio: retries allowed per request, for example 0.2 adds at most 20 % load.
    :param capacity: maximum number of tokens; the bucket starts full.
    """

    def __init__(self, ratio: float, capacity: float = 10.0) -> None:
        if ratio < 0:
            raise ValueError(f"retry budget ratio {ratio!r} is invalid; must be >= 0")
        self.ratio = ratio
        self.capacity = capacity if ratio > 0 else 0.0
        self.tokens = self.capacity

    def deposit(self) -> None:
        """Record one request."""
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def spend(self) -> None:
        """Record one failed attempt."""
        self.tokens = max(-self.capacity, self.tokens - 1.0)

    def allows_retry(self) -> bool:
        """Return whether a request may get more than one attempt now."""
        return self.tokens >= 1.0


@dataclass
class _Backend:
    """Mutable state of one backend."""

    config: Any
    index: int
    state: BackendState
    since: float
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    in_flight: int = 0
    probes_admitted: int = 0
    cooldown_call: DelayedCall | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return str(self.config.id)

    @property
    def order(self) -> tuple[int, int]:
        return (int(self.config.priority), self.index)


class BackendManager(Service):
    """Health state of every backend, and the pool that plans where each request goes.

    :param backends: the ``[[backends]]`` entries; ``id`` must be unique and match
        ``[A-Za-z0-9._-]+``, and a lower ``priority`` is preferred.
    :param health: the ``[health]`` settings.
    :param routing: ``failover`` sends every request to the preferred ``UP`` backend,
        ``round_robin`` spreads them over the ``UP`` backends of the best priority.
    :param metrics: the ``Metrics`` whose ``backend_state`` gauge shows the states.
    :param clock: the reactor that schedules cooldowns and health checks.
    :param probe: sends one health check to a backend; see :class:`proxy.health.HealthChecker`.
    :param random: returns a float in [0, 1); drives the jitter of the health checks.
    :raises ValueError: no backends, a duplicate or invalid id, or an unknown routing mode.
    """

    _log = Logger()

    def __init__(
        self,
        backends: Sequence[Any],
        health: HealthSettings,
        routing: Routing,
        metrics: Any,
        clock: Clock,
        probe: Probe,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._check_arguments(backends, routing)
        self.health = health
        self.routing = routing
        self._metrics = metrics
        self._clock = clock
        self._rotation = 0
        self.budget = RetryBudget(health.retry_budget)

        now = clock.seconds()
        self._backends = {
            config.id: _Backend(config, index, BackendState.UP, now)
            for index, config in enumerate(backends)
        }
        for backend in self._backends.values():
            self._set_gauge(backend)

        self._checker = HealthChecker(
            backend_configs=[backend.config for backend in self._backends.values()],
            probe=probe,
            clock=clock,
            interval=health.interval,
            timeout=health.timeout,
            jitter=health.jitter,
            random=random,
            should_check=lambda backend_id: self.state(backend_id) is not BackendState.DOWN,
            on_result=self._check_finished,
        )

    @staticmethod
    def _check_arguments(backends: Sequence[Any], routing: str) -> None:
        if not backends:
            raise ValueError("no backends configured; add at least one [[backends]] entry")
        if routing not in ("failover", "round_robin"):
            raise ValueError(
                f"routing mode {routing!r} is invalid; use 'failover' or 'round_robin'"
            )
        seen: set[str] = set()
        for config in backends:
            if not BACKEND_ID_PATTERN.fullmatch(config.id):
                raise ValueError(
                    f"backend id {config.id!r} is invalid; use only letters, digits, "
                    f"'.', '_' and '-'"
                )
            if config.id in seen:
                raise ValueError(f"backend id {config.id!r} is used twice; ids must be unique")
            seen.add(config.id)

    # Service

    def startService(self) -> None:
        """
        Start the health checks; the first check of every backend runs at once.

        Also sets ``backend_info`` to 1 for every configured backend, with its priority.
        """
        super().startService()
        for backend in self._backends.values():
            priority = str(backend.config.priority)
            self._metrics.backend_info.labels(backend.config.id, priority).set(1)
        for backend in self._backends.values():
            if backend.state is BackendState.DOWN and backend.cooldown_call is None:
                self._schedule_cooldown(backend)
        self._checker.start()

    def stopService(self) -> Deferred[None]:
        """Cancel every scheduled call; the Deferred fires once in-flight checks are done."""
        super().stopService()
        for backend in self._backends.values():
            if backend.cooldown_call is not None and backend.cooldown_call.active():
                backend.cooldown_call.cancel()
            backend.cooldown_call = None
        return self._checker.stop()

    # Queries

    @property
    def backend_ids(self) -> list[str]:
        """The configured backend ids, in configuration order."""
        return list(self._backends)

    def state(self, backend_id: str) -> BackendState:
        """Return the current state of ``backend_id``."""
        return self._get(backend_id).state

    def status(self) -> list[dict[str, object]]:
        """Describe every backend for the ``/status`` page, in configuration order.

        ``since`` is the time of the last transition (or of the start) in seconds of the clock,
        which is unix time for the real reactor.
        """
        return [
            {
                "id": backend.id,
                "state": backend.state.name,
                "since": backend.since,
                "last_error": backend.last_error,
                "in_flight": backend.in_flight,
                "priority": backend.config.priority,
            }
            for backend in self._backends.values()
        ]

    # Routing

    def plan(self, info: RequestInfo) -> list[Any]:
        """Return the backends to try for one request, in order.

        The first entry gets the request, and the gateway may retry on the next ones. When the
        retry budget is exhausted only one backend is returned. An empty list means no backend
        can take the request now, and the gateway responds with 503 and ``Retry-After``.

        A ``PROBING`` backend that would be preferred over every ``UP`` one gets the request
        first while it has probe admissions left; this is how live traffic returns to it.

        :param info: the request. When ``info.backend_id`` is set (an affinity token names a
            backend, see :mod:`proxy.affinity`), the request goes only to that backend, and
            only when it is ``UP`` or has a probe admission left.
        :raises KeyError: ``info.backend_id`` is not configured.
        """
        self.budget.deposit()
        if info.backend_id is not None:
            return self._plan_pinned(self._get(info.backend_id))

        up = sorted(
            (b for b in self._backends.values() if b.state is BackendState.UP),
            key=lambda b: b.order,
        )
        if self.routing == "round_robin":
            up = self._rotate_best_group(up)
        ordered = up
        probe = self._admit_probe(up[0] if up else None)
        if probe is not None:
            ordered = [probe, *up]

        if not self.budget.allows_retry():
            ordered = ordered[:1]
        return [backend.config for backend in ordered]

    def _plan_pinned(self, backend: _Backend) -> list[Any]:
        if backend.state is BackendState.UP:
            return [backend.config]
        if backend.state is BackendState.PROBING and self._take_probe_admission(backend):
            return [backend.config]
        return []

    def _rotate_best_group(self, up: list[_Backend]) -> list[_Backend]:
        """Rotate the UP backends of the best priority; the worse ones stay behind as fallbacks."""
        if not up:
            return up
        best = up[0].config.priority
        group = [b for b in up if b.config.priority == best]
        rest = up[len(group):]
        start = self._rotation % len(group)
        self._rotation += 1
        return group[start:] + group[:start] + rest

    def _admit_probe(self, first_up: _Backend | None) -> _Backend | None:
        """Pick a PROBING backend for this request, or None.

        Under failover a PROBING backend must sort before the preferred UP one; under round
        robin it must have the same or a better priority. Without any UP backend every PROBING
        backend qualifies.
        """
        probing = sorted(
            (b for b in self._backends.values() if b.state is BackendState.PROBING),
            key=lambda b: b.order,
        )
        for backend in probing:
            if first_up is not None:
                if self.routing == "failover" and backend.order > first_up.order:
                    continue
                if backend.config.priority > first_up.config.priority:
                    continue
            if self._take_probe_admission(backend):
                return backend
        return None

    def _take_probe_admission(self, backend: _Backend) -> bool:
        if backend.probes_admitted >= self.health.probe_requests:
            return False
        backend.probes_admitted += 1
        return True

    # Outcomes

    def attempt_started(self, backend_id: str) -> None:
        """Count one attempt in flight to ``backend_id``; ``report`` ends it."""
        self._get(backend_id).in_flight += 1

    def report(self, backend_id: str, outcome: Outcome, reason: str = "") -> None:
        """Record the outcome of one live attempt.

        :param outcome: ``failure`` for connection errors, timeouts and 5xx responses,
            ``success`` for every other response, ``neutral`` for 4xx responses
            and clients that went away, which say nothing about the backend's health.
        :param reason: a short description for the log and ``/status``, for example
            ``"connection refused"`` or ``"HTTP 503"``.
        :raises KeyError: ``backend_id`` is not configured.
        """
        backend = self._get(backend_id)
        backend.in_flight = max(0, backend.in_flight - 1)
        if outcome == "failure":
            self.budget.spend()
        self._record(backend, outcome, reason)

    def _check_finished(self, backend_id: str, healthy: bool, reason: str) -> None:
        self._record(self._get(backend_id), "success" if healthy else "failure",
                     reason if healthy else f"health check: {reason}")

    def _record(self, backend: _Backend, outcome: Outcome, reason: str) -> None:
        if outcome == "neutral" or backend.state is BackendState.DOWN:
            # Only the cooldown ends DOWN, so late responses to old requests do not count.
            return

        if outcome == "failure":
            backend.last_error = reason
            backend.consecutive_successes = 0
            backend.consecutive_failures += 1
            if backend.state is BackendState.PROBING:
                self._transition(backend, BackendState.DOWN, f"failure while probing: {reason}")
            elif backend.consecutive_failures >= self.health.failures_to_down:
                self._transition(
                    backend, BackendState.DOWN,
                    f"{backend.consecutive_failures} consecutive failures, last: {reason}",
                )
            return

        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        if (backend.state is BackendState.PROBING
                and backend.consecutive_successes >= self.health.successes_to_up):
            self._transition(
                backend, BackendState.UP,
                f"{backend.consecutive_successes} consecutive successes",
            )

    # Transitions

    def _transition(self, backend: _Backend, new: BackendState, reason: str) -> None:
        old = backend.state
        backend.state = new
        backend.since = self._clock.seconds()
        backend.consecutive_failures = 0
        backend.consecutive_successes = 0
        backend.probes_admitted = 0
        self._set_gauge(backend)

        log = self._log.warn if new is BackendState.DOWN else self._log.info
        log(
            "backend {backend_id} {old_state} -> {new_state}: {reason}",
            backend_id=backend.id, old_state=old.name, new_state=new.name, reason=reason,
        )

        if new is BackendState.DOWN and self.running:
            self._schedule_cooldown(backend)
        elif new is BackendState.PROBING:
            self._checker.check_now(backend.id)

    def _schedule_cooldown(self, backend: _Backend) -> None:
        backend.cooldown_call = self._clock.callLater(
            self.health.cooldown, self._cooldown_over, backend
        )

    def _cooldown_over(self, backend: _Backend) -> None:
        backend.cooldown_call = None
        if backend.state is BackendState.DOWN:
            self._transition(
                backend, BackendState.PROBING, f"cooldown of {self.health.cooldown} s over"
            )

    def _set_gauge(self, backend: _Backend) -> None:
        self._metrics.backend_state.labels(backend.id).set(backend.state.value)

    def _get(self, backend_id: str) -> _Backend:
        try:
            return self._backends[backend_id]
        except KeyError:
            raise KeyError(
                f"backend {backend_id!r} is not configured; known: {sorted(self._backends)}"
            ) from None


class StatusResource(Resource):
    """Read-only JSON view of the backends, served at ``/status``.

    The body is ``{"routing": ..., "retry_tokens": ..., "backends": [...]}`` where each backend
    has ``id``, ``state``, ``since`` (unix time), ``last_error``, ``in_flight`` and
    ``priority``. Credentials are never included.
    """

    isLeaf = True

    def __init__(self, manager: BackendManager) -> None:
        super().__init__()
        self._manager = manager

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        body = {
            "routing": self._manager.routing,
            "retry_tokens": self._manager.budget.tokens,
            "backends": self._manager.status(),
        }
        return json.dumps(body, indent=2).encode("utf-8") + b"\n"
