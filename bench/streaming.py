"""Benchmark 5: one 1 GiB GET and one 1 GiB PUT through the proxy, and its peak memory.

curl downloads a sparse 1 GiB file that nginx serves, and uploads a sparse 1 GiB file
that nginx stores in memory (``/dev/shm``), once directly and once through a fresh proxy
process. The proxy's peak resident set size (``VmHWM`` in ``/proc/PID/status``) is read
after a small warm-up request and after each transfer.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.context import Context
from bench.processes import Processes, free_port, peak_rss_kib
from bench.report import Benchmark, Row, Target
from bench.s3setup import (
    ProxySetup,
    check_url,
    make_objects,
    nginx_backend_block,
    presign,
)

__all__ = ["run"]

MIB = 1024 * 1024
RSS_TARGET = Target("difference_max", 32.0, "<= +32 MiB")

METHOD = (
    "curl downloads one object through the proxy and directly from nginx, and uploads one"
    " with a presigned PUT URL through the proxy and directly to nginx, which stores it"
    " with WebDAV PUT and answers once the whole body is in. Objects live in `/dev/shm`"
    " and the downloaded one is a sparse file, so no disk is measured."
    " MB/s is 10^6 bytes per second of curl's total time. The proxy is a fresh"
    " process (the service `twistd s3proxy` builds, metrics on). Its peak resident set size"
    " is `VmHWM` from `/proc/PID/status`, first after one 1 KiB GET and one 1 KiB PUT, then"
    " after each transfer. Target: the peak grows by at most 32 MiB, which shows that the"
    " body streams through instead of being held in memory."
)


def _curl(url: str, upload: Path | None, size: int) -> float:
    """Transfer ``size`` bytes with curl and return the seconds it took."""
    argv = [
        "curl", "--silent", "--show-error", "--max-time", "600", "--output", "/dev/null",
        "--write-out", "%{http_code} %{size_download} %{size_upload} %{time_total}",
    ]
    if upload is not None:
        argv += ["--upload-file", str(upload)]
    completed = subprocess.run(
        [*argv, url], capture_output=True, text=True, timeout=660, check=False
    )
    fields = completed.stdout.split()
    if completed.returncode != 0 or len(fields) != 4:
        raise RuntimeError(
            f"curl failed with status {completed.returncode}: {completed.stderr.strip()}"
        )
    status, downloaded, uploaded, seconds = fields
    moved = float(uploaded if upload is not None else downloaded)
    if not status.startswith("2") or moved != size:
        raise RuntimeError(
            f"curl transfer of {url.split('?')[0]} returned status {status} after moving "
            f"{moved:.0f} of {size} bytes"
        )
    return float(seconds)


def run(context: Context) -> Benchmark:
    """Stream one large object each way, directly and through the proxy."""
    size = (256 if context.quick else 1024) * MIB
    name = f"{size // MIB} MiB" if size < 1024 * MIB else "1 GiB"
    benchmark = Benchmark("streaming", "Streaming 1 GiB", METHOD)
    if context.quick:
        context.note(benchmark, f"--quick moved {name} instead of 1 GiB.")

    directory = context.directory / "streaming"
    objects = make_objects(
        context.memory_directory / "streaming", {"large": size, "small": 1024}
    )
    upload = objects / "bench" / "large"
    with Processes(directory) as processes:
        redis_process, _ = processes.redis(context.redis_conf)
        backend = free_port()
        processes.nginx("backend", nginx_backend_block(backend, objects))
        proxies = ProxySetup(processes, backend, f"redis://127.0.0.1:{redis_process.port}/0")
        proxy = proxies.start("proxy")
        proxy_endpoint = f"http://127.0.0.1:{proxy.port}"
        backend_endpoint = f"http://127.0.0.1:{backend}"

        check_url(presign(proxy_endpoint, "get_object", "small"), expected_length=1024)
        check_url(presign(proxy_endpoint, "put_object", "small-upload"), "PUT", b"x" * 1024)
        baseline = peak_rss_kib(proxy.pid) / 1024

        direct_get = _curl(presign(backend_endpoint, "get_object", "large"), None, size)
        proxy_get = _curl(presign(proxy_endpoint, "get_object", "large"), None, size)
        after_get = peak_rss_kib(proxy.pid) / 1024
        direct_put = _curl(presign(backend_endpoint, "put_object", "upload"), upload, size)
        proxy_put = _curl(presign(proxy_endpoint, "put_object", "upload"), upload, size)
        after_put = peak_rss_kib(proxy.pid) / 1024

    megabytes = size / 1e6
    context.add(benchmark, Row(
        f"GET {name} through the proxy", megabytes / proxy_get, "nginx directly",
        megabytes / direct_get, "MB/s", note="backend: nginx static sparse file",
    ))
    context.add(benchmark, Row(
        f"PUT {name} through the proxy", megabytes / proxy_put, "nginx directly",
        megabytes / direct_put, "MB/s", note="backend: nginx WebDAV PUT into /dev/shm",
    ))
    context.add(benchmark, Row(
        f"proxy peak RSS after the GET of {name}", after_get,
        "peak RSS after warm-up", baseline, "MiB", RSS_TARGET,
    ))
    context.add(benchmark, Row(
        f"proxy peak RSS after the GET and PUT of {name}", after_put,
        "peak RSS after warm-up", baseline, "MiB", RSS_TARGET,
    ))
    return benchmark
