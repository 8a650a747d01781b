"""``twistd s3proxy-exporter`` against a real redis-server, checked with promtool."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.support.collector import assert_primary
from tests.support.collector_writer import expected_totals
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    TwistdProcess,
    free_port,
    twistd_argv,
    twistd_env,
)

pytestmark = pytest.mark.integration

NAMESPACE = "itest"
COUNT = 2000
TEXT_FORMATS = ["", "text/plain; version=0.0.4", "text/plain; version=1.0.0"]
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
def exporter(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """A running exporter for ``redis_server``; yields its base URL."""
    assert_primary(redis_server.client(), redis_server.port)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = TwistdProcess(
        twistd_argv(
            "s3proxy-exporter",
            "--redis-url", redis_server.url,
            "--namespace", NAMESPACE,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            log_path=tmp_path / "exporter.log",
        ),
        twistd_env(),
        ready_url=base + "/healthz",
        log_path=tmp_path / "exporter.log",
    ).start()
    try:
        yield base
    finally:
        process.stop()


def _run_writers(url: str, number: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "tests.support.collector_writer", url, NAMESPACE, str(COUNT)]
    processes = [
        subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(number)
    ]
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert out.split() == ["recorded", "stopped", "0"]


def _get(url: str, accept: str = "", encoding: str = "") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if accept:
        request.add_header("Accept", accept)
    if encoding:
        request.add_header("Accept-Encoding", encoding)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode("utf-8"))
        for sample in family.samples
    }


def test_exporter_exact_values(redis_server: RedisServer, exporter: str) -> None:
    """Two writers' counts show up exactly in the exporter's /metrics."""
    _run_writers(redis_server.url, 2)
    status, _, body = _get(exporter + "/metrics")
    samples = _samples(body)

    assert status == 200
    assert samples[("s3proxy_redis_up", ())] == 1
    for (operation, code), total in expected_totals(COUNT, 2)["requests"].items():
        key = ("s3proxy_requests_total", (("code", code), ("operation", operation)))
        assert samples[key] == total, key


def test_exporter_gauges_gone_after_stop(redis_server: RedisServer, exporter: str) -> None:
    """Writers that stopped cleanly leave no gauge series and no live proxies."""
    _run_writers(redis_server.url, 2)
    samples = _samples(_get(exporter + "/metrics")[2])

    assert samples[("s3proxy_proxies", ())] == 0
    assert not [key for key in samples if key[0] == "s3proxy_backend_state"]


def test_exporter_redis_down(redis_server: RedisServer, exporter: str) -> None:
    """With Redis stopped, /metrics still returns 200 with s3proxy_redis_up 0."""
    _run_writers(redis_server.url, 1)
    redis_server.stop()
    status, _, body = _get(exporter + "/metrics")
    samples = _samples(body)

    assert status == 200
    assert samples[("s3proxy_redis_up", ())] == 0
    assert samples[("s3proxy_scrape_errors_total", (("cause", "redis"),))] >= 1
    assert not [key for key in samples if key[0].startswith("s3proxy_requests")]


def test_exporter_healthz(exporter: str) -> None:
    """/healthz returns 200 ok."""
    status, _, body = _get(exporter + "/healthz")
    assert status == 200
    assert body == b"ok\n"


@pytest.mark.parametrize("accept", TEXT_FORMATS, ids=["default", "0.0.4", "1.0.0"])
def test_promtool_accepts_text(redis_server: RedisServer, exporter: str, promtool: str,
                               accept: str) -> None:
    """promtool check metrics accepts the text formats without any lint finding."""
    _run_writers(redis_server.url, 1)
    _, headers, body = _get(exporter + "/metrics", accept, "gzip")
    assert headers.get("Content-Encoding") == "gzip"

    result = subprocess.run(
        [promtool, "check", "metrics"], input=gzip.decompress(body), capture_output=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_openmetrics(redis_server: RedisServer, exporter: str,
                                     promtool: str) -> None:
    """OpenMetrics parses strictly, and promtool finds nothing but counter HELP naming.

    promtool 2.42 reads only the text format; on OpenMetrics it reports each counter's
    ``_total`` sample as lacking help, because OpenMetrics names the family without
    ``_total``. Any other finding, or a parse error (exit code 1), fails.
    """
    _run_writers(redis_server.url, 1)
    _, headers, body = _get(exporter + "/metrics", OPENMETRICS)
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    families = list(parse_openmetrics(body.decode("utf-8")))
    assert "s3proxy_requests" in {family.name for family in families}

    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    findings = (result.stdout + result.stderr).decode().splitlines()
    assert result.returncode in (0, 3), findings
    unexpected = [
        line for line in findings
        if not (line.split()[0].endswith("_total") and line.endswith("no help text"))
    ]
    assert unexpected == []


def test_exporter_rejects_bad_url() -> None:
    """An invalid Redis URL stops twistd with a message that hides the password."""
    result = subprocess.run(
        twistd_argv("s3proxy-exporter", "--redis-url", "http://user:s3cret@host/0"),
        env=twistd_env(), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Redis URL 'http://user:***@host/0' is invalid" in output
    assert "s3cret" not in output
