"""Unit tests of the backend manager: state machine, routing, retry budget, service, /status."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from twisted.logger import LogEvent, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from collector.buffer import DeltaBuffer
from collector.metrics import Metrics
from proxy.backends import BackendManager, BackendState, RetryBudget, StatusResource
from tests.support.backends import FakeProbe, Harness, backend, make_manager

UP, PROBING, DOWN = BackendState.UP, BackendState.PROBING, BackendState.DOWN


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Log events emitted during the test."""
    captured: list[LogEvent] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def go_down(h: Harness, backend_id: str) -> None:
    h.fail(backend_id, times=h.manager.health.failures_to_down)


def go_probing(h: Harness, backend_id: str) -> None:
    go_down(h, backend_id)
    h.clock.advance(h.manager.health.cooldown)


# States and thresholds


def test_start_state_up() -> None:
    """Every backend starts UP and the gauge shows 1 before any check ran."""
    h = make_manager(start=False)
    assert h.manager.state("a") is UP
    assert h.metrics.backend_state.values == {"a": 1.0, "b": 1.0}


def test_down_after_threshold() -> None:
    """failures_to_down consecutive failures, and not one fewer, make a backend DOWN."""
    h = make_manager()
    h.fail("a", times=2)
    assert h.manager.state("a") is UP
    h.fail("a")
    assert h.manager.state("a") is DOWN
    assert h.metrics.backend_state.values["a"] == 0.0


def test_success_resets_failures() -> None:
    """A success between failures starts the count again."""
    h = make_manager()
    h.fail("a", times=2)
    h.succeed("a")
    h.fail("a", times=2)
    assert h.manager.state("a") is UP


def test_neutral_changes_nothing() -> None:
    """Neutral outcomes (4xx, client gone) neither count as failures nor reset them."""
    h = make_manager()
    h.fail("a", times=2)
    h.manager.report("a", "neutral", "HTTP 404")
    h.fail("a")
    assert h.manager.state("a") is DOWN


def test_probing_after_cooldown() -> None:
    """A DOWN backend becomes PROBING once the cooldown is over, not before."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_down(h, "a")
    h.clock.advance(9.9)
    assert h.manager.state("a") is DOWN
    h.clock.advance(0.1)
    assert h.manager.state("a") is PROBING
    assert h.metrics.backend_state.values["a"] == 0.5


def test_probing_checks_at_once() -> None:
    """Entering PROBING runs a health check at that moment."""
    h = make_manager()
    h.clock.advance(0)
    go_down(h, "a")
    calls = h.probe.calls.count("a")
    h.clock.advance(10.0)
    assert h.probe.calls.count("a") == calls + 1


def test_up_after_successes() -> None:
    """successes_to_up consecutive successes in PROBING make the backend UP."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    h.succeed("a")
    assert h.manager.state("a") is PROBING
    h.succeed("a")
    assert h.manager.state("a") is UP


def test_probing_failure_goes_down() -> None:
    """One failure in PROBING makes the backend DOWN and starts a new cooldown."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    h.succeed("a")
    h.fail("a")
    assert h.manager.state("a") is DOWN
    h.clock.advance(10.0)
    assert h.manager.state("a") is PROBING


def test_down_ignores_reports() -> None:
    """Late responses to requests sent before DOWN do not end the cooldown early."""
    h = make_manager()
    go_down(h, "a")
    h.succeed("a", times=5)
    assert h.manager.state("a") is DOWN


def test_gauge_steps() -> None:
    """The gauge of one backend goes 1, 0, 0.5, 1 through a full outage."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    h.succeed("a", times=2)
    assert h.metrics.backend_state.steps("a") == [1.0, 0.0, 0.5, 1.0]


def test_transition_logged(events: list[LogEvent]) -> None:
    """A transition is logged with the backend id, both states and the reason."""
    h = make_manager()
    go_down(h, "a")
    transitions = [e for e in events if e.get("new_state") == "DOWN"]
    assert len(transitions) == 1
    event = transitions[0]
    assert event["backend_id"] == "a"
    assert event["old_state"] == "UP"
    assert "connection refused" in event["reason"]


# Active checks


def test_check_failures_go_down() -> None:
    """Failing health checks alone take a backend DOWN after failures_to_down checks."""
    h = make_manager()
    h.probe.answers["a"] = "fail"
    h.clock.advance(0)
    h.clock.advance(5.0)
    assert h.manager.state("a") is UP
    h.clock.advance(5.0)
    assert h.manager.state("a") is DOWN


def test_check_error_recorded() -> None:
    """The reason of a failed check shows as the backend's last error."""
    h = make_manager()
    h.probe.answers["a"] = "fail"
    h.clock.advance(0)
    assert h.manager.status()[0]["last_error"] == "health check: HTTP 503"


def test_check_timeout_fails() -> None:
    """A check without a result within the timeout is cancelled and counts as failed."""
    h = make_manager(failures_to_down=1)
    h.probe.answers["a"] = "hang"
    h.clock.advance(0)
    h.clock.advance(1.9)
    assert h.manager.state("a") is UP
    h.clock.advance(0.1)
    assert h.manager.state("a") is DOWN
    assert h.probe.cancelled == 1


def test_raising_probe_fails() -> None:
    """A probe that raises counts as a failed check and the checks go on."""
    h = make_manager()
    h.probe.answers["a"] = "raise"
    h.clock.advance(0)
    h.clock.advance(5.0)
    assert h.probe.calls.count("a") == 2
    assert "RuntimeError" in str(h.manager.status()[0]["last_error"])


def test_down_not_checked() -> None:
    """No health check is sent to a DOWN backend before its cooldown is over."""
    h = make_manager(cooldown=60.0)
    h.clock.advance(0)
    go_down(h, "a")
    calls = h.probe.calls.count("a")
    h.clock.advance(30.0)
    assert h.probe.calls.count("a") == calls


def test_checks_never_overlap() -> None:
    """A backend with a check in flight gets no second one, even on entering PROBING."""
    h = make_manager(interval=1.0, timeout=30.0)
    h.probe.answers["a"] = "hang"
    h.clock.advance(0)
    h.clock.advance(5.0)
    assert h.probe.calls.count("a") == 1


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 4.0), (0.5, 5.0), (0.999, 5.999)])
def test_jitter_bounds(draw: float, expected: float) -> None:
    """With jitter 0.2 the next check is between 0.8 and 1.2 intervals away."""
    h = make_manager([backend("a")], random=lambda: draw, jitter=0.2)
    h.clock.advance(0)
    (call,) = h.clock.getDelayedCalls()
    assert call.getTime() == pytest.approx(expected, abs=1e-3)


# Routing


def test_failover_priority_order() -> None:
    """Under failover the plan lists the UP backends by priority."""
    h = make_manager([backend("c", 2), backend("a", 0), backend("b", 1)])
    assert h.plan() == ["a", "b", "c"]


def test_failover_skips_down() -> None:
    """Under failover a DOWN backend gets no request and is not a retry target."""
    h = make_manager()
    go_down(h, "a")
    assert h.plan() == ["b"]


def test_failover_equal_priority() -> None:
    """Equal priorities keep the configuration order under failover."""
    h = make_manager([backend("x"), backend("y")])
    assert {h.first() for _ in range(4)} == {"x"}


def test_round_robin_spread() -> None:
    """Round robin alternates over the UP backends of the best priority."""
    h = make_manager([backend("a"), backend("b"), backend("c", 1)], routing="round_robin")
    firsts = [h.first() for _ in range(6)]
    assert firsts.count("a") == 3
    assert firsts.count("b") == 3


def test_round_robin_fallbacks() -> None:
    """Round robin lists the other group members, then the worse priorities, as retries."""
    h = make_manager([backend("a"), backend("b"), backend("c", 1)], routing="round_robin")
    h.first()
    assert h.plan() == ["b", "a", "c"]


def test_round_robin_next_group() -> None:
    """With the best priority group DOWN, round robin uses the next one."""
    h = make_manager([backend("a"), backend("b", 1), backend("c", 1)], routing="round_robin")
    go_down(h, "a")
    firsts = {h.first() for _ in range(4)}
    assert firsts == {"b", "c"}


def test_all_down_empty_plan() -> None:
    """With every backend DOWN the plan is empty."""
    h = make_manager()
    go_down(h, "a")
    go_down(h, "b")
    assert h.plan() == []


# PROBING admission


def test_probe_admission_limit() -> None:
    """A preferred PROBING backend gets at most probe_requests live requests."""
    h = make_manager(probe_requests=2)
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    firsts = [h.first() for _ in range(4)]
    assert firsts == ["a", "a", "b", "b"]


def test_probe_request_has_fallback() -> None:
    """A probe-admitted request lists the UP backend behind the PROBING one."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    assert h.plan() == ["a", "b"]


def test_worse_probing_not_admitted() -> None:
    """Under failover a PROBING backend behind the preferred UP one gets no live traffic."""
    h = make_manager()
    h.probe.answers["b"] = "hang"
    go_probing(h, "b")
    assert h.plan() == ["a"]


def test_admission_resets() -> None:
    """A new PROBING period admits probe_requests requests again."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    h.first()
    h.fail("a")
    h.clock.advance(10.0)
    assert h.first() == "a"


def test_probing_only_backend() -> None:
    """With no UP backend, PROBING backends take only their admitted requests."""
    h = make_manager()
    h.probe.answers.update(a="hang", b="hang")
    go_probing(h, "a")
    go_down(h, "b")
    assert h.first() == "a"
    assert h.first() is None


def test_traffic_returns_after_up() -> None:
    """Once the preferred backend is UP again, failover sends everything back to it."""
    h = make_manager()
    h.probe.answers["a"] = "hang"
    go_probing(h, "a")
    h.succeed("a", times=2)
    assert {h.first() for _ in range(3)} == {"a"}


# Affinity


def test_pinned_up() -> None:
    """A request pinned to an UP backend goes there only, even when it is not preferred."""
    h = make_manager()
    assert h.plan("b") == ["b"]


def test_pinned_down() -> None:
    """A request pinned to a DOWN backend gets an empty plan."""
    h = make_manager()
    go_down(h, "b")
    assert h.plan("b") == []


def test_pinned_probing() -> None:
    """A request pinned to a PROBING backend uses a probe admission when one is left."""
    h = make_manager()
    h.probe.answers["b"] = "hang"
    go_probing(h, "b")
    assert h.plan("b") == ["b"]
    assert h.plan("b") == []


def test_pinned_unknown() -> None:
    """A request pinned to an unknown backend raises KeyError naming it."""
    h = make_manager()
    with pytest.raises(KeyError, match="'zz'"):
        h.plan("zz")


# Retry budget


def test_budget_exhaustion() -> None:
    """Once failures have spent the budget, the plan contains one backend only."""
    h = make_manager(retry_budget=0.1)
    assert len(h.plan()) == 2
    for _ in range(10):
        h.plan()
        h.fail("a", reason="HTTP 500")
        h.succeed("a")
    assert len(h.plan()) == 1


def test_budget_refills() -> None:
    """Requests refill the budget at retry_budget tokens each, from the floor of -capacity."""
    budget = RetryBudget(0.5, capacity=2.0)
    for _ in range(4):
        budget.spend()
    for _ in range(5):
        budget.deposit()
    assert not budget.allows_retry()
    budget.deposit()
    assert budget.allows_retry()


def test_budget_negative_floor() -> None:
    """The bucket does not go below minus its capacity."""
    budget = RetryBudget(0.2, capacity=10.0)
    for _ in range(100):
        budget.spend()
    assert budget.tokens == -10.0


def test_budget_zero_ratio() -> None:
    """A ratio of 0 allows no retry at all, not even at start."""
    assert not RetryBudget(0.0).allows_retry()


def test_budget_negative_ratio() -> None:
    """A negative ratio is rejected with the value in the message."""
    with pytest.raises(ValueError, match="-0.5"):
        RetryBudget(-0.5)


# Service


def test_stop_clears_delayed_calls() -> None:
    """stopService cancels checks and cooldowns, and fires once the running check ends."""
    h = make_manager()
    h.probe.answers["b"] = "hang"
    h.clock.advance(0)
    go_down(h, "a")
    stopped = h.manager.stopService()
    assert not stopped.called
    h.clock.advance(2.0)
    assert stopped.called
    assert h.clock.getDelayedCalls() == []


def test_results_after_stop_ignored() -> None:
    """A check that ends after stopService changes no state."""
    h = make_manager(failures_to_down=1, timeout=30.0)
    h.probe.answers["a"] = "hang"
    h.clock.advance(0)
    h.manager.stopService()
    h.probe.hanging[0].errback(RuntimeError("late"))
    assert h.manager.state("a") is UP


def test_down_before_start() -> None:
    """A backend that went DOWN before startService gets its cooldown at start."""
    h = make_manager(start=False)
    go_down(h, "a")
    h.manager.startService()
    h.clock.advance(10.0)
    assert h.manager.state("a") is PROBING


@pytest.mark.parametrize(
    ("backends", "routing", "message"),
    [
        ([], "failover", "no backends"),
        ([backend("a"), backend("a")], "failover", "used twice"),
        ([backend("a~b")], "failover", "'a~b'"),
        ([backend("a")], "random", "'random'"),
    ],
)
def test_invalid_arguments(backends: list, routing: str, message: str) -> None:
    """Invalid backends or routing modes are rejected with the offending value."""
    with pytest.raises(ValueError, match=message):
        make_manager(backends, routing=routing)


# In-flight and /status


def test_in_flight_counts() -> None:
    """attempt_started and report bracket the in-flight count."""
    h = make_manager()
    h.manager.attempt_started("a")
    h.manager.attempt_started("a")
    h.succeed("a")
    assert h.manager.status()[0]["in_flight"] == 1


def test_status_resource() -> None:
    """/status lists every backend with its state, since, last error and priority."""
    h = make_manager()
    h.clock.advance(100.0)
    go_down(h, "b")
    request = DummyRequest([b""])
    body = json.loads(StatusResource(h.manager).render_GET(request))
    assert body["routing"] == "failover"
    assert body["backends"][1] == {
        "id": "b", "state": "DOWN", "since": 100.0, "last_error": "connection refused",
        "in_flight": 0, "priority": 1,
    }


def test_status_no_secrets() -> None:
    """/status never contains a backend's secret key."""
    h = make_manager()
    body = StatusResource(h.manager).render_GET(DummyRequest([b""]))
    assert b"test-secret" not in body


def test_fake_probe_default() -> None:
    """The fake probe reports healthy by default (the other tests rely on it)."""
    probe = FakeProbe()
    assert probe(backend("a")).called


def test_real_metrics_gauge() -> None:
    """With collector's Metrics the gauge series of each backend contains its state value."""
    buffer = DeltaBuffer()
    h = make_manager()
    manager = BackendManager(
        [backend("a"), backend("b")], h.manager.health, "failover", Metrics(buffer), h.clock,
        h.probe,
    )
    manager.startService()
    for _ in range(3):
        manager.report("b", "failure", "HTTP 500")
    assert buffer.gauges[("s3proxy_backend_state", ("a",))] == 1.0
    assert buffer.gauges[("s3proxy_backend_state", ("b",))] == 0.0
