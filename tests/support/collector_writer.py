"""A metrics writer process for collector integration tests.

Run as ``python -m tests.support.collector_writer URL NAMESPACE COUNT [STOP_FILE]``.
It records COUNT increments and COUNT observations through ``open_monitoring`` on the real
reactor, in small chunks so that many flushes happen meanwhile, and prints ``recorded``.
Then it waits until STOP_FILE exists (when given), stops the monitoring service, which
flushes a last time, and prints ``stopped <series not written>``.

:func:`expected_totals` computes what COUNT records add up to, for the assertions.
"""

from __future__ import annotations

import os
import sys
from bisect import bisect_left
from collections import Counter

OPERATIONS = ("get_object", "put_object", 'we"ird\\op\né')
# Observations are binary fractions, so that any sum of them is exact in floating point.
OBSERVATIONS = (0.001953125, 0.0625, 0.25, 0.5, 3.0, 12.0, 0.015625)
CHUNK = 500
PAUSE = 0.02  # seconds between chunks


def record(metrics: object, index: int) -> None:
    """Record the index-th increment and observation."""
    operation = OPERATIONS[index % len(OPERATIONS)]
    code = "503" if index % 5 == 0 else "200"
    metrics.requests_total.labels(operation, code).inc()  # type: ignore[attr-defined]
    latency = metrics.request_latency_seconds  # type: ignore[attr-defined]
    latency.labels(operation).observe(OBSERVATIONS[index % len(OBSERVATIONS)])


def expected_totals(count: int, writers: int) -> dict[str, Counter[tuple[str, ...]]]:
    """Return the totals that ``writers`` processes of ``count`` records each produce.

    Keys: ``requests`` by (operation, code); ``buckets`` by (operation, upper bound
    index) counting non-cumulatively; ``sum`` and ``count`` by (operation,).
    """
    from collector.definitions import DEFAULT_BUCKETS

    requests: Counter[tuple[str, ...]] = Counter()
    buckets: Counter[tuple[str, ...]] = Counter()
    sums: Counter[tuple[str, ...]] = Counter()
    counts: Counter[tuple[str, ...]] = Counter()
    for index in range(count):
        operation = OPERATIONS[index % len(OPERATIONS)]
        code = "503" if index % 5 == 0 else "200"
        value = OBSERVATIONS[index % len(OBSERVATIONS)]
        requests[(operation, code)] += writers
        buckets[(operation, str(bisect_left(DEFAULT_BUCKETS, value)))] += writers
        sums[(operation,)] += value * writers  # type: ignore[assignment]
        counts[(operation,)] += writers
    return {"requests": requests, "buckets": buckets, "sum": sums, "count": counts}


def main(argv: list[str]) -> int:
    from twisted.internet import reactor, task
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from collector import open_monitoring

    # Warnings and errors go to stderr, so a failing test shows why a flush failed.
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    url, namespace, count = argv[0], argv[1], int(argv[2])
    stop_file = argv[3] if len(argv) > 3 else None
    monitoring = open_monitoring(url, namespace=namespace, flush_interval=0.1, reactor=reactor)
    monitoring.service.startService()
    monitoring.metrics.backend_state.labels("primary").set(1)

    def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, count, CHUNK):
            for index in range(start, min(start + CHUNK, count)):
                record(monitoring.metrics, index)
            yield task.deferLater(reactor, PAUSE, lambda: None)

    def wait_for_stop_file():  # type: ignore[no-untyped-def]
        print("recorded", flush=True)
        while stop_file and not os.path.exists(stop_file):
            yield task.deferLater(reactor, 0.05, lambda: None)

    def stop(_: object) -> None:
        stopped = monitoring.service.stopService()

        def report(_: object) -> None:
            pending = monitoring.service.pending
            left = monitoring.metrics.buffer.delta_count() + (
                pending.series_count() if pending else 0
            )
            print(f"stopped {left}", flush=True)
            reactor.stop()

        stopped.addBoth(report)

    done = task.cooperate(chunks()).whenDone()
    done.addCallback(lambda _: task.cooperate(wait_for_stop_file()).whenDone())
    done.addBoth(stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
