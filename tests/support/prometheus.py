"""A real Prometheus server for end-to-end tests of the exporter, the rules and the alerts.

:class:`PrometheusServer` writes a configuration that scrapes the given targets every second,
starts ``prometheus`` on a free loopback port with its storage in a temporary directory, and
queries it through the HTTP API. A missing ``prometheus`` binary fails the test.

Example::

    with PrometheusServer(tmp_path, ["127.0.0.1:9091"], rule_files=[rules]) as prometheus:
        samples = prometheus.wait_for("s3proxy_redis_up", lambda s: s and s[0].value == 1)
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.support.servers import START_TIMEOUT, free_port, log_tail, require_binary, terminate

__all__ = ["PrometheusError", "PrometheusServer", "Sample"]

# Seconds between two queries of wait_for().
POLL_INTERVAL = 0.2


class PrometheusError(RuntimeError):
    """Prometheus rejected a request or could not be reached."""


@dataclass(frozen=True)
class Sample:
    """One sample of an instant vector: its labels (``__name__`` included) and value."""

    labels: dict[str, str]
    value: float


class PrometheusServer:
    """A ``prometheus`` process that scrapes ``targets`` every second.

    :param tmp_path: directory for the configuration, the TSDB and the log; each server
        uses its own subdirectory.
    :param targets: ``host:port`` addresses scraped under one job.
    :param job: the job name; the rules in ``deploy/`` expect ``s3proxy``.
    :param rule_files: rule files loaded as they are; rules are evaluated every second.
    :param metrics_path: the HTTP path scraped on every target.
    :param port: the port of Prometheus' web listener on 127.0.0.1; default a free one.
    """

    def __init__(
        self,
        tmp_path: Path,
        targets: Sequence[str],
        job: str = "s3proxy",
        rule_files: Sequence[Path] = (),
        metrics_path: str = "/metrics",
        port: int | None = None,
    ) -> None:
        self.binary = require_binary("prometheus")
        self.port = port or free_port()
        self.dir = Path(tmp_path) / f"prometheus-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "prometheus.yml"
        self.log_path = self.dir / "prometheus.log"
        self.targets = list(targets)
        self.job = job
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.metrics_path = metrics_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the web listener, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "prometheus is not running"
        return self.process.pid

    def config(self) -> dict[str, Any]:
        """Return the configuration that :meth:`start` writes."""
        return {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
        ]

    def start(self) -> PrometheusServer:
        """Write the configuration, start Prometheus and wait until it reports ready.

        :raises RuntimeError: Prometheus exited or was not ready within the start timeout;
            the message ends with its log.
        """
        self.config_path.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_ready()
        return self

    def stop(self) -> None:
        """Stop with SIGTERM and wait for the process to exit."""
        if self.process is not None:
            terminate(self.process)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """Return Prometheus' log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` member.

        :raises PrometheusError: the request failed or the API returned an error.
        """
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise PrometheusError(f"GET {url} failed with HTTP {err.code}: {detail}") from err
        except OSError as err:
            raise PrometheusError(f"GET {url} failed: {err}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url} returned an error: {body}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate ``expr`` now and return its samples.

        :raises PrometheusError: the expression is invalid or returns no instant vector.
        """
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(
                f"query {expr!r} returned a {data['resultType']}, not an instant vector; "
                "wrap a scalar in vector()"
            )
        return [
            Sample(labels=item["metric"], value=float(item["value"][1]))
            for item in data["result"]
        ]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], bool],
        timeout: float = START_TIMEOUT,
    ) -> list[Sample]:
        """Query ``expr`` until ``predicate`` accepts the samples, and return them.

        :param timeout: seconds to wait; a readiness bound, not a speed requirement.
        :raises AssertionError: the predicate still rejected the samples after ``timeout``
            seconds; the message shows the last samples.
        """
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"query {expr!r} did not reach the expected state within {timeout} s; "
                    f"last samples: {samples}"
                )
            time.sleep(POLL_INTERVAL)

    def alerts(self) -> list[dict[str, Any]]:
        """Return the pending and firing alerts, as ``/api/v1/alerts`` lists them."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rule_names(self) -> set[str]:
        """Return the names of every loaded recording rule and alert."""
        groups = self.api("rules")["groups"]
        return {rule["name"] for group in groups for rule in group["rules"]}

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.process.returncode} before it was ready"
                    f"{log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"prometheus on port {self.port} was not ready after {START_TIMEOUT} s"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL)
