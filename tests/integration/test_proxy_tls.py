"""boto3 against twistd s3proxy over HTTPS, with a certificate made at test time.

Over HTTPS current boto3 sends uploads as aws-chunked STREAMING-UNSIGNED-PAYLOAD-TRAILER bodies
with a CRC checksum trailer, which the proxy verifies, decodes and forwards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.proxy_process import (
    CLIENT_ACCESS_KEY,
    CLIENT_SECRET_KEY,
    BotoCallLog,
    MetricsWatch,
    ProxyProcess,
    counts_per_operation,
    promtool_check,
    proxy_stack,
)
from tests.support.servers import MotoServer
from tests.support.tls import CertificateFiles, make_certificate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def proxy(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory, certificate: CertificateFiles
) -> Iterator[ProxyProcess]:
    """One proxy listening with TLS for the module."""
    with proxy_stack(
        tmp_path_factory.mktemp("https"), s3_server, certificate=certificate
    ) as running:
        yield running


@pytest.fixture
def s3(proxy: ProxyProcess, certificate: CertificateFiles) -> Any:
    """A boto3 client with default settings that verifies the proxy against the test CA."""
    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        aws_access_key_id=CLIENT_ACCESS_KEY,
        aws_secret_access_key=CLIENT_SECRET_KEY,
        region_name="us-east-1",
        verify=str(certificate.ca_path),
    )


def check_metrics(watch: MetricsWatch, calls: BotoCallLog, promtool: str) -> None:
    expected = dict(calls.calls)
    totals, counts = watch.wait_for(expected)
    assert totals == {key: float(value) for key, value in expected.items()}
    assert counts == counts_per_operation(totals)
    code, output = promtool_check(promtool, watch.last_text)
    assert code == 0, output


def test_https_object_round_trip(proxy: ProxyProcess, s3: Any, promtool: str) -> None:
    """Over HTTPS, trailer-checksummed uploads store exactly the bytes sent."""
    watch = MetricsWatch(proxy)
    calls = BotoCallLog(s3)
    captured: list[dict[str, str]] = []
    s3.meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_: captured.append(dict(request.headers)),
    )
    bucket = "gw-https-objects"
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="tls.bin", Body=data)
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")

    assert s3.get_object(Bucket=bucket, Key="tls.bin")["Body"].read() == data
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    assert s3.head_object(Bucket=bucket, Key="tls.bin")["ContentLength"] == len(data)
    ranged = s3.get_object(Bucket=bucket, Key="tls.bin", Range="bytes=-5")
    assert ranged["Body"].read() == data[-5:]
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert listed == ["empty", "tls.bin"]
    s3.delete_object(Bucket=bucket, Key="tls.bin")

    sent = {name.lower(): value for name, value in captured[0].items()}
    content_sha256 = sent.get("x-amz-content-sha256", b"")
    if isinstance(content_sha256, bytes):
        content_sha256 = content_sha256.decode("ascii")
    assert content_sha256 == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    check_metrics(watch, calls, promtool)


def test_https_multipart(proxy: ProxyProcess, s3: Any, promtool: str, tmp_path: Path) -> None:
    """upload_file over HTTPS sends 20 MiB in parts with checksum trailers."""
    watch = MetricsWatch(proxy)
    calls = BotoCallLog(s3)
    bucket = "gw-https-multipart"
    s3.create_bucket(Bucket=bucket)
    source = tmp_path / "big.bin"
    data = os.urandom(20 * 1024 * 1024)
    source.write_bytes(data)
    s3.upload_file(str(source), bucket, "big.bin")
    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    check_metrics(watch, calls, promtool)
