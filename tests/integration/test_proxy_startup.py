"""Starting and stopping twistd s3proxy as a process."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.proxy_process import ProxyProcess
from tests.support.servers import free_port, twistd_argv, twistd_env

pytestmark = pytest.mark.integration


def test_invalid_config_exits_before_listening(tmp_path: Path) -> None:
    """An invalid file makes twistd exit non-zero, naming the key, without listening."""
    port = free_port()
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        '[[users]]\naccess_key = "a"\nsecret_key = "b"\n'
        '[[backends]]\nid = "one"\nendpoint = "http://127.0.0.1:1"\naccess_key = "a"\n'
        'secret_key_env = "S3PROXY_TEST_MISSING_SECRET"\n'
    )
    result = subprocess.run(
        twistd_argv("s3proxy", "--config", str(config), log_path=tmp_path / "twistd.log"),
        env=twistd_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "backends[0].secret_key_env" in result.stdout + result.stderr
    assert "S3PROXY_TEST_MISSING_SECRET" in result.stdout + result.stderr


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM shuts the proxy down through the reactor, with no traceback in the log."""
    proxy = ProxyProcess(tmp_path, "http://127.0.0.1:1").start()
    assert "# TYPE s3proxy_requests_total counter" in proxy.scrape()
    # twistd ends a clean shutdown by re-raising the signal that stopped it.
    assert proxy.stop() == -signal.SIGTERM
    assert "Main loop terminated." in proxy.log_text()
    assert "Traceback" not in proxy.log_text()
