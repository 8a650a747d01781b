"""twistd s3proxy in front of moto, with real-client requests that are easy to get wrong.

- A small upload with C{Transfer-Encoding: chunked} and no C{Expect} header (python-requests
  with a generator body) arrives completely before the backend connection is ready.
- A client that closes the connection in the middle of a download.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from proxy.sigv4 import sign_request
from tests.support.proxy_process import (
    CLIENT_ACCESS_KEY,
    CLIENT_SECRET_KEY,
    MetricsWatch,
    ProxyProcess,
)
from tests.support.servers import MotoServer

pytestmark = pytest.mark.integration

REGION = "us-east-1"
BUCKET = "breaker"
BIG_KEY = "big"
BIG_SIZE = 16 * 1024 * 1024


def direct_client(s3_server: MotoServer) -> Any:
    """A boto3 client that talks to moto without the proxy."""
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=REGION,
    )


@pytest.fixture(scope="module")
def proxy(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy directly in front of moto, with a bucket and one 16 MiB object."""
    moto = direct_client(s3_server)
    moto.create_bucket(Bucket=BUCKET)
    moto.put_object(Bucket=BUCKET, Key=BIG_KEY, Body=b"b" * BIG_SIZE)
    running = ProxyProcess(tmp_path_factory.mktemp("breaker"), s3_server.endpoint).start()
    try:
        yield running
    finally:
        running.stop()


def signed_head(proxy: ProxyProcess, method: str, path: str, extra: dict[str, str]) -> bytes:
    """Return the request line and headers of a request signed with UNSIGNED-PAYLOAD."""
    headers = sign_request(
        method,
        f"{proxy.endpoint}{path}",
        {"host": f"127.0.0.1:{proxy.port}"},
        "UNSIGNED-PAYLOAD",
        CLIENT_ACCESS_KEY,
        CLIENT_SECRET_KEY,
        REGION,
        time.time(),
    )
    headers.update(extra)
    head = f"{method} {path} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n"


def read_response(connection: socket.socket) -> bytes:
    """Read until the server closes the connection."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def chunked_put(proxy: ProxyProcess, key: str, data: bytes) -> bytes:
    """Send head and chunked body in one write, as a client without Expect does."""
    head = signed_head(
        proxy,
        "PUT",
        f"/{BUCKET}/{key}",
        {"Transfer-Encoding": "chunked", "Connection": "close"},
    )
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as connection:
        connection.sendall(head + body)
        return read_response(connection)


def backend_status(proxy: ProxyProcess) -> dict[str, Any]:
    """Return the one backend's entry of the proxy's /status document."""
    url = f"http://127.0.0.1:{proxy.metrics_port}/status"
    with urllib.request.urlopen(url, timeout=10) as response:
        document = json.load(response)
    backends: list[dict[str, Any]] = document["backends"]
    return backends[0]


def test_small_chunked_upload_stored(proxy: ProxyProcess, s3_server: MotoServer) -> None:
    """Small chunked uploads sent in one write are stored, and the backend stays UP."""
    watch = MetricsWatch(proxy)

    for index in range(4):
        response = chunked_put(proxy, f"chunked-{index}", b"hello %d" % index)
        assert response.startswith(b"HTTP/1.1 200 "), response[:300]

    stored = direct_client(s3_server).get_object(Bucket=BUCKET, Key="chunked-3")
    assert stored["Body"].read() == b"hello 3"
    assert backend_status(proxy)["state"] == "UP"
    totals, _ = watch.wait_for({("put_object", "200"): 4})
    assert totals == {("put_object", "200"): 4.0}


def test_abort_mid_download_clean(proxy: ProxyProcess) -> None:
    """A client leaving mid-download is counted 499, logs no traceback, leaves none in flight."""
    watch = MetricsWatch(proxy)
    head = signed_head(proxy, "GET", f"/{BUCKET}/{BIG_KEY}", {})

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as connection:
        connection.sendall(head)
        received = 0
        while received < 1024 * 1024:
            received += len(connection.recv(65536))

    totals, _ = watch.wait_for({("get_object", "499"): 1})
    assert totals == {("get_object", "499"): 1.0}
    deadline = time.monotonic() + 20
    while backend_status(proxy)["in_flight"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend_status(proxy)["in_flight"] == 0
    assert "Traceback" not in proxy.log_text()
