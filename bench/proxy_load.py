"""Benchmark 4: proxy throughput and latency under wrk, against nginx and the bare backend.

Servers, all on 127.0.0.1 and on the same cores as wrk:

- backend: nginx serving object files (GET) and storing PUT bodies as files, in memory;
- proxy with metrics on: ``proxy.tap.makeService`` with a real Redis, flushing every second;
- proxy with metrics off: the same service with null metrics (``bench._serve``);
- a second proxy with metrics on, for the two-process rows;
- front nginx: ``proxy_pass`` to the backend (the external anchor), and two load
  balancers, one in front of one proxy and one in front of both.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.context import Context
from bench.processes import Processes, cpu_seconds, free_port
from bench.report import Benchmark, Row, Target
from bench.s3setup import (
    ProxySetup,
    check_url,
    make_objects,
    nginx_backend_block,
    nginx_front_block,
    presign,
)
from bench.wrk import WrkResult, run_wrk

__all__ = ["run"]

# Below the proxy's pool of 16 persistent backend connections per host (proxy/forward.py).
# With as many client connections as pooled ones, a request sometimes finds no idle
# connection and opens a new one, which costs CPU at random; CHURN_CONNECTIONS shows it.
CONNECTIONS = 8
CHURN_CONNECTIONS = 16
THROUGHPUT_TARGET = Target("ratio_min", 0.98, ">= 0.98x (metrics cost <= 2 %)")
CPU_TARGET = Target("ratio_max", 1.02, "<= 1.02x (metrics cost <= 2 %)")
LATENCY_TARGET = Target("difference_max", 0.1, "<= +0.1 ms")

METHOD = (
    f"wrk with one thread and {CONNECTIONS} connections replays one SigV4 presigned URL"
    " (PUT: a Lua script sends a 1 KiB body to a presigned PUT URL), so every request is"
    " verified and re-signed by the proxy. wrk, nginx, Redis and the proxies share the"
    " machine's cores. The backend is nginx as a static S3-like server that ignores the"
    " proxy's signature: GETs read object files, and PUTs store the body as a file with"
    " WebDAV PUT, answering once the whole body is in. Its files live in `/dev/shm`."
    " The proxy is the service `twistd s3proxy` builds, run by"
    " `bench/_serve.py`, with the cache off and metrics flushed every second to a real"
    " Redis. Metrics off is the same service with a Metrics object whose recording calls do"
    " nothing and no flusher; the product has no such switch. On and off runs alternate,"
    " and each figure is the median of the repeats. The nginx anchor is `proxy_pass` with"
    " kept-alive upstream connections and buffering off, in front of the same backend."
    " Two proxy processes cannot share a port (Twisted's TCP endpoint has no SO_REUSEPORT),"
    " so they run behind an nginx load balancer, compared with one proxy behind the same"
    " load balancer. Latency p50 with one connection measures a request without queueing."
    " The proxy's CPU time per request is the user plus system time of all its threads,"
    " from `/proc/PID/stat`, over the same runs. Other processes on the machine disturb it"
    " much less than req/s, and the proxy is CPU-bound, so it gives the metrics cost a"
    " second time. The proxy keeps at most 16 idle connections per backend, so"
    f" {CONNECTIONS} connections keep every backend connection reused; one row shows what"
    f" {CHURN_CONNECTIONS} connections cost, where some requests open a new backend"
    " connection. Targets: metrics cost at most 2 % of throughput (and of CPU per"
    " request) and at most 0.1 ms of p50 latency. The on/off rows name the range of their"
    " runs. Where the ranges of on and off overlap by more than the difference of the"
    " medians, a missed target is within this machine's run-to-run noise, and the"
    " profile below gives the metrics cost instead. A row per workload compares two"
    " identical metrics-on processes the same way, which shows that noise."
)


# A profile of the proxy's CPU time, measured once and not by every run.
PROFILE = (
    "Where the time goes: py-spy (200 Hz, all threads) on the metrics-on proxy under the"
    " GET 1 KiB load at 16 connections, source 1a596ef. Twisted's HTTP server, client"
    " (Agent) and reactor take most of each request, so throughput per process is bound"
    " by Twisted's per-request work. It grows by running more processes behind a load"
    " balancer, which this 2-core machine, shared with wrk and nginx, cannot show. SigV4"
    " verification of the presigned URL takes 18 % of the samples:"
    " `_canonical_query_candidates` 5 %, `_strptime` for X-Amz-Date 2 %, signing-key"
    " derivation 2 %, which could be cached per access key, date and region. Re-signing"
    " for the backend takes 4 %. The access log line written to the log file takes 6 %,"
    " and socket sends take 13 %. Recording metrics (`Gateway.record`,"
    " `Gateway.record_attempt`) takes 0.6 % and the flusher 0.4 %. A second profile, of"
    " the metrics-off proxy under the same load, found `BaseProtocol.makeConnection` and"
    " `HTTPParser.connectionMade` in 1.3 % of the metrics-on samples and 0.1 % of the"
    " metrics-off ones. At 16 connections the backend pool had churned more in one"
    " process than in the other, and in that run metrics on looked 10 % more expensive,"
    " so the on/off rows use 8 connections. A PUT costs about 2.5 times the CPU of a GET"
    " of the same size. A profile of PUT 1 KiB, source 93b4cf1, shows that every write"
    " publishes a cache invalidation at its start and at its end, also with the cache"
    " off. Each is a blocking redis-py `PUBLISH` in the reactor's thread pool"
    " (`RedisInvalidationBus.publish`, 15 to 26 % of all samples). The thread hand-offs make the"
    " CPU per PUT vary by about 15 % from run to run, more than the 2 % target, so the"
    " PUT on/off rows cannot resolve the metrics cost."
)


@dataclass(frozen=True)
class Workload:
    """One kind of request: a name, the object key and how it is sent."""

    name: str
    key: str
    operation: str  # get_object or put_object
    size: int
    backend: str

    @property
    def put_size(self) -> int | None:
        return self.size if self.operation == "put_object" else None


WORKLOADS = (
    Workload("GET 1 KiB", "obj-1k", "get_object", 1024, "nginx static file"),
    Workload("GET 1 MiB", "obj-1m", "get_object", 1024 * 1024, "nginx static file"),
    Workload("PUT 1 KiB", "put-1k", "put_object", 1024, "nginx WebDAV PUT"),
)


@dataclass
class Servers:
    """Ports of every server the benchmark started."""

    backend: int
    anchor: int
    proxy_on: int
    proxy_off: int
    balancer_one: int
    balancer_two: int
    proxy_on_pid: int
    proxy_off_pid: int
    proxy_twin: int
    proxy_twin_pid: int


def _start(context: Context, processes: Processes) -> Servers:
    objects = make_objects(
        context.memory_directory / "proxy", {"obj-1k": 1024, "obj-1m": 1024 * 1024}
    )
    redis_process, _ = processes.redis(context.redis_conf)
    backend = free_port()
    processes.nginx("backend", nginx_backend_block(backend, objects))

    proxies = ProxySetup(processes, backend, f"redis://127.0.0.1:{redis_process.port}/0")
    on_process = proxies.start("proxy-on")
    off_process = proxies.start("proxy-off", metrics=False)
    proxy_on = on_process.port or 0
    proxy_off = off_process.port or 0
    twin_process = proxies.start("proxy-on-2")
    proxy_second = twin_process.port or 0

    anchor, balancer_one, balancer_two = free_port(), free_port(), free_port()
    processes.nginx(
        "front",
        nginx_front_block(anchor, [backend], "backend")
        + nginx_front_block(balancer_one, [proxy_on], "one_proxy")
        + nginx_front_block(balancer_two, [proxy_on, proxy_second], "two_proxies"),
    )
    return Servers(
        backend, anchor, proxy_on, proxy_off, balancer_one, balancer_two,
        on_process.pid, off_process.pid, proxy_second, twin_process.pid,
    )


def _url(port: int, workload: Workload) -> str:
    url = presign(f"http://127.0.0.1:{port}", workload.operation, workload.key)
    if workload.put_size is None:
        check_url(url, expected_length=workload.size)
    else:
        check_url(url, "PUT", b"x" * workload.size)
    return url


@dataclass(frozen=True)
class Measurement:
    """One wrk run against a proxy and the proxy's CPU seconds per request meanwhile."""

    result: WrkResult
    cpu_per_request: float


class _Loader:
    """Runs wrk with this benchmark's settings and keeps the scratch directory."""

    def __init__(self, context: Context, directory_name: str) -> None:
        self.context = context
        self.seconds = context.seconds(full=4.0, quick=1.0)
        self.directory = context.directory / directory_name
        self.directory.mkdir(parents=True, exist_ok=True)

    def load(self, url: str, workload: Workload, connections: int = CONNECTIONS) -> WrkResult:
        return run_wrk(url, self.seconds, connections, self.directory, workload.put_size)

    def load_proxy(
        self, url: str, pid: int, workload: Workload, connections: int = CONNECTIONS
    ) -> Measurement:
        """Load a proxy and measure the CPU time that process ``pid`` spent per request."""
        before = cpu_seconds(pid)
        result = self.load(url, workload, connections)
        return Measurement(result, (cpu_seconds(pid) - before) / result.requests)

    def warm_up(self, url: str, workload: Workload) -> None:
        if not self.context.quick:
            run_wrk(url, 1.0, CONNECTIONS, self.directory, workload.put_size)


def run(context: Context) -> Benchmark:
    """Load every workload through each server and add throughput and latency rows."""
    benchmark = Benchmark("proxy", "Proxy throughput and latency", METHOD)
    benchmark.notes.append(PROFILE)
    loader = _Loader(context, "wrk")
    repeats = 1 if context.quick else 5
    with Processes(context.directory / "proxy") as processes:
        servers = _start(context, processes)
        for workload in WORKLOADS:
            _measure_workload(context, benchmark, loader, servers, workload, repeats)
        _measure_balancer(context, benchmark, loader, servers, WORKLOADS[0])
        _measure_churn(context, benchmark, loader, servers, WORKLOADS[0])
    return benchmark


def _alternate(
    loader: _Loader, first: tuple[str, int], second: tuple[str, int], workload: Workload,
    repeats: int, connections: int = CONNECTIONS,
) -> tuple[list[Measurement], list[Measurement]]:
    """Load two proxies in turn, ``repeats`` times each; each is given as (URL, pid)."""
    results: tuple[list[Measurement], list[Measurement]] = ([], [])
    for _ in range(repeats):
        for (url, pid), measurements in zip((first, second), results, strict=True):
            measurements.append(loader.load_proxy(url, pid, workload, connections))
    return results


def _median_rate(measurements: list[Measurement]) -> float:
    return statistics.median(measurement.result.rate for measurement in measurements)


def _median_p50(measurements: list[Measurement]) -> float:
    return statistics.median(measurement.result.p50_ms for measurement in measurements)


def _median_cpu(measurements: list[Measurement]) -> float:
    """Return the median CPU time per request in microseconds."""
    return statistics.median(measurement.cpu_per_request for measurement in measurements) * 1e6


def _spread(measurements: list[Measurement]) -> str:
    rates = [measurement.result.rate for measurement in measurements]
    return f"{min(rates):,.0f}-{max(rates):,.0f}"


def _cpu_spread(measurements: list[Measurement]) -> str:
    cpu = [measurement.cpu_per_request * 1e6 for measurement in measurements]
    return f"{min(cpu):,.0f}-{max(cpu):,.0f}"


def _measure_workload(
    context: Context, benchmark: Benchmark, loader: _Loader, servers: Servers,
    workload: Workload, repeats: int,
) -> None:
    urls = {
        "direct": _url(servers.backend, workload),
        "anchor": _url(servers.anchor, workload),
        "on": _url(servers.proxy_on, workload),
        "off": _url(servers.proxy_off, workload),
        "twin": _url(servers.proxy_twin, workload),
    }
    for url in urls.values():
        loader.warm_up(url, workload)

    direct = loader.load(urls["direct"], workload)
    anchor = loader.load(urls["anchor"], workload)
    on_proxy = (urls["on"], servers.proxy_on_pid)
    off_proxy = (urls["off"], servers.proxy_off_pid)
    on, off = _alternate(loader, on_proxy, off_proxy, workload, repeats)
    on_rate = _median_rate(on)
    note = f"backend: {workload.backend}"
    spread = f"{note}; req/s of {repeats} runs: on {_spread(on)}, off {_spread(off)}"

    context.add(benchmark, Row(
        f"{workload.name}: proxy, metrics on", on_rate, "backend directly", direct.rate,
        "req/s", note=note,
    ))
    context.add(benchmark, Row(
        f"{workload.name}: proxy, metrics on", on_rate, "nginx proxy_pass", anchor.rate,
        "req/s", note=note,
    ))
    context.add(benchmark, Row(
        f"{workload.name}: proxy, metrics on", on_rate, "proxy, metrics off",
        _median_rate(off), "req/s", THROUGHPUT_TARGET, note=spread,
    ))
    context.add(benchmark, Row(
        f"{workload.name}: proxy CPU per request, metrics on", _median_cpu(on),
        "metrics off", _median_cpu(off), "µs", CPU_TARGET,
        note=f"{note}; µs of {repeats} runs: on {_cpu_spread(on)}, off {_cpu_spread(off)}",
    ))
    # Two identical processes show how far apart this machine puts equal work.
    twin_proxy = (urls["twin"], servers.proxy_twin_pid)
    same, twin = _alternate(loader, on_proxy, twin_proxy, workload, max(1, repeats - 2))
    context.add(benchmark, Row(
        f"{workload.name}: proxy CPU per request, metrics on", _median_cpu(same),
        "an identical metrics-on process", _median_cpu(twin), "µs",
        note=f"{note}; µs of {len(same)} runs: first {_cpu_spread(same)}, second"
        f" {_cpu_spread(twin)}",
    ))
    context.add(benchmark, Row(
        f"{workload.name}: p50 latency at {CONNECTIONS} connections, metrics on",
        _median_p50(on), "metrics off", _median_p50(off), "ms", note=note,
    ))

    if workload.size <= 1024:
        on_single, off_single = _alternate(
            loader, on_proxy, off_proxy, workload, repeats, connections=1
        )
        context.add(benchmark, Row(
            f"{workload.name}: p50 latency at 1 connection, metrics on",
            _median_p50(on_single), "metrics off", _median_p50(off_single), "ms",
            LATENCY_TARGET, note=note,
        ))
    context.note(
        benchmark,
        f"{workload.name}: p50 latency at {CONNECTIONS} connections was"
        f" {direct.p50_ms:.2f} ms directly against the backend and {anchor.p50_ms:.2f} ms"
        " through nginx proxy_pass.",
    )


def _measure_balancer(
    context: Context, benchmark: Benchmark, loader: _Loader, servers: Servers,
    workload: Workload,
) -> None:
    one_url = _url(servers.balancer_one, workload)
    two_url = _url(servers.balancer_two, workload)
    loader.warm_up(one_url, workload)
    loader.warm_up(two_url, workload)
    one = loader.load(one_url, workload)
    two = loader.load(two_url, workload)
    context.add(benchmark, Row(
        f"{workload.name}: 2 proxy processes behind nginx", two.rate,
        "1 proxy process behind the same nginx", one.rate, "req/s",
        note=f"backend: {workload.backend}",
    ))


def _measure_churn(
    context: Context, benchmark: Benchmark, loader: _Loader, servers: Servers,
    workload: Workload,
) -> None:
    url = _url(servers.proxy_on, workload)
    pid = servers.proxy_on_pid
    reused = loader.load_proxy(url, pid, workload)
    churning = loader.load_proxy(url, pid, workload, CHURN_CONNECTIONS)
    context.add(benchmark, Row(
        f"{workload.name}: proxy CPU per request at {CHURN_CONNECTIONS} connections",
        churning.cpu_per_request * 1e6, f"at {CONNECTIONS} connections",
        reused.cpu_per_request * 1e6, "µs", note=f"metrics on; backend: {workload.backend}",
    ))
