"""Benchmark 1: the cost of one recording call.

Each implementation runs in its own interpreter (``bench._record_worker``): this project's
``collector.Metrics``, prometheus_client in-process, prometheus_client multiprocess mode
(mmap files in ``PROMETHEUS_MULTIPROC_DIR``, set before the worker imports
prometheus_client) and one ``HINCRBY`` round trip to a local redis-server per call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.context import Context
from bench.processes import REPO_ROOT, Processes
from bench.report import Benchmark, Row, Target

__all__ = ["run"]

OPERATIONS = {
    "labels_inc": 'labels("get_object", "200").inc()',
    "child_inc": "inc() of a pre-bound child",
    "observe": "histogram observe() of a pre-bound child",
}
ANCHORS = {
    "prometheus": "prometheus_client in-process",
    "multiprocess": "prometheus_client multiprocess",
    "redis": "one Redis HINCRBY round trip",
}
TARGET = Target("ratio_max", 1.0, "<= 1.00x in-process")

METHOD = (
    "Nanoseconds per call, the fastest of 5 repeats, minus the cost of an empty Python call,"
    " so the figure is the work of the call itself. Each implementation runs in a fresh"
    " interpreter (`bench/_record_worker.py`). The counter has the labels operation and"
    " code; the histogram has Prometheus' default buckets and one label. Multiprocess mode"
    " is prometheus_client with `PROMETHEUS_MULTIPROC_DIR` set before its import, so every"
    " value lives in an mmap file. The Redis anchor sends one `HINCRBY` per call to a local"
    " redis-server, which is what recording without a buffer would cost. Target: this"
    " project costs at most as much as prometheus_client in-process for every call."
)


def _worker(variant: str, seconds: float, env: dict[str, str], redis_port: int) -> dict[str, float]:
    argv = [sys.executable, "-m", "bench._record_worker", variant, str(seconds)]
    if variant == "redis":
        argv.append(str(redis_port))
    completed = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=max(120.0, seconds * 10), check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"recording worker {variant!r} failed with status {completed.returncode}:\n"
            f"{completed.stderr.strip()}"
        )
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run(context: Context) -> Benchmark:
    """Measure recording calls of every implementation and add one row per anchor."""
    benchmark = Benchmark("recording", "Recording cost per call", METHOD)
    seconds = context.seconds(full=6.0, quick=1.0)
    directory = context.directory / "recording"
    multiproc_dir = directory / "multiproc"
    multiproc_dir.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("prometheus_multiproc_dir", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    multiproc_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}

    with Processes(directory) as processes:
        redis_process, _ = processes.redis(context.redis_conf)
        port = redis_process.port or 0
        ours = _worker("collector", seconds, env, port)
        anchors = {
            "prometheus": _worker("prometheus", seconds, env, port),
            "multiprocess": _worker("multiprocess", seconds, multiproc_env, port),
            # A round trip costs about 1000x a buffered call, so a short run is precise.
            "redis": _worker("redis", min(seconds, 1.5), env, port),
        }

    for operation, description in OPERATIONS.items():
        for variant, anchor in ANCHORS.items():
            context.add(
                benchmark,
                Row(
                    case=f"collector.Metrics: {description}",
                    figure=ours[operation],
                    anchor=anchor,
                    anchor_figure=anchors[variant][operation],
                    unit="ns/call",
                    target=TARGET if variant == "prometheus" else None,
                ),
            )
    return benchmark
