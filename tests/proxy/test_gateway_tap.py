"""Tests for proxy.tap: option parsing, config errors and the service tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage

from proxy.tap import Options, makeService

CONFIG = """
[server]
listen = "tcp:0:interface=127.0.0.1"
[metrics]
listen = "tcp:0:interface=127.0.0.1"
[[users]]
access_key = "client"
secret_key = "client-secret"
[[backends]]
id = "primary"
endpoint = "http://127.0.0.1:9100"
access_key = "a"
secret_key = "b"
"""


def write_config(tmp_path: Path, text: str = CONFIG) -> str:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return str(path)


def test_options_require_config() -> None:
    """Without --config the options raise UsageError."""
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions([])
    assert "--config" in str(info.value)


def test_options_name_invalid_key(tmp_path: Path) -> None:
    """An invalid file raises UsageError naming the key, so twistd exits before listening."""
    path = write_config(tmp_path, CONFIG.replace("http://127.0.0.1:9100", "ftp://x"))
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--config", path])
    assert "backends[0].endpoint" in str(info.value)


def test_options_override(tmp_path: Path) -> None:
    """--listen, --metrics-listen and --redis-url replace the file's values."""
    options = Options()
    options.parseOptions(
        [
            "--config",
            write_config(tmp_path),
            "--listen",
            "tcp:9999:interface=127.0.0.1",
            "--metrics-listen",
            "",
            "--redis-url",
            "redis://127.0.0.1:6390/2",
        ]
    )
    assert options.config.server.listen == "tcp:9999:interface=127.0.0.1"
    assert options.config.metrics.listen == ""
    assert options.config.metrics.redis_url == "redis://127.0.0.1:6390/2"


def listeners(tmp_path: Path, *extra: str) -> list[str]:
    options = Options()
    options.parseOptions(["--config", write_config(tmp_path), *extra])
    root = makeService(options)
    return [
        type(service.factory).__name__  # type: ignore[attr-defined]
        for service in root
        if isinstance(service, StreamServerEndpointService)
    ]


def test_service_has_both_listeners(tmp_path: Path) -> None:
    """The service tree listens for S3 and for /metrics."""
    assert sorted(listeners(tmp_path)) == ["GatewayFactory", "Site"]


def test_metrics_listener_off(tmp_path: Path) -> None:
    """An empty metrics listen description leaves out the /metrics listener."""
    assert listeners(tmp_path, "--metrics-listen", "") == ["GatewayFactory"]


def test_plugin_points_at_tap() -> None:
    """The twistd plugin is a ServiceMaker for proxy.tap."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "twisted_plugins" / "s3proxy.py"
    spec = importlib.util.spec_from_file_location("s3proxy_plugin", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.s3proxy.tapname == "s3proxy"
    assert module.s3proxy.module == "proxy.tap"
