"""Benchmark 3: the cost of one scrape at 1,000, 10,000 and 50,000 samples.

This project's figure is a full HTTP scrape of ``/metrics`` from the exporter service
(``collector.exporter_tap.makeService``, run by ``bench._serve``) reading a real
redis-server. The anchors are prometheus_client's ``generate_latest`` on the same series,
in-process and through ``MultiProcessCollector`` over 8 process files
(``bench._scrape_worker``). A further row times this project's collector and
``generate_latest`` in-process, without HTTP, to show where the time goes.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import subprocess
import sys
import time
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest

from bench._record_worker import product_metrics
from bench._scrape_worker import PROCESS_FILES, series_plan
from bench.context import Context
from bench.processes import REPO_ROOT, Processes, free_port
from bench.report import Benchmark, Row, Target
from collector.collector import RedisCollector
from collector.store import RedisStore

__all__ = ["run"]

NAMESPACE = "bench-scrape"
OBSERVATION = 0.012  # seconds
IN_PROCESS_TARGET = Target("ratio_max", 1.0, "<= 1.00x in-process at 10,000 samples")
MULTIPROCESS_TARGET = Target("ratio_below", 1.0, "< 1.00x multiprocess")

METHOD = (
    "Milliseconds per scrape, the fastest of several, for N samples: about half from counter"
    " series (`s3proxy_backend_requests_total`) and half from histogram series"
    " (`s3proxy_request_latency_seconds`, 17 samples each). This project's figure is a full"
    " HTTP GET of `/metrics` from the exporter service, the `makeService` of `twistd"
    " s3proxy-exporter` run in its own process by `bench/_serve.py`. The exporter reads a"
    " real redis-server, builds the families and renders text format 0.0.4. With gzip,"
    " the client sends `Accept-Encoding: gzip` and the time includes compression. The"
    " anchors run `generate_latest` on the same series in a separate interpreter"
    " (`bench/_scrape_worker.py`). One is prometheus_client in-process, without the"
    " `_created` series that this project does not expose. The other is"
    f" `MultiProcessCollector` over {PROCESS_FILES} process files that each contain every"
    f" series, as a scrape of an {PROCESS_FILES}-worker deployment reads them."
    " Targets: at most the in-process cost at 10,000 samples, and faster than"
    " multiprocess mode at every size."
)


# A profile of one scrape, measured once and not by every run.
PROFILE = (
    "Where the time goes: py-spy (200 Hz) on `generate_latest` over `RedisCollector` at"
    " 10,000 samples, source 1a596ef. prometheus_client's text formatting takes 42 % of"
    " the samples (`sample_line`, label name validation 8 %, escaping 10 %), which the"
    " in-process anchor pays too. The rest is this project's collection. Reading Redis"
    " takes 16 %, almost all of it in redis-py's pure-Python RESP parser, which the"
    " optional `hiredis` parser would replace. Building families takes 34 %: `json.loads`"
    " of every field 5 %, label checks 8 %, `add_metric` 10 %. Since a087db6, which the"
    " table above measures, the collector parses each field once and keeps it between"
    " scrapes, and `hiredis` is a dependency, so redis-py parses replies in C. Rendering the"
    " text format straight from the Redis snapshot instead of building `Metric` objects"
    " would remove most of what is left."
)


class _WallClock:
    """The clock the collector reads: the real time."""

    def seconds(self) -> float:
        return time.time()


def _populate(client: redis.Redis, samples: int) -> RedisStore:
    client.flushdb()
    store = RedisStore(client, namespace=NAMESPACE)
    metrics = product_metrics()
    store.register(metrics.definitions)
    counters, histograms = series_plan(samples)
    for index in range(counters):
        metrics.backend_requests_total.labels(f"backend-{index}", "get_object", "200").inc()
    for index in range(histograms):
        metrics.request_latency_seconds.labels(f"operation-{index}").observe(OBSERVATION)
    batch = metrics.buffer.swap("bench-writer", 1, time.time())
    store.apply(batch, time.time())
    return store


def _scrape(connection: http.client.HTTPConnection, compressed: bool) -> tuple[float, bytes]:
    headers = {"Accept-Encoding": "gzip" if compressed else "identity"}
    started = time.perf_counter()
    connection.request("GET", "/metrics", headers=headers)
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"/metrics returned status {response.status}: {body[:200]!r}")
    if compressed:
        if response.getheader("Content-Encoding") != "gzip":
            raise RuntimeError("/metrics ignored Accept-Encoding: gzip")
        body = gzip.decompress(body)
    return elapsed, body


def _count_samples(body: bytes) -> int:
    return sum(
        1 for line in body.splitlines() if line.startswith((b"s3proxy_backend_requests_total{",
                                                            b"s3proxy_request_latency_seconds"))
    )


def _anchor(mode: str, samples: int, repeats: int, directory: Any) -> float:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if mode == "multiprocess":
        files = directory / f"multiproc-{samples}"
        files.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(files)
    completed = subprocess.run(
        [sys.executable, "-m", "bench._scrape_worker", mode, str(samples), str(repeats)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"scrape worker {mode!r} failed with status {completed.returncode}:\n"
            f"{completed.stderr.strip()}"
        )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["samples"] != samples:
        raise RuntimeError(f"{mode} anchor rendered {result['samples']} samples, not {samples}")
    return float(result["seconds"])


def _fastest(function: Any, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


def run(context: Context) -> Benchmark:
    """Scrape each size over HTTP and in-process and add rows against both anchors."""
    benchmark = Benchmark("scrape", "Scrape cost", METHOD)
    benchmark.notes.append(PROFILE)
    directory = context.directory / "scrape"
    sizes = (1_000, 10_000) if context.quick else (1_000, 10_000, 50_000)
    with Processes(directory) as processes:
        redis_process, client = processes.redis(context.redis_conf)
        port = free_port()
        processes.python(
            "exporter",
            [
                "-m", "bench._serve", "exporter", str(directory / "exporter-events.log"),
                "--redis-url", f"redis://127.0.0.1:{redis_process.port}/0",
                "--namespace", NAMESPACE,
                "--listen", f"tcp:{port}:interface=127.0.0.1",
            ],
            port=port,
        )
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for samples in sizes:
            repeats = max(3, (20_000 if context.quick else 200_000) // samples)
            store = _populate(client, samples)
            _measure_size(context, benchmark, connection, store, samples, repeats, directory)
        connection.close()
    return benchmark


def _measure_size(
    context: Context,
    benchmark: Benchmark,
    connection: http.client.HTTPConnection,
    store: RedisStore,
    samples: int,
    repeats: int,
    directory: Any,
) -> None:
    # The first scrape of a size also proves that every sample is served.
    _, body = _scrape(connection, compressed=False)
    served = _count_samples(body)
    if served != samples:
        raise RuntimeError(f"/metrics served {served} samples, expected {samples}")

    plain = min(_scrape(connection, compressed=False)[0] for _ in range(repeats))
    compressed = min(_scrape(connection, compressed=True)[0] for _ in range(repeats))
    registry = CollectorRegistry()
    clock: Any = _WallClock()
    registry.register(RedisCollector(store, clock, gauge_ttl=3600.0))
    local = _fastest(lambda: generate_latest(registry), repeats)
    in_process = _anchor("inprocess", samples, repeats, directory)
    multiprocess = _anchor("multiprocess", samples, repeats, directory)

    milliseconds = 1e3
    size = f"{samples:,} samples"
    for case, figure in (
        (f"{size}: exporter HTTP scrape, gzip off", plain),
        (f"{size}: exporter HTTP scrape, gzip on", compressed),
        (f"{size}: RedisCollector + generate_latest in-process, no HTTP", local),
    ):
        context.add(
            benchmark,
            Row(
                case=case,
                figure=figure * milliseconds,
                anchor="prometheus_client in-process",
                anchor_figure=in_process * milliseconds,
                unit="ms",
                target=IN_PROCESS_TARGET if samples == 10_000 and "gzip off" in case else None,
            ),
        )
    for case, figure in (
        (f"{size}: exporter HTTP scrape, gzip off", plain),
        (f"{size}: exporter HTTP scrape, gzip on", compressed),
    ):
        context.add(
            benchmark,
            Row(
                case=case,
                figure=figure * milliseconds,
                anchor=f"prometheus_client multiprocess, {PROCESS_FILES} files",
                anchor_figure=multiprocess * milliseconds,
                unit="ms",
                target=MULTIPROCESS_TARGET if "gzip off" in case else None,
            ),
        )
