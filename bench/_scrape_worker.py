"""Time prometheus_client's own exposition of the scrape benchmark's series.

Run as ``python -m bench._scrape_worker MODE SAMPLES REPEATS``. MODE ``inprocess`` builds
the series in a ``CollectorRegistry`` of ordinary metrics. MODE ``multiprocess`` needs
``PROMETHEUS_MULTIPROC_DIR`` set by the caller. It writes the series into the mmap files of
8 process ids and reads them back through ``MultiProcessCollector``, as a scrape of an
8-worker deployment does. It prints the fastest time in seconds of ``generate_latest`` over
REPEATS runs and the number of samples rendered, as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

__all__ = ["PROCESS_FILES", "SAMPLES_PER_HISTOGRAM", "series_plan"]

PROCESS_FILES = 8
# Prometheus' default buckets are 15 with +Inf; a series also has _sum and _count.
SAMPLES_PER_HISTOGRAM = 17
OBSERVATION = 0.012  # seconds


def series_plan(samples: int) -> tuple[int, int]:
    """Return (counter series, histogram series) that make up ``samples`` samples.

    About half of the samples come from histograms and half from counters, as on a
    proxy whose latency histograms sit next to its request counters.
    """
    histograms = samples // 2 // SAMPLES_PER_HISTOGRAM
    return samples - histograms * SAMPLES_PER_HISTOGRAM, histograms


def _record(counter: Any, histogram: Any, counters: int, histograms: int) -> None:
    for index in range(counters):
        counter.labels(f"backend-{index}", "get_object", "200").inc()
    for index in range(histograms):
        histogram.labels(f"operation-{index}").observe(OBSERVATION)


def _metrics(registry: Any) -> tuple[Any, Any]:
    from prometheus_client import Counter, Histogram

    counter = Counter(
        "s3proxy_backend_requests_total", "Attempts sent to backends.",
        ["backend_id", "operation", "code"], registry=registry,
    )
    histogram = Histogram(
        "s3proxy_request_latency_seconds", "Request latency.", ["operation"],
        registry=registry,
    )
    return counter, histogram


def _inprocess_registry(samples: int) -> Any:
    from prometheus_client import CollectorRegistry, disable_created_metrics

    # The project exposes no _created series, so the anchor leaves them out too.
    disable_created_metrics()
    registry = CollectorRegistry()
    counter, histogram = _metrics(registry)
    _record(counter, histogram, *series_plan(samples))
    return registry


def _multiprocess_registry(samples: int) -> Any:
    from prometheus_client import CollectorRegistry, values
    from prometheus_client.multiprocess import MultiProcessCollector

    # One process writes the files of PROCESS_FILES process ids. On the next update after
    # the id changes, prometheus_client moves every value to the new id's file. That file
    # is the one a separate worker process with that id would have written.
    fake_pid = {"value": 1}
    values.ValueClass = values.MultiProcessValue(lambda: fake_pid["value"])
    counter, histogram = _metrics(CollectorRegistry())
    counters, histograms = series_plan(samples)
    _record(counter, histogram, counters, histograms)
    for pid in range(2, PROCESS_FILES + 1):
        fake_pid["value"] = pid
        _record(counter, histogram, counters, histograms)

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def main(argv: list[str]) -> int:
    mode, samples, repeats = argv[1], int(argv[2]), int(argv[3])
    from prometheus_client import generate_latest

    if mode == "inprocess":
        registry = _inprocess_registry(samples)
    elif mode == "multiprocess":
        registry = _multiprocess_registry(samples)
    else:
        raise SystemExit(f"unknown mode {mode!r}; use inprocess or multiprocess")

    body = generate_latest(registry)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate_latest(registry)
        timings.append(time.perf_counter() - started)
    rendered = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    print(json.dumps({"seconds": min(timings), "samples": rendered}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
