"""Run ``twistd s3proxy`` with the object cache on, and read its cache metrics.

``CacheProxy`` writes a configuration with a ``[cache]`` section, one client user and one
backend, and starts the proxy from the source tree. ``cache_samples`` reads the cache families
from ``/metrics``.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.support.servers import TwistdProcess, free_port, twistd_env

CLIENT_ACCESS_KEY = "cache-client"
CLIENT_SECRET_KEY = "cache-client-secret"
CHANNEL = "{s3proxy}:cache:invalidate"


class CacheProxy:
    """
    A ``twistd s3proxy`` process with the cache enabled, on free loopback ports.

    :param backend_endpoint: the backend URL, for example a relay in front of moto.
    :param redis_url: the metrics store, which also carries cache invalidations.
    """

    def __init__(
        self,
        directory: Path,
        backend_endpoint: str,
        redis_url: str | None,
        max_bytes: int = 8 * 1024 * 1024,
        max_object_bytes: int = 2 * 1024 * 1024,
        ttl: float = 300.0,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = directory / "twistd.log"
        config_path = directory / "proxy.toml"
        lines = [
            "[server]",
            f'listen = "tcp:{self.port}:interface=127.0.0.1"',
            'region = "us-east-1"',
            "[metrics]",
            f'listen = "tcp:{self.metrics_port}:interface=127.0.0.1"',
            "flush_interval = 0.2",
        ]
        if redis_url is not None:
            lines.append(f"redis_url = {json.dumps(redis_url)}")
        lines += [
            "[cache]",
            "enabled = true",
            f"max_bytes = {max_bytes}",
            f"max_object_bytes = {max_object_bytes}",
            f"ttl = {ttl}",
            "[[users]]",
            f'access_key = "{CLIENT_ACCESS_KEY}"',
            f'secret_key = "{CLIENT_SECRET_KEY}"',
            "[[backends]]",
            'id = "primary"',
            f"endpoint = {json.dumps(backend_endpoint)}",
            'access_key = "backend-access"',
            'secret_key = "backend-secret"',
        ]
        config_path.write_text("\n".join(lines) + "\n")
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile",
            "",
            "--logfile",
            str(self.log_path),
            "s3proxy",
            "--config",
            str(config_path),
        ]
        self.process = TwistdProcess(argv, twistd_env(), ready_url=self.metrics_url,
                                     log_path=self.log_path)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> CacheProxy:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def client(self, secret_key: str = CLIENT_SECRET_KEY, **config: Any) -> Any:
        """Return a boto3 S3 client for this proxy, without retries."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CLIENT_ACCESS_KEY,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, **config),
        )

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode("utf-8")


def cache_samples(text: str) -> dict[str, list[float]]:
    """Return every sample value of the ``s3proxy_cache_*`` families, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("s3proxy_cache_"):
                samples.setdefault(sample.name, []).append(sample.value)
    return samples


def counter(proxy: CacheProxy, name: str) -> float:
    """Return the fleet-wide value of a cache counter, 0 before its first increment."""
    return sum(cache_samples(proxy.scrape()).get(name, [0.0]))


def wait_until(
    condition: Callable[[], bool], timeout: float = 20.0, description: str = ""
) -> None:
    """Poll ``condition`` every 0.05 s; raise AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.05)


def wait_for_counters(proxy: CacheProxy, hits: float, misses: float) -> tuple[float, float]:
    """Scrape until the cache counters equal (hits, misses) or 20 s passed; return the last."""
    seen = (-1.0, -1.0)

    def reached() -> bool:
        nonlocal seen
        seen = (
            counter(proxy, "s3proxy_cache_hits_total"),
            counter(proxy, "s3proxy_cache_misses_total"),
        )
        return seen == (hits, misses)

    try:
        wait_until(reached, description=f"cache hits {hits} and misses {misses}")
    except AssertionError:
        pass
    return seen
