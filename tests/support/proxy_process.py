"""Run C{twistd s3proxy} from the source tree as a subprocess, with a generated config file."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.servers import TwistdProcess, free_port, twistd_argv, twistd_env
from tests.support.tls import CertificateFiles

# The credential clients of the proxy sign with.
CLIENT_ACCESS_KEY = "proxy-client"
CLIENT_SECRET_KEY = "proxy-client-secret"
# The credential the proxy signs backend requests with.
BACKEND_ACCESS_KEY = "backend-access"
BACKEND_SECRET_KEY = "backend-secret"


def _toml_value(value: object) -> str:
    # TOML strings, booleans, numbers and arrays of them have the same syntax as JSON.
    return json.dumps(value)


class ProxyProcess:
    """
    A C{twistd s3proxy} process in front of one backend, on free loopback ports.

    @param backend_endpoint: the backend URL, for example the SigV4 front before moto.
    @param certificate: listen with TLS using this certificate instead of plain TCP.
    @param server: extra C{[server]} keys.
    @param redis_url: the metrics store; L{None} for the embedded single-process store.
    """

    def __init__(
        self,
        tmp_path: Path,
        backend_endpoint: str,
        certificate: CertificateFiles | None = None,
        server: Mapping[str, object] | None = None,
        redis_url: str | None = None,
        flush_interval: float = 0.2,
    ) -> None:
        self.directory = Path(tmp_path) / "s3proxy"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.certificate = certificate
        self.config_path = self.directory / "proxy.toml"
        self.log_path = self.directory / "twistd.log"

        listen = (
            certificate.endpoint(self.port)
            if certificate is not None
            else f"tcp:{self.port}:interface=127.0.0.1"
        )
        server_keys = {"listen": listen, "region": "us-east-1", **(server or {})}
        lines = ["[server]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in server_keys.items()]
        lines += [
            "[metrics]",
            f'listen = "tcp:{self.metrics_port}:interface=127.0.0.1"',
            f"flush_interval = {flush_interval}",
        ]
        if redis_url is not None:
            lines.append(f"redis_url = {_toml_value(redis_url)}")
        lines += [
            "[[users]]",
            f'access_key = "{CLIENT_ACCESS_KEY}"',
            f'secret_key = "{CLIENT_SECRET_KEY}"',
            "[[backends]]",
            'id = "primary"',
            f"endpoint = {_toml_value(backend_endpoint)}",
            f'access_key = "{BACKEND_ACCESS_KEY}"',
            f'secret_key = "{BACKEND_SECRET_KEY}"',
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process = TwistdProcess(
            twistd_argv("s3proxy", "--config", str(self.config_path), log_path=self.log_path),
            twistd_env(),
            ready_url=self.metrics_url,
            log_path=self.log_path,
        )

    @property
    def endpoint(self) -> str:
        """The URL clients send S3 requests to."""
        scheme = "https" if self.certificate is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> ProxyProcess:
        self.process.start()
        return self

    def stop(self) -> int | None:
        """Stop with SIGTERM (the flusher writes its last batch) and return the exit code."""
        return self.process.stop()

    def scrape(self) -> str:
        """Return the text exposition of C{/metrics}."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode("utf-8")

    def log_text(self) -> str:
        return self.process.log_text()


# Metrics of the proxy, read from its /metrics text exposition.

RequestCounts = dict[tuple[str, str], float]


def request_series(text: str) -> tuple[RequestCounts, dict[str, float]]:
    """
    Return C{s3proxy_requests_total} by (operation, code) and the latency C{_count} by operation.
    """
    from prometheus_client.parser import text_string_to_metric_families

    totals: RequestCounts = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "s3proxy_requests_total":
                key = (sample.labels["operation"], sample.labels["code"])
                totals[key] = totals.get(key, 0.0) + sample.value
            elif sample.name == "s3proxy_request_latency_seconds_count":
                operation = sample.labels["operation"]
                counts[operation] = counts.get(operation, 0.0) + sample.value
    return totals, counts


class MetricsWatch:
    """
    The change of the request metrics of one proxy since this object was made.

    Metrics reach C{/metrics} after the next flush, so L{wait_for} scrapes until the change
    equals the expected one or C{timeout} seconds passed, then returns the last change.
    """

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.totals, self.counts = request_series(proxy.scrape())
        self.last_text = ""

    def change(self) -> tuple[RequestCounts, dict[str, float]]:
        """Scrape once and return the requests and latency counts added since creation."""
        self.last_text = self.proxy.scrape()
        totals, counts = request_series(self.last_text)
        total_change = {
            key: value - self.totals.get(key, 0.0)
            for key, value in totals.items()
            if value != self.totals.get(key, 0.0)
        }
        count_change = {
            op: value - self.counts.get(op, 0.0)
            for op, value in counts.items()
            if value != self.counts.get(op, 0.0)
        }
        return total_change, count_change

    def wait_for(
        self, expected: Mapping[tuple[str, str], int], timeout: float = 20.0
    ) -> tuple[RequestCounts, dict[str, float]]:
        """Scrape until the requests change equals C{expected}; return the last change."""
        import time

        wanted = {key: float(value) for key, value in expected.items() if value}
        deadline = time.monotonic() + timeout
        while True:
            totals, counts = self.change()
            if totals == wanted or time.monotonic() > deadline:
                return totals, counts
            time.sleep(0.1)


def counts_per_operation(totals: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """Sum request counts over codes, per operation."""
    result: dict[str, float] = {}
    for (operation, _code), value in totals.items():
        result[operation] = result.get(operation, 0.0) + value
    return result


def promtool_check(promtool: str, text: str) -> tuple[int, str]:
    """Run C{promtool check metrics} on an exposition; return its exit code and output."""
    import subprocess

    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode("utf-8"),
        capture_output=True,
        timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")


class BotoCallLog:
    """
    Count every S3 call a boto3 client makes, by proxy operation name and HTTP status.

    botocore emits C{after-call} once per API call with the final HTTP response, also for
    error responses, so a retried call would show up as a mismatch with the proxy's counts.
    """

    def __init__(self, *clients: object) -> None:
        import threading
        from collections import Counter

        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        for client in clients:
            client.meta.events.register("after-call.s3", self._after_call)  # type: ignore[attr-defined]

    def _after_call(self, http_response: object, model: object, **kwargs: object) -> None:
        from botocore import xform_name

        from proxy.operations import OPERATIONS

        name = xform_name(model.name)  # type: ignore[attr-defined]
        operation = name if name in OPERATIONS else "other"
        status = str(http_response.status_code)  # type: ignore[attr-defined]
        with self._lock:
            self.calls[(operation, status)] += 1

    def add(self, operation: str, status: int, times: int = 1) -> None:
        """Count a request made without boto3 (presigned URLs, hand-built requests)."""
        with self._lock:
            self.calls[(operation, str(status))] += times


@contextmanager
def proxy_stack(tmp_path: Path, s3_server: Any, **proxy_options: Any) -> Iterator[ProxyProcess]:
    """
    Run a proxy in front of the SigV4-verifying front in front of moto.

    moto accepts any signature, so the front checks that the proxy signs backend requests
    correctly with the backend credential.
    """
    from tests.support.sigv4_front import start_front

    front = start_front(s3_server.endpoint, BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY, "us-east-1")
    try:
        proxy = ProxyProcess(tmp_path, front.endpoint, **proxy_options).start()
        try:
            yield proxy
        finally:
            proxy.stop()
    finally:
        front.stop()
