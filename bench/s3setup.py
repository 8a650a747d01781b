"""The S3-like setup of the proxy benchmarks: object files, nginx servers, proxies, URLs.

nginx serves object files as a static S3-like backend that ignores the signature the proxy
adds: ``GET /bench/<key>`` returns the file, and ``PUT /bench/<key>`` stores the body as
that file (WebDAV ``PUT``). nginx responds 201 or 204 once the whole body is in, as an S3
server responds only after the last byte. The proxy is configured with a real Redis for
its metrics, no ``/metrics`` listener and the cache off, so every GET reaches the backend.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from botocore.config import Config as BotocoreConfig
from botocore.session import Session

from bench.processes import Process, Processes, free_port

__all__ = [
    "BUCKET",
    "CLIENT_ACCESS_KEY",
    "ProxySetup",
    "check_url",
    "make_objects",
    "nginx_backend_block",
    "nginx_front_block",
    "presign",
]

BUCKET = "bench"
CLIENT_ACCESS_KEY = "bench-client"
CLIENT_SECRET_KEY = "bench-client-secret"
BACKEND_ACCESS_KEY = "bench-backend"
BACKEND_SECRET_KEY = "bench-backend-secret"
REGION = "us-east-1"


def make_objects(directory: Path, sizes: dict[str, int]) -> Path:
    """Write one object file per key into ``<directory>/bench``; return ``directory``.

    Files of 64 MiB or more are sparse (``truncate``): they read back as zeros without
    touching the disk, and take no memory in a tmpfs such as ``/dev/shm``.
    """
    bucket = directory / BUCKET
    bucket.mkdir(parents=True, exist_ok=True)
    for key, size in sizes.items():
        path = bucket / key
        if size >= 64 * 1024 * 1024:
            with path.open("wb") as file:
                file.truncate(size)
        else:
            path.write_bytes(os.urandom(size))
    return directory


def nginx_backend_block(port: int, root: Path) -> str:
    """Return an nginx server block: GETs of files below ``root``, PUTs stored there.

    Request bodies are spooled next to ``root``, so that storing one is a rename within
    the same file system.
    """
    return f"""
    server {{
        listen 127.0.0.1:{port};
        root {root};
        client_max_body_size 0;
        client_body_temp_path {root.parent / (root.name + "-body")};
        location = /health {{ return 200 "ok\\n"; }}
        location / {{
            dav_methods PUT;
            create_full_put_path on;
        }}
    }}
"""


def nginx_front_block(port: int, upstreams: list[int], name: str) -> str:
    """Return an nginx server block that proxies to ``upstreams`` round robin.

    Bodies stream both ways (no buffering), over kept-alive upstream connections, and the
    client's Host header is passed on, so a URL presigned for this front is valid behind it.
    """
    servers = "\n".join(f"        server 127.0.0.1:{upstream};" for upstream in upstreams)
    return f"""
    upstream {name} {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
"""


def presign(endpoint: str, method: str, key: str, expires: int = 3600) -> str:
    """Return a SigV4 presigned URL of ``<endpoint>/bench/<key>`` for the bench client.

    :param method: ``get_object`` or ``put_object``.
    """
    session = Session()
    client = session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=CLIENT_ACCESS_KEY,
        aws_secret_access_key=CLIENT_SECRET_KEY,
        config=BotocoreConfig(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    url: str = client.generate_presigned_url(
        method, Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=expires
    )
    return url


def check_url(url: str, method: str = "GET", body: bytes | None = None,
              expected_length: int | None = None) -> None:
    """Send one request and raise RuntimeError unless the status is 2xx and the length matches.

    Load runs replay the same URL, so one checked request proves that the signature is
    accepted and the load measures successful requests, not rejections.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body)
        response = connection.getresponse()
        length = 0
        while chunk := response.read(1024 * 1024):
            length += len(chunk)
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise RuntimeError(f"{method} {parts.path} on port {parts.port} returned {response.status}")
    if expected_length is not None and length != expected_length:
        raise RuntimeError(
            f"{method} {parts.path} on port {parts.port} returned {length} bytes, "
            f"expected {expected_length}"
        )


class ProxySetup:
    """Start proxy processes in front of one backend, each with its own config file.

    :param processes: starts and stops the proxy processes.
    :param backend_port: the nginx backend's port.
    :param redis_url: the metrics store of every proxy.
    """

    def __init__(self, processes: Processes, backend_port: int, redis_url: str) -> None:
        self.processes = processes
        self.backend_port = backend_port
        self.redis_url = redis_url

    def start(self, name: str, metrics: bool = True) -> Process:
        """Start one proxy on a free port; ``metrics=False`` uses the null metrics."""
        port = free_port()
        directory = self.processes.directory
        config = directory / f"{name}.toml"
        config.write_text(self._config(port))
        kind = "proxy" if metrics else "proxy-metrics-off"
        return self.processes.python(
            name,
            ["-m", "bench._serve", kind, str(directory / f"{name}-events.log"),
             "--config", str(config)],
            port=port,
        )

    def _config(self, port: int) -> str:
        # TOML strings have the syntax of JSON strings.
        def quoted(text: str) -> str:
            return json.dumps(text)

        return f"""
[server]
listen = {quoted(f"tcp:{port}:interface=127.0.0.1")}
region = {quoted(REGION)}

[metrics]
listen = ""
redis_url = {quoted(self.redis_url)}
namespace = "bench"
flush_interval = 1.0

[[users]]
access_key = {quoted(CLIENT_ACCESS_KEY)}
secret_key = {quoted(CLIENT_SECRET_KEY)}

[[backends]]
id = "nginx"
endpoint = {quoted(f"http://127.0.0.1:{self.backend_port}")}
region = {quoted(REGION)}
access_key = {quoted(BACKEND_ACCESS_KEY)}
secret_key = {quoted(BACKEND_SECRET_KEY)}
health_path = "/health"
"""
