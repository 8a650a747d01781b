"""Tests for the options and service of twistd s3proxy-exporter."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.service import IServiceCollection
from twisted.logger import capturedLogs
from twisted.python import usage

from collector.exporter_tap import Options, makeService


def _parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "s3proxy.toml"
    path.write_text(text)
    return str(path)


def test_redis_url_option() -> None:
    """--redis-url is enough; the other options have defaults."""
    options = _parse("--redis-url", "redis://127.0.0.1:6379/0")
    assert options["namespace"] == "s3proxy"
    assert options["listen"] == "tcp:9091"
    assert options["gauge-ttl"] == 15.0


def test_config_metrics_table(tmp_path: Path) -> None:
    """--config reads redis_url, namespace and flush_interval from [metrics]."""
    path = _config(tmp_path, """
[server]
listen = "tcp:9000"

[metrics]
redis_url = "redis://127.0.0.1:6380/1"
namespace = "prod"
flush_interval = 10.0
""")
    options = _parse("--config", path)
    assert options["redis-url"] == "redis://127.0.0.1:6380/1"
    assert options["namespace"] == "prod"
    assert options["gauge-ttl"] == 30.0


def test_options_override_config(tmp_path: Path) -> None:
    """Command-line options override the config file."""
    path = _config(tmp_path, '[metrics]\nredis_url = "redis://a:1/0"\nnamespace = "x"\n')
    options = _parse("--config", path, "--redis-url", "redis://b:2/0", "--namespace", "y")
    assert options["redis-url"] == "redis://b:2/0"
    assert options["namespace"] == "y"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no Redis URL"),
        (("--redis-url", "http://user:s3cret@host/0"), "'http://user:***@host/0' is invalid"),
        (("--redis-url", "redis://h/0", "--gauge-ttl", "0"), "--gauge-ttl '0' is invalid"),
        (("--redis-url", "redis://h/0", "--scrape-timeout", "x"), "--scrape-timeout 'x'"),
        (("--config", "/nonexistent/s3proxy.toml"), "cannot read config file"),
    ],
    ids=["no-url", "bad-url", "bad-ttl", "bad-timeout", "missing-config"],
)
def test_invalid_options(args: tuple[str, ...], message: str) -> None:
    """Invalid options raise UsageError with the value and the fix."""
    with pytest.raises(usage.UsageError, match=message.replace("*", r"\*")) as caught:
        _parse(*args)
    assert "s3cret" not in str(caught.value)


def test_invalid_toml(tmp_path: Path) -> None:
    """A config file that is not TOML raises UsageError naming the file."""
    path = _config(tmp_path, "[metrics\n")
    with pytest.raises(usage.UsageError, match="not valid TOML"):
        _parse("--config", path)


def test_make_service() -> None:
    """makeService builds a service collection holding the HTTP listener, unstarted."""
    listen = "tcp:0:interface=127.0.0.1"
    options = _parse("--redis-url", "redis://127.0.0.1:1/0", "--listen", listen)
    service = makeService(options)
    assert len(list(IServiceCollection(service))) == 1
    assert not service.running


def test_make_service_hides_password() -> None:
    """The start-up log line shows the Redis URL without its password."""
    options = _parse("--redis-url", "redis://user:s3cret@127.0.0.1:1/0")
    with capturedLogs() as events:
        makeService(options)
    urls = [event["url"] for event in events if "url" in event]
    assert urls == ["redis://user:***@127.0.0.1:1/0"]


def test_no_proxy_import() -> None:
    """The exporter and the whole collector package load without importing proxy."""
    import subprocess
    import sys

    code = (
        "import sys, collector, collector.exporter_tap, collector.collector, "
        "collector.resource, collector.flusher, collector.store; "
        "print(sorted(m for m in sys.modules if m == 'proxy' or m.startswith('proxy.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_config_redis_url_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter reads metrics.redis_url_env from the environment."""
    monkeypatch.setenv("S3PROXY_TEST_REDIS_URL", "redis://:pa55word@127.0.0.1:6390/2")
    path = _config(tmp_path, '[metrics]\nredis_url_env = "S3PROXY_TEST_REDIS_URL"\n')
    options = _parse("--config", path)
    assert options["redis-url"] == "redis://:pa55word@127.0.0.1:6390/2"


def test_config_redis_url_env_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset redis_url_env variable stops the exporter with its name in the message."""
    monkeypatch.delenv("S3PROXY_TEST_REDIS_URL", raising=False)
    path = _config(tmp_path, '[metrics]\nredis_url_env = "S3PROXY_TEST_REDIS_URL"\n')
    with pytest.raises(usage.UsageError, match="S3PROXY_TEST_REDIS_URL"):
        _parse("--config", path)
