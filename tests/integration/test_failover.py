"""Failover end to end: twistd s3proxy in front of two relays to one S3 server, under boto3 load.

The relays lead to a SigV4-verifying front before moto, so a request or health check that the
proxy signs wrongly is rejected there. Each relay is one backend. Stopping a relay makes its
backend refuse connections, as a crashed server would, and starting it again brings the
backend back on the same address.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.relay import Relay
from tests.support.servers import (
    MotoServer,
    TwistdProcess,
    free_port,
    twistd_argv,
    twistd_env,
)
from tests.support.sigv4_front import SigV4Front, start_front

pytestmark = pytest.mark.integration

CLIENT_KEY = "failover-client"
CLIENT_SECRET = "failover-client-secret"
BACKEND_KEY = "failover-backend"
BACKEND_SECRET = "failover-backend-secret"

# Health settings of the tests, in seconds. A short interval keeps the tests short; the
# deadlines below add generous slack for a loaded 2-core CI machine.
INTERVAL = 0.5
TIMEOUT = 1.0
FAILURES_TO_DOWN = 2
SLACK = 10.0


@dataclass
class Proxy:
    """A running proxy, its relays and the helpers tests use on them."""

    process: TwistdProcess
    port: int
    metrics_port: int
    relays: dict[str, Relay]
    front: SigV4Front

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, read_timeout: float = 30.0) -> object:
        """Return a boto3 S3 client without client-side retries, so the proxy's show."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CLIENT_KEY,
            aws_secret_access_key=CLIENT_SECRET,
            region_name="us-east-1",
            config=botocore.config.Config(
                # total_max_attempts counts the first attempt; botocore's max_attempts does not.
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=5,
                read_timeout=read_timeout,
                s3={"addressing_style": "path"},
            ),
        )

    def backends(self) -> list[dict[str, object]]:
        """Return the backend entries of /status."""
        url = f"http://127.0.0.1:{self.metrics_port}/status"
        with urllib.request.urlopen(url, timeout=10) as response:
            return list(json.load(response)["backends"])

    def status(self) -> dict[str, str]:
        """Return the state of every backend from /status."""
        return {str(backend["id"]): str(backend["state"]) for backend in self.backends()}

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Return every sample of /metrics keyed by name and sorted labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8")
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def gauge(self) -> dict[str, float]:
        """Return s3proxy_backend_state per backend id from one scrape."""
        return {
            dict(labels)["backend_id"]: value
            for (name, labels), value in self.scrape().items()
            if name == "s3proxy_backend_state"
        }

    def wait_for(self, backend_id: str, state: str, deadline: float) -> float:
        """Poll /status until ``backend_id`` is in ``state``; return the seconds it took."""
        start = time.monotonic()
        while True:
            if self.status().get(backend_id) == state:
                return time.monotonic() - start
            if time.monotonic() - start > deadline:
                raise AssertionError(
                    f"backend {backend_id!r} is {self.status().get(backend_id)!r}, not "
                    f"{state!r}, {deadline} s later{self.log_tail()}"
                )
            time.sleep(0.02)

    def log_tail(self) -> str:
        return "\nproxy log:\n" + "\n".join(self.process.log_text().splitlines()[-40:])


def write_config(path: Path, port: int, metrics_port: int, relays: dict[str, Relay],
                 routing: str, priorities: dict[str, int], cooldown: float) -> None:
    backends = "".join(
        f"""
[[backends]]
id = "{backend_id}"
endpoint = "{relay.endpoint}"
region = "us-east-1"
access_key = "{BACKEND_KEY}"
secret_key = "{BACKEND_SECRET}"
priority = {priorities[backend_id]}
"""
        for backend_id, relay in relays.items()
    )
    path.write_text(f"""
[server]
listen = "tcp:{port}:interface=127.0.0.1"
region = "us-east-1"
routing = "{routing}"

[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"
flush_interval = 0.05

[[users]]
access_key = "{CLIENT_KEY}"
secret_key = "{CLIENT_SECRET}"
{backends}
[health]
interval = {INTERVAL}
timeout = {TIMEOUT}
failures_to_down = {FAILURES_TO_DOWN}
successes_to_up = 3
cooldown = {cooldown}
probe_requests = 1
jitter = 0.0
retry_budget = 0.5
""")


@pytest.fixture
def start_proxy(s3_server: MotoServer, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Return a function that starts the proxy with two relays to the front of the S3 server."""
    started: list[Proxy] = []

    def start(routing: str = "failover", priorities: dict[str, int] | None = None,
              cooldown: float = 1.0) -> Proxy:
        front = start_front(s3_server.endpoint, BACKEND_KEY, BACKEND_SECRET)
        relays = {
            "primary": Relay(front.port).start(),
            "secondary": Relay(front.port).start(),
        }
        port, metrics_port = free_port(), free_port()
        config = tmp_path / "proxy.toml"
        write_config(config, port, metrics_port, relays, routing,
                     priorities or {"primary": 0, "secondary": 1}, cooldown)
        log_path = tmp_path / "proxy.log"
        process = TwistdProcess(
            twistd_argv("s3proxy", "--config", str(config), log_path=log_path),
            twistd_env(),
            ready_url=f"http://127.0.0.1:{metrics_port}/status",
            log_path=log_path,
        )
        proxy = Proxy(process, port, metrics_port, relays, front)
        started.append(proxy)
        process.start()
        return proxy

    yield start
    for proxy in started:
        proxy.process.stop()
        for relay in proxy.relays.values():
            relay.close()
        proxy.front.stop()


class Load:
    """boto3 requests in a loop on a thread: GET, HEAD, ListObjectsV2 and small PUTs."""

    def __init__(self, proxy: Proxy, bucket: str) -> None:
        self.client = proxy.client()
        self.bucket = bucket
        self.errors: list[str] = []
        self.requests = 0
        self._stop = threading.Event()
        self._turn = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the load between two requests while the block runs."""
        with self._turn:
            yield

    def _run(self) -> None:
        client, bucket = self.client, self.bucket
        operations = [
            ("get_object", lambda: client.get_object(Bucket=bucket, Key="steady")["Body"].read()),
            ("head_object", lambda: client.head_object(Bucket=self.bucket, Key="steady")),
            ("list_objects_v2", lambda: client.list_objects_v2(Bucket=self.bucket, MaxKeys=5)),
            ("put_object", lambda: client.put_object(
                Bucket=self.bucket, Key=f"put-{self.requests}", Body=b"x" * 1024)),
        ]
        while not self._stop.is_set():
            name, call = operations[self.requests % len(operations)]
            with self._turn:
                try:
                    call()
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                    self.errors.append(f"{name}: {err}")
                self.requests += 1
            time.sleep(0.001)  # Lets a thread waiting in paused() take the lock.


class GaugeRecorder:
    """Scrapes the backend state gauge on a thread and keeps each change per backend."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.steps: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GaugeRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                values = self.proxy.gauge()
            except OSError:
                continue
            for backend_id, value in values.items():
                steps = self.steps.setdefault(backend_id, [])
                if not steps or steps[-1] != value:
                    steps.append(value)
            time.sleep(0.02)


def new_bucket(client: object, name: str) -> str:
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    return bucket


def test_relay_stop_refuses(s3_server: MotoServer) -> None:
    """A stopped relay refuses connections, and a started one relays again."""
    relay = Relay(s3_server.port).start()
    try:
        relay.stop()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(relay.endpoint + "/", timeout=5)
        relay.start()
        with urllib.request.urlopen(relay.endpoint + "/", timeout=5) as response:
            assert response.status == 200
    finally:
        relay.close()


def test_failover_under_load(start_proxy: Callable[..., Proxy]) -> None:
    """Losing the preferred backend under load costs boto3 no request, and it comes back."""
    proxy = start_proxy()
    client = proxy.client()
    bucket = new_bucket(client, "failover")
    client.put_object(Bucket=bucket, Key="steady", Body=b"steady body")  # type: ignore[attr-defined]
    primary = proxy.relays["primary"]

    with GaugeRecorder(proxy) as gauge, Load(proxy, bucket) as load:
        time.sleep(1.0)
        # The relay stops between two requests of the load. A response that is cut off after
        # its headers reached the client cannot be retried by any proxy, so a stop in the
        # middle of one would test luck, not failover. The idle pooled connections of the
        # proxy to the relay are still reset, and every later request is refused.
        with load.paused():
            primary.stop()
        took = proxy.wait_for("primary", "DOWN", INTERVAL * FAILURES_TO_DOWN + TIMEOUT + SLACK)
        time.sleep(2.0)  # Load on the secondary alone, through a few cooldowns.
        primary.start()
        proxy.wait_for("primary", "UP", SLACK + 5.0)
        time.sleep(0.5)

    assert load.errors == []
    assert load.requests > 20
    assert proxy.front.stats.rejected == 0
    assert took < INTERVAL * FAILURES_TO_DOWN + TIMEOUT + SLACK
    assert gauge.steps["primary"][:3] == [1.0, 0.0, 0.5]
    assert gauge.steps["primary"][-2:] == [0.5, 1.0]
    assert gauge.steps["secondary"] == [1.0]

    # Under failover, the recovered primary gets the traffic again.
    before = len(primary.requests_seen("GET", f"/{bucket}/steady"))
    for _ in range(5):
        client.get_object(Bucket=bucket, Key="steady")["Body"].read()  # type: ignore[attr-defined]
    assert len(primary.requests_seen("GET", f"/{bucket}/steady")) == before + 5

    # Every attempt that started also ended, retried ones included.
    assert [backend["in_flight"] for backend in proxy.backends()] == [0, 0]
    assert proxy.backends()[0]["last_error"] is not None


def test_multipart_sticks_round_robin(start_proxy: Callable[..., Proxy]) -> None:
    """Under round robin every request of a multipart upload goes to one backend."""
    proxy = start_proxy(routing="round_robin", priorities={"primary": 0, "secondary": 0})
    client = proxy.client()
    bucket = new_bucket(client, "multipart")
    part_size = 5 * 1024 * 1024

    upload = client.create_multipart_upload(Bucket=bucket, Key="big")  # type: ignore[attr-defined]
    upload_id = upload["UploadId"]
    parts = []
    for number, size in enumerate([part_size, part_size, 1024], start=1):
        answer = client.upload_part(  # type: ignore[attr-defined]
            Bucket=bucket, Key="big", UploadId=upload_id, PartNumber=number,
            Body=bytes([number]) * size,
        )
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    listed = client.list_parts(Bucket=bucket, Key="big", UploadId=upload_id)  # type: ignore[attr-defined]
    client.complete_multipart_upload(  # type: ignore[attr-defined]
        Bucket=bucket, Key="big", UploadId=upload_id, MultipartUpload={"Parts": parts})

    owner, _, _ = upload_id.partition("~")
    other = "secondary" if owner == "primary" else "primary"
    assert owner in proxy.relays
    assert listed["UploadId"] == upload_id
    assert len(proxy.relays[owner].requests_seen("POST", "?uploads")) == 1
    assert len(proxy.relays[owner].requests_seen(contains="uploadId=")) == 5
    assert proxy.relays[other].requests_seen(contains="uploadId=") == []
    head = client.head_object(Bucket=bucket, Key="big")  # type: ignore[attr-defined]
    assert head["ContentLength"] == 2 * part_size + 1024


def test_listing_pages_round_robin(start_proxy: Callable[..., Proxy]) -> None:
    """Under round robin a paginated ListObjectsV2 returns every key once."""
    proxy = start_proxy(routing="round_robin", priorities={"primary": 0, "secondary": 0})
    client = proxy.client()
    bucket = new_bucket(client, "pages")
    keys = [f"key-{index}" for index in range(7)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")  # type: ignore[attr-defined]

    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    pages = paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
    listed = [item["Key"] for page in pages for item in page.get("Contents", [])]
    assert listed == keys


def test_unknown_upload_backend(start_proxy: Callable[..., Proxy]) -> None:
    """An upload ID naming no configured backend gets NoSuchUpload."""
    proxy = start_proxy()
    client = proxy.client()
    bucket = new_bucket(client, "unknown")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.list_parts(Bucket=bucket, Key="k", UploadId="elsewhere~abc")  # type: ignore[attr-defined]
    assert caught.value.response["Error"]["Code"] == "NoSuchUpload"


def test_all_down_503(start_proxy: Callable[..., Proxy]) -> None:
    """With every backend DOWN a request gets 503 ServiceUnavailable at once, and is counted."""
    proxy = start_proxy(cooldown=300.0)
    bucket = new_bucket(proxy.client(), "alldown")
    # A client that gives up after the health check timeout: the 503 must come sooner.
    client = proxy.client(read_timeout=TIMEOUT)
    for relay in proxy.relays.values():
        relay.stop()
    for backend_id in proxy.relays:
        proxy.wait_for(backend_id, "DOWN", INTERVAL * FAILURES_TO_DOWN + TIMEOUT + SLACK)

    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.get_object(Bucket=bucket, Key="any")  # type: ignore[attr-defined]
    error = caught.value.response
    assert error["Error"]["Code"] == "ServiceUnavailable"
    assert "retry-after" in error["ResponseMetadata"]["HTTPHeaders"]

    deadline = time.monotonic() + SLACK
    key = ("s3proxy_requests_total", (("code", "503"), ("operation", "get_object")))
    while proxy.scrape().get(key, 0.0) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.scrape().get(key) == 1.0
