"""Benchmark 2: the cost of one flush of N dirty series into a real redis-server.

A flush is :meth:`collector.store.RedisStore.apply`, which the flusher runs in a thread:
it encodes the batch and applies it in one ``EVALSHA`` of the store's Lua script. The
anchor sends the same hash operations as one plain redis-py pipeline (no script, no
exactly-once check), the cheapest way to write the same deltas in one round trip.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis

from bench._record_worker import product_metrics
from bench.context import Context
from bench.processes import Processes
from bench.report import Benchmark, Row
from collector.buffer import Batch
from collector.metrics import Metrics
from collector.store import RedisStore, batch_operations

__all__ = ["run"]

SIZES = (100, 1_000, 10_000)
OBSERVATION = 0.012  # seconds

METHOD = (
    "One flush of N dirty series: half of them counter series with one increment, half"
    " histogram series with one observation (three hash fields each: a bucket, sum and"
    " count). The wall time is `RedisStore.apply` as the flusher calls it, encoding"
    " included, against a redis-server started from the repository's `redis.conf` (append"
    " only file, `appendfsync everysec`). Redis CPU is `usec_per_call` of `evalsha` in"
    " `INFO commandstats`, reset before the timed flushes. The anchor sends the same"
    " `HINCRBYFLOAT`/`HINCRBY` operations as one non-transactional pipeline, so the ratio is"
    " the price of the Lua script's atomic exactly-once apply; its Redis CPU is the sum of"
    " those commands' time. Figures are medians of the timed flushes, divided by N."
    " No target is set for this benchmark."
)


# A profile of one flush, measured once and not by every run.
PROFILE = (
    "Where the time goes: py-spy (200 Hz) on repeated flushes of 10,000 series, source"
    " 1a596ef. 80 % of the samples are in `RedisStore.apply` on the client: redis-py's"
    " pure-Python command packing 36 % and `json.dumps` of every series field in"
    " `batch_operations` 30 %; Redis itself is a small part. The flusher runs this in a"
    " thread, but that Python work holds the GIL, so about 14 µs per dirty series per"
    " flush is taken from the reactor. Caching each series' encoded field in the buffer (the label"
    " values of a series never change) would remove the `json.dumps` part. Since a087db6"
    " `hiredis` is a dependency, and redis-py packs commands with it when it is installed,"
    " so the table above measures that packer."
)


def _fill(metrics: Metrics, series: int) -> None:
    counters = series // 2
    for index in range(counters):
        metrics.backend_requests_total.labels(f"backend-{index}", "get_object", "200").inc()
    for index in range(series - counters):
        metrics.request_latency_seconds.labels(f"operation-{index}").observe(OBSERVATION)


def _batch(metrics: Metrics, sequence: int) -> Batch:
    # One writer per Metrics object: the store applies a writer's sequence numbers once.
    return metrics.buffer.swap(f"bench-writer-{id(metrics)}", sequence, time.time())


def _pipeline_flush(client: redis.Redis, prefix: str, batch: Batch) -> None:
    commands = {"f": "HINCRBYFLOAT", "i": "HINCRBY", "s": "HSET"}
    with client.pipeline(transaction=False) as pipeline:
        for operation, name, field, value in batch_operations(batch):
            command = commands.get(operation)
            if command is not None:
                pipeline.execute_command(command, f"{prefix}family:{name}", field, value)
        pipeline.execute()


def _command_usec(client: redis.Redis, names: tuple[str, ...]) -> tuple[float, int]:
    """Return the total usec and calls of the commands ``names`` since the last reset."""
    stats: Any = client.info("commandstats")
    usec = 0.0
    calls = 0
    for name in names:
        entry = stats.get(f"cmdstat_{name}")
        if entry:
            usec += float(entry["usec"])
            calls += int(entry["calls"])
    return usec, calls


def _measure_size(
    client: redis.Redis, store: RedisStore, series: int, flushes: int
) -> dict[str, float]:
    metrics = product_metrics()
    sequence = 0

    # The first flush creates the fields and loads the script. It is not timed, because
    # a running proxy flushes into fields that already exist.
    _fill(metrics, series)
    sequence += 1
    store.apply(_batch(metrics, sequence), time.time())
    _fill(metrics, series)
    _pipeline_flush(client, "{bench-anchor}:", _batch(metrics, 0))

    script_walls: list[float] = []
    client.config_resetstat()
    for _ in range(flushes):
        _fill(metrics, series)
        sequence += 1
        batch = _batch(metrics, sequence)
        started = time.perf_counter()
        result = store.apply(batch, time.time())
        script_walls.append(time.perf_counter() - started)
        if not result.applied or result.failed_operations:
            raise RuntimeError(f"flush {sequence} of {series} series was not applied: {result}")
    script_usec, script_calls = _command_usec(client, ("evalsha",))

    pipeline_walls: list[float] = []
    client.config_resetstat()
    for _ in range(flushes):
        _fill(metrics, series)
        batch = _batch(metrics, 0)
        started = time.perf_counter()
        _pipeline_flush(client, "{bench-anchor}:", batch)
        pipeline_walls.append(time.perf_counter() - started)
    pipeline_usec, _ = _command_usec(client, ("hincrbyfloat", "hincrby", "hset"))

    return {
        "script_wall": statistics.median(script_walls),
        "pipeline_wall": statistics.median(pipeline_walls),
        "script_cpu": script_usec / max(script_calls, 1) / 1e6,
        "pipeline_cpu": pipeline_usec / flushes / 1e6,
    }


def run(context: Context) -> Benchmark:
    """Time flushes of each size and add wall time and Redis CPU rows per size."""
    benchmark = Benchmark("flush", "Flush cost", METHOD)
    benchmark.notes.append(PROFILE)
    flushes = 5 if context.quick else 15
    with Processes(context.directory / "flush") as processes:
        _, client = processes.redis(context.redis_conf)
        store = RedisStore(client, namespace="bench-flush")
        store.register(product_metrics().definitions)
        for series in SIZES:
            figures = _measure_size(client, store, series, flushes)
            per_series = 1e6 / series
            context.add(
                benchmark,
                Row(
                    case=f"flush of {series:,} series, wall time",
                    figure=figures["script_wall"] * per_series,
                    anchor="plain pipeline, wall time",
                    anchor_figure=figures["pipeline_wall"] * per_series,
                    unit="µs/series",
                    note=f"{figures['script_wall'] * 1e3:.2f} ms per flush",
                ),
            )
            context.add(
                benchmark,
                Row(
                    case=f"flush of {series:,} series, Redis CPU of evalsha",
                    figure=figures["script_cpu"] * per_series,
                    anchor="plain pipeline, Redis CPU",
                    anchor_figure=figures["pipeline_cpu"] * per_series,
                    unit="µs/series",
                    note=f"{figures['script_cpu'] * 1e3:.2f} ms per flush",
                ),
            )
    return benchmark
