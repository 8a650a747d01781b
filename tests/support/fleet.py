"""A fleet for integration tests: several ``twistd s3proxy`` processes and one exporter.

All processes share one Redis. :class:`Fleet` starts them on free loopback ports;
:class:`LoadClient` sends a known mix of S3 requests spread over the proxies and counts
what the clients saw. :class:`MonotonicScraper` scrapes the exporter in a loop and records
every counter sample that went down. :class:`SlowBackend` is an S3 stand-in that takes its
time, for requests that are in flight when a proxy stops.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxy_process import (
    CLIENT_ACCESS_KEY,
    CLIENT_SECRET_KEY,
    BotoCallLog,
    ProxyProcess,
)
from tests.support.servers import TwistdProcess, free_port, twistd_argv, twistd_env

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]

# Sample names whose values must never decrease while Redis keeps its data.
_MONOTONIC_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def parse_samples(text: str) -> Samples:
    """Return every sample of a text exposition by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def request_totals(samples: Samples) -> dict[tuple[str, str], float]:
    """Return ``s3proxy_requests_total`` by (operation, code)."""
    totals: dict[tuple[str, str], float] = {}
    for (name, labels), value in samples.items():
        if name == "s3proxy_requests_total":
            label = dict(labels)
            totals[(label["operation"], label["code"])] = value
    return totals


def latency_counts(samples: Samples) -> dict[str, float]:
    """Return ``s3proxy_request_latency_seconds_count`` by operation."""
    return {
        dict(labels)["operation"]: value
        for (name, labels), value in samples.items()
        if name == "s3proxy_request_latency_seconds_count"
    }


def series_of(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Return the samples named ``name`` by labels."""
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


class Exporter:
    """A ``twistd s3proxy-exporter`` process for ``redis_url``."""

    def __init__(self, tmp_path: Path, redis_url: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path = Path(tmp_path) / "exporter.log"
        self.process = TwistdProcess(
            twistd_argv(
                "s3proxy-exporter",
                "--redis-url", redis_url,
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                *args,
                log_path=log_path,
            ),
            twistd_env(),
            ready_url=self.url + "/healthz",
            log_path=log_path,
        )

    def start(self) -> Exporter:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as response:
            return parse_samples(response.read().decode("utf-8"))

    def wait_for_totals(
        self, expected: dict[tuple[str, str], int], timeout: float = 30.0
    ) -> Samples:
        """Scrape until the request totals equal ``expected``; return the last scrape."""
        wanted = {key: float(value) for key, value in expected.items() if value}
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if request_totals(samples) == wanted or time.monotonic() > deadline:
                return samples
            time.sleep(0.2)

    def wait_for(self, condition: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
        """Scrape until ``condition`` holds for a scrape; return the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if condition(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.2)


class Fleet:
    """``count`` proxies in front of ``backend_endpoint`` writing to ``redis_url``, and an exporter.

    :param proxy_options: further keyword arguments of :class:`ProxyProcess`.
    :param exporter_args: further command-line arguments of the exporter.
    :param metrics: further ``[metrics]`` keys of every proxy's configuration file.
    """

    def __init__(
        self,
        tmp_path: Path,
        redis_url: str,
        backend_endpoint: str,
        count: int = 3,
        exporter_args: tuple[str, ...] = (),
        metrics: dict[str, object] | None = None,
        **proxy_options: Any,
    ) -> None:
        self.metrics = metrics or {}
        self.tmp_path = Path(tmp_path)
        self.redis_url = redis_url
        self.backend_endpoint = backend_endpoint
        self.proxy_options = {"flush_interval": 0.2, **proxy_options}
        self.proxies: list[ProxyProcess] = [self._new_proxy() for _ in range(count)]
        self.exporter = Exporter(self.tmp_path, redis_url, *exporter_args)
        self._started = 0

    def _new_proxy(self) -> ProxyProcess:
        self._started = getattr(self, "_started", 0) + 1
        directory = self.tmp_path / f"proxy-{self._started}"
        proxy = ProxyProcess(
            directory, self.backend_endpoint, redis_url=self.redis_url, **self.proxy_options
        )
        if self.metrics:
            # TOML values of these types are written like JSON.
            lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in self.metrics.items())
            text = proxy.config_path.read_text().replace("[metrics]\n", "[metrics]\n" + lines, 1)
            proxy.config_path.write_text(text)
        return proxy

    def start(self) -> Fleet:
        self.exporter.start()
        for proxy in self.proxies:
            proxy.start()
        return self

    def replace(self, index: int) -> ProxyProcess:
        """Start a new proxy in place of proxy ``index``, which must have stopped."""
        self.proxies[index] = self._new_proxy().start()
        return self.proxies[index]

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.exporter.stop()


def s3_client(endpoint: str) -> Any:
    """Return a boto3 S3 client for a proxy that never retries, so client counts are exact."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CLIENT_ACCESS_KEY,
        aws_secret_access_key=CLIENT_SECRET_KEY,
        region_name="us-east-1",
        config=Config(
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"},
        ),
    )


class LoadClient:
    """Sends ``per_proxy`` requests to each proxy, one thread per proxy.

    The mix per proxy cycles through put_object (200), get_object (200) and head_object of
    a missing key (404). Every call that got an HTTP response is counted by operation and
    status in :attr:`calls`; calls without a response are counted in :attr:`errors`.

    :ivar latencies: (monotonic time, seconds) of every call, for reports.
    """

    def __init__(self, endpoints: list[str], bucket: str, per_proxy: int,
                 pause: float = 0.0) -> None:
        self.endpoints = endpoints
        self.bucket = bucket
        self.per_proxy = per_proxy
        self.pause = pause
        self.clients = [s3_client(endpoint) for endpoint in endpoints]
        self.log = BotoCallLog(*self.clients)
        self.errors: Counter[str] = Counter()
        self.latencies: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def calls(self) -> Counter[tuple[str, str]]:
        return self.log.calls

    def create_bucket(self) -> None:
        self.clients[0].create_bucket(Bucket=self.bucket)

    def start(self) -> LoadClient:
        for index, client in enumerate(self.clients):
            thread = threading.Thread(target=self._run, args=(index, client), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def join(self, timeout: float = 300.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"load thread still running after {timeout} s")

    def run(self) -> LoadClient:
        """Send every request and wait for the threads to finish."""
        self.start()
        self.join()
        return self

    def _run(self, index: int, client: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for number in range(self.per_proxy):
            key = f"p{index}-k{number // 3}"
            started = time.monotonic()
            try:
                step = number % 3
                if step == 0:
                    client.put_object(Bucket=self.bucket, Key=key, Body=b"x" * 64)
                elif step == 1:
                    client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                else:
                    client.head_object(Bucket=self.bucket, Key=key + "-missing")
            except ClientError:
                pass  # An HTTP error response; BotoCallLog counted it.
            except BotoCoreError as err:
                with self._lock:
                    self.errors[type(err).__name__] += 1
            with self._lock:
                self.latencies.append((started, time.monotonic() - started))
            if self.pause:
                time.sleep(self.pause)


def latency_report(latencies: list[tuple[float, float]], phases: dict[str, tuple[float, float]]
                   ) -> str:
    """Return median and max latency in milliseconds per phase (name -> start, end)."""
    lines = []
    for name, (start, end) in phases.items():
        values = [seconds for started, seconds in latencies if start <= started < end]
        if values:
            lines.append(
                f"{name}: {len(values)} requests, median {statistics.median(values) * 1000:.1f} ms,"
                f" max {max(values) * 1000:.1f} ms"
            )
        else:
            lines.append(f"{name}: no requests")
    return "\n".join(lines)


class MonotonicScraper:
    """Scrapes an exporter every ``interval`` seconds in a thread and records decreases.

    A counter, histogram bucket, count or sum sample that is lower than in the previous
    scrape, or missing after it was present, is a violation. Scrapes with
    ``s3proxy_redis_up 0`` are skipped.
    """

    def __init__(self, exporter: Exporter, interval: float = 0.2) -> None:
        self.exporter = exporter
        self.interval = interval
        self.violations: list[str] = []
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MonotonicScraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        previous: Samples = {}
        while not self._stop.is_set():
            try:
                samples = self.exporter.scrape()
            except OSError:
                samples = {}
            if samples.get(("s3proxy_redis_up", ())) == 1:
                self.scrapes += 1
                for key, value in previous.items():
                    if not key[0].endswith(_MONOTONIC_SUFFIXES):
                        continue
                    now = samples.get(key)
                    if now is None or now < value:
                        self.violations.append(f"{key}: {value} -> {now}")
                previous = samples
            self._stop.wait(self.interval)


class _SlowHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SlowServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, body: bytes = b"", slow: bool = False) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if slow:
            self.server.backend.received()
            time.sleep(self.server.backend.delay)
        self.send_response(200)
        self.send_header("ETag", '"d41d8cd98f00b204e9800998ecf8427e"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self._answer(slow=True)

    def do_GET(self) -> None:
        self._answer(b"slow")

    def do_HEAD(self) -> None:
        self._answer()


class _SlowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend: SlowBackend) -> None:
        super().__init__(("127.0.0.1", backend.port), _SlowHandler)
        self.backend = backend


class SlowBackend:
    """An S3 stand-in that responds to PUT with 200 after ``delay`` seconds, to GET at once.

    It checks no signature; :attr:`count` is the number of PUT requests received so far.
    Health checks (GET /) are answered at once, so the backend stays UP.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = free_port()
        self.count = 0
        self._lock = threading.Lock()
        self._server = _SlowServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self) -> None:
        with self._lock:
            self.count += 1

    def start(self) -> SlowBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` every 50 ms; raise RuntimeError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)

