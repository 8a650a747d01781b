"""Time recording calls of one implementation in a fresh interpreter.

Run as ``python -m bench._record_worker VARIANT SECONDS [REDIS_PORT]``. The variants are:

- ``collector``: this project's ``collector.Metrics``;
- ``prometheus``: prometheus_client in-process;
- ``multiprocess``: prometheus_client with ``PROMETHEUS_MULTIPROC_DIR`` set by the caller,
  so that its values are mmap files;
- ``redis``: one ``HINCRBY`` round trip to the redis-server on REDIS_PORT per call.

It prints one JSON object: operation name -> nanoseconds per call.

Every variant runs in its own interpreter, so no variant inherits another's warm caches,
and prometheus_client reads ``PROMETHEUS_MULTIPROC_DIR`` before its first import, as it
requires.
"""

from __future__ import annotations

import json
import sys
import timeit
from collections.abc import Callable
from typing import Any

OPERATIONS = ("labels_inc", "child_inc", "observe")
OPERATION_LABELS = ("get_object", "200")
OBSERVATION = 0.012  # seconds; falls in a middle bucket of the default buckets


def product_metrics() -> Any:
    """Return a ``collector.Metrics`` built by ``open_monitoring``, as a proxy builds it.

    The flusher is never started, so the buffer only grows; nothing runs in a thread.
    """
    from twisted.internet.task import Clock

    from collector import open_monitoring
    from collector.store import EmbeddedStore

    def no_thread(function: Callable[..., Any], *args: Any) -> Any:
        raise AssertionError("the benchmarks never start the flusher of product_metrics()")

    monitoring = open_monitoring(reactor=Clock(), run_in_thread=no_thread, store=EmbeddedStore())
    return monitoring.metrics


def _statements(variant: str, redis_port: int | None) -> dict[str, Callable[[], Any]]:
    """Return one zero-argument callable per operation, bound to fresh metrics."""
    if variant == "collector":
        metrics = product_metrics()
        counter = metrics.requests_total
        child = counter.labels(*OPERATION_LABELS)
        histogram = metrics.request_latency_seconds.labels("get_object")
        return {
            "labels_inc": lambda: counter.labels("get_object", "200").inc(),
            "child_inc": child.inc,
            "observe": lambda: histogram.observe(OBSERVATION),
        }

    if variant in ("prometheus", "multiprocess"):
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Histogram as PromHistogram

        registry = CollectorRegistry()
        prom_counter = PromCounter(
            "s3proxy_requests", "Requests.", ["operation", "code"], registry=registry
        )
        prom_child = prom_counter.labels(*OPERATION_LABELS)
        prom_histogram = PromHistogram(
            "s3proxy_request_latency_seconds", "Latency.", ["operation"], registry=registry
        ).labels("get_object")
        return {
            "labels_inc": lambda: prom_counter.labels("get_object", "200").inc(),
            "child_inc": prom_child.inc,
            "observe": lambda: prom_histogram.observe(OBSERVATION),
        }

    if variant == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=redis_port or 6379, socket_timeout=10)
        client.ping()

        def round_trip() -> None:
            client.hincrby("bench:record", '["get_object","200"]', 1)

        return dict.fromkeys(OPERATIONS, round_trip)

    raise SystemExit(
        f"unknown variant {variant!r}; use collector, prometheus, multiprocess or redis"
    )


def time_call(call: Callable[[], Any], seconds: float, repeats: int = 5) -> float:
    """Return the fastest of ``repeats`` timings of ``call()``, in nanoseconds per call.

    The cost of an empty call of the same shape is subtracted, so the figure is the work
    of the call itself. Each repeat runs about ``seconds / repeats``.
    """
    timer = timeit.Timer(call)
    empty = timeit.Timer(_nothing)
    number = _calls_for(timer, seconds / repeats)
    best = min(timer.repeat(repeats, number)) / number
    baseline = min(empty.repeat(repeats, number)) / number
    return max(best - baseline, 0.0) * 1e9


def _nothing() -> None:
    pass


def _calls_for(timer: timeit.Timer, budget: float) -> int:
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= budget / 10 or number >= 10**8:
            return max(1, int(number * budget / max(elapsed, 1e-9)))
        number *= 10


def main(argv: list[str]) -> int:
    variant, seconds = argv[1], float(argv[2])
    redis_port = int(argv[3]) if len(argv) > 3 else None
    statements = _statements(variant, redis_port)
    per_operation = seconds / len(statements)
    result = {name: time_call(call, per_operation) for name, call in statements.items()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
