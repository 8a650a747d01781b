"""Memory of twistd s3proxy stays flat while large bodies stream through it both ways."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.sigv4 import sign_request
from tests.support.proxy_process import CLIENT_ACCESS_KEY, CLIENT_SECRET_KEY, ProxyProcess
from tests.support.servers import REPO_ROOT, free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 512 * 1024 * 1024
# Allowed growth of the proxy's peak resident memory while SIZE bytes pass each way. The
# buffers are bounded by a few socket reads and the 256 KiB high-water mark, so a growth of
# a tenth of SIZE means that bodies are held in memory.
MAX_GROWTH = 48 * 1024 * 1024


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy in front of the dropping backend."""
    port = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "tests.support.proxy_stream_backend", str(port), str(SIZE)],
        cwd=REPO_ROOT,
    )
    try:
        wait_for_port(port, process=backend)
        running = ProxyProcess(tmp_path, f"http://127.0.0.1:{port}").start()
        try:
            yield running
        finally:
            running.stop()
    finally:
        backend.terminate()
        backend.wait(timeout=15)


def peak_rss(pid: int) -> int:
    """Return the peak resident set size of a process in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("VmHWM missing from /proc status")


def signed_connection(proxy: ProxyProcess, method: str) -> http.client.HTTPConnection:
    """Open a connection and send the signed head of a request for /bucket/big."""
    url = f"{proxy.endpoint}/bucket/big"
    headers = sign_request(
        method,
        url,
        {"host": f"127.0.0.1:{proxy.port}"},
        "UNSIGNED-PAYLOAD",
        CLIENT_ACCESS_KEY,
        CLIENT_SECRET_KEY,
        "us-east-1",
        time.time(),
    )
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
    connection.putrequest(method, "/bucket/big", skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    if method == "PUT":
        connection.putheader("Content-Length", str(SIZE))
    connection.endheaders()
    return connection


def test_large_bodies_stream(proxy: ProxyProcess) -> None:
    """512 MiB up and 512 MiB down, with a slow reader, leave peak memory nearly unchanged."""
    before = peak_rss(proxy.process.pid)

    upload = signed_connection(proxy, "PUT")
    block = b"u" * (1024 * 1024)
    for _ in range(SIZE // len(block)):
        upload.send(block)
    response = upload.getresponse()
    assert response.status == 200
    response.read()
    upload.close()

    download = signed_connection(proxy, "GET")
    response = download.getresponse()
    assert response.status == 200
    received = 0
    while chunk := response.read(1024 * 1024):
        received += len(chunk)
        if received == 64 * 1024 * 1024:
            time.sleep(1)  # a reader that stops for a while; the proxy must pause the backend
    download.close()
    assert received == SIZE

    growth = peak_rss(proxy.process.pid) - before
    assert growth < MAX_GROWTH, f"peak RSS grew by {growth} bytes"
