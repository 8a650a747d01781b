"""Tests for the flusher service, driven by task.Clock on fakeredis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import redis
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from collector.buffer import Batch, DeltaBuffer
from collector.definitions import MetricDefinition
from collector.flusher import Flusher, make_writer_id
from collector.metrics import Metrics
from collector.store import ApplyResult, RedisStore, Snapshot, encode_field
from tests.support.collector import run_now

WRITER = "host:1:aa"
REQUESTS = "s3proxy_requests_total"
GET_200 = encode_field(["get_object", "200"])


class FlakyStore:
    """Wraps a store; fails the next ``fail_before`` applies before and ``fail_after``
    applies after the real call (a lost reply). Records every batch it is given."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner
        self.fail_before = 0
        self.fail_after = 0
        self.fail_register = 0
        self.batches: list[Batch] = []

    def register(self, definitions: Sequence[MetricDefinition]) -> None:
        if self.fail_register:
            self.fail_register -= 1
            raise redis.ConnectionError("connection refused")
        self.inner.register(definitions)

    def apply(self, batch: Batch, now: float) -> ApplyResult:
        self.batches.append(batch)
        if self.fail_before:
            self.fail_before -= 1
            raise redis.ConnectionError("connection refused")
        result = self.inner.apply(batch, now)
        if self.fail_after:
            self.fail_after -= 1
            raise redis.TimeoutError("reply lost")
        return result

    def read(self, names: Sequence[str]) -> Snapshot:
        return self.inner.read(names)

    def prune(self, stale: Any, cutoff: float, sequence_cutoff: float) -> int:
        return self.inner.prune(stale, cutoff, sequence_cutoff)


@pytest.fixture
def store(redis_store: RedisStore) -> FlakyStore:
    return FlakyStore(redis_store)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(DeltaBuffer())


@pytest.fixture
def flusher(store: FlakyStore, metrics: Metrics, clock: Clock) -> Flusher:
    return Flusher(store, metrics, WRITER, clock, run_now, interval=1.0)


def _requests(store: FlakyStore) -> float:
    fields = store.read([REQUESTS]).families.get(REQUESTS, {})
    return float(fields.get(GET_200, "0"))


def _record(metrics: Metrics, times: int) -> None:
    for _ in range(times):
        metrics.requests_total.labels("get_object", "200").inc()


def test_nothing_before_interval(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                 clock: Clock) -> None:
    """Recording does not touch the store before the first interval has passed."""
    flusher.startService()
    _record(metrics, 3)
    clock.advance(0.5)
    assert store.batches == []


def test_one_batch_per_interval(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                clock: Clock) -> None:
    """All calls in one interval merge into one batch sent in one store call."""
    flusher.startService()
    _record(metrics, 1000)
    clock.advance(1)

    assert len(store.batches) == 1
    assert store.batches[0].counters[(REQUESTS, ("get_object", "200"))] == 1000
    assert _requests(store) == 1000


def test_sequences_increase(flusher: Flusher, store: FlakyStore, clock: Clock) -> None:
    """Each new batch carries the next sequence number."""
    flusher.startService()
    clock.advance(1)
    clock.advance(1)
    assert [batch.sequence for batch in store.batches] == [1, 2]


def test_lost_reply_applied_once(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                 clock: Clock) -> None:
    """A batch applied whose reply was lost is resent unchanged and counted once."""
    flusher.startService()
    _record(metrics, 5)
    store.fail_after = 1
    clock.advance(1)
    assert flusher.pending is store.batches[0]

    clock.advance(1)

    assert store.batches[1] is store.batches[0]
    assert flusher.pending is None
    assert _requests(store) == 5


def test_failed_batch_resent_first(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                   clock: Clock) -> None:
    """While a batch is pending, new deltas wait in the buffer and follow it afterwards."""
    flusher.startService()
    _record(metrics, 2)
    store.fail_before = 3
    clock.advance(1)
    _record(metrics, 7)
    clock.pump([1, 1, 1])

    sequences = [batch.sequence for batch in store.batches]
    assert sequences == [1, 1, 1, 1]
    assert _requests(store) == 2

    clock.advance(1)
    assert store.batches[-1].sequence == 2
    assert _requests(store) == 9


def test_failures_counted(flusher: Flusher, store: FlakyStore, clock: Clock) -> None:
    """Each failed flush increments s3proxy_metrics_flush_failures_total."""
    flusher.startService()
    store.fail_before = 2
    clock.pump([1, 1, 1, 1])

    fields = store.read(["s3proxy_metrics_flush_failures_total"]).families
    assert float(fields["s3proxy_metrics_flush_failures_total"][encode_field([])]) == 2


def test_failure_logged_once_per_interval(store: FlakyStore, metrics: Metrics,
                                          clock: Clock) -> None:
    """Repeated failures log one error per error_log_interval, naming the error."""
    flusher = Flusher(store, metrics, WRITER, clock, run_now, error_log_interval=10)
    flusher.startService()
    store.fail_before = 25
    with capturedLogs() as events:
        clock.pump([1] * 25)

    errors = [event for event in events if "flush of batch" in event["log_format"]]
    assert len(errors) == 3
    assert "connection refused" in errors[0]["error"]


def test_recovery_logged(flusher: Flusher, store: FlakyStore, clock: Clock) -> None:
    """The first success after failures is logged with the number of failures."""
    flusher.startService()
    store.fail_before = 2
    with capturedLogs() as events:
        clock.pump([1, 1, 1])
    recovered = [event for event in events if "succeeded again" in event["log_format"]]
    assert recovered[0]["failures"] == 2


def test_unexpected_error_keeps_loop(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                     clock: Clock) -> None:
    """An unexpected exception from the store does not stop the flush loop."""
    flusher.startService()
    original = store.apply
    calls = []

    def broken(batch: Batch, now: float) -> ApplyResult:
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        return original(batch, now)

    store.apply = broken  # type: ignore[method-assign]
    _record(metrics, 1)
    clock.pump([1, 1])
    assert _requests(store) == 1


def test_heartbeat_every_flush(flusher: Flusher, store: FlakyStore, clock: Clock) -> None:
    """Every flush writes the heartbeat, even with nothing recorded."""
    flusher.startService()
    clock.advance(1)
    clock.advance(1)
    assert store.read([]).heartbeats == {WRITER: 1002.0}


def test_start_registers_definitions(flusher: Flusher, store: FlakyStore) -> None:
    """startService stores every definition of the metrics."""
    flusher.startService()
    assert REQUESTS in store.read([]).schemas


def test_start_schema_conflict(store: FlakyStore, metrics: Metrics, clock: Clock) -> None:
    """startService raises ValueError naming both definitions when a schema differs."""
    store.register([MetricDefinition(REQUESTS, "counter", "Old.", ("operation",))])
    flusher = Flusher(store, metrics, WRITER, clock, run_now)

    with pytest.raises(ValueError, match=r'\["operation"\].*\["operation","code"\]'):
        flusher.startService()
    assert not flusher.running
    assert clock.getDelayedCalls() == []


def test_start_without_store(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                             clock: Clock) -> None:
    """When the store is unreachable at start, definitions are stored before the first batch."""
    store.fail_register = 1
    flusher.startService()
    assert REQUESTS not in store.read([]).schemas

    _record(metrics, 1)
    clock.advance(1)
    assert REQUESTS in store.read([]).schemas
    assert _requests(store) == 1


def test_reregisters_after_data_loss(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                     clock: Clock) -> None:
    """After Redis lost its data, the next flush stores the definitions again."""
    flusher.startService()
    clock.advance(1)
    store.inner.client.flushall()

    _record(metrics, 1)
    clock.advance(1)
    assert REQUESTS in store.read([]).schemas
    assert _requests(store) == 1


def test_stop_flushes(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                      clock: Clock) -> None:
    """stopService sends what was recorded since the last tick and stops the loop."""
    flusher.startService()
    _record(metrics, 4)
    stopped = flusher.stopService()

    assert stopped.called
    assert _requests(store) == 4
    assert clock.getDelayedCalls() == []


def test_stop_sends_pending_first(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                                  clock: Clock) -> None:
    """stopService resends a pending batch before the last one."""
    flusher.startService()
    _record(metrics, 1)
    store.fail_before = 1
    clock.advance(1)
    _record(metrics, 2)
    flusher.stopService()
    assert _requests(store) == 3


def test_stop_removes_gauges(flusher: Flusher, store: FlakyStore, metrics: Metrics,
                             clock: Clock) -> None:
    """A clean stop removes this writer's gauge values and heartbeat."""
    flusher.startService()
    metrics.backend_state.labels("primary").set(1)
    clock.advance(1)
    flusher.stopService()

    snapshot = store.read(["s3proxy_backend_state"])
    assert "s3proxy_backend_state" not in snapshot.families
    assert snapshot.heartbeats == {}


def test_stop_failure_logged(flusher: Flusher, store: FlakyStore, metrics: Metrics) -> None:
    """A failed last flush logs how many series were lost and still fires the Deferred."""
    flusher.startService()
    _record(metrics, 1)
    store.fail_before = 1
    with capturedLogs() as events:
        stopped = flusher.stopService()
    assert stopped.called
    lost = [event for event in events if "were not written" in event["log_format"]]
    assert lost


def test_writer_id_unique() -> None:
    """Two writer ids in one process differ by their boot id."""
    first, second = make_writer_id(), make_writer_id()
    assert first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0]
    assert first != second


def test_invalid_interval(store: FlakyStore, metrics: Metrics, clock: Clock) -> None:
    """A flush interval that is not > 0 is rejected."""
    with pytest.raises(ValueError, match="interval"):
        Flusher(store, metrics, WRITER, clock, run_now, interval=0)
