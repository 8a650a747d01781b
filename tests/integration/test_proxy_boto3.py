"""boto3 against twistd s3proxy over plain HTTP, with moto behind a SigV4-verifying front."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

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

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy over HTTP for the module, in front of the SigV4 front and moto."""
    with proxy_stack(tmp_path_factory.mktemp("http"), s3_server) as running:
        yield running


def client_for(proxy: ProxyProcess, **kwargs: Any) -> Any:
    """Return a boto3 S3 client with default settings that talks to the proxy."""
    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        aws_access_key_id=CLIENT_ACCESS_KEY,
        aws_secret_access_key=CLIENT_SECRET_KEY,
        region_name="us-east-1",
        **kwargs,
    )


@pytest.fixture
def s3(proxy: ProxyProcess) -> Any:
    return client_for(proxy)


@pytest.fixture
def calls(s3: Any) -> BotoCallLog:
    return BotoCallLog(s3)


@pytest.fixture
def watch(proxy: ProxyProcess) -> MetricsWatch:
    return MetricsWatch(proxy)


def bucket_name(request: pytest.FixtureRequest) -> str:
    """Return a bucket name unique to the test."""
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return f"gw-{digest}"


def check_metrics(watch: MetricsWatch, calls: BotoCallLog, promtool: str) -> None:
    """Assert that the proxy counted exactly the calls the clients made, and promtool agrees."""
    expected = dict(calls.calls)
    totals, counts = watch.wait_for(expected)
    assert totals == {key: float(value) for key, value in expected.items()}
    assert counts == counts_per_operation(totals)
    code, output = promtool_check(promtool, watch.last_text)
    assert code == 0, output


def test_bucket_lifecycle(
    s3: Any, calls: BotoCallLog, watch: MetricsWatch, promtool: str, request: pytest.FixtureRequest
) -> None:
    """Create, head, list and delete a bucket through the proxy."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    s3.head_bucket(Bucket=bucket)
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert bucket in names
    assert s3.get_bucket_location(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    s3.delete_bucket(Bucket=bucket)
    with pytest.raises(ClientError) as info:
        s3.head_bucket(Bucket=bucket)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    check_metrics(watch, calls, promtool)


def test_object_round_trip(
    s3: Any, calls: BotoCallLog, watch: MetricsWatch, promtool: str, request: pytest.FixtureRequest
) -> None:
    """Put, get, head and delete objects, the empty object included."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(100_000)
    put = s3.put_object(Bucket=bucket, Key="data.bin", Body=data)
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")

    got = s3.get_object(Bucket=bucket, Key="data.bin")
    assert got["Body"].read() == data
    assert got["ETag"] == put["ETag"]
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    head = s3.head_object(Bucket=bucket, Key="data.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == put["ETag"]
    assert s3.head_object(Bucket=bucket, Key="empty")["ContentLength"] == 0

    s3.delete_object(Bucket=bucket, Key="data.bin")
    s3.delete_object(Bucket=bucket, Key="empty")
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket=bucket, Key="data.bin")
    assert info.value.response["Error"]["Code"] == "NoSuchKey"
    check_metrics(watch, calls, promtool)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("bytes=0-", slice(0, None)), ("bytes=-5", slice(-5, None)), ("bytes=10-19", slice(10, 20))],
)
def test_range_get(
    s3: Any,
    calls: BotoCallLog,
    watch: MetricsWatch,
    promtool: str,
    request: pytest.FixtureRequest,
    header: str,
    expected: slice,
) -> None:
    """Range GETs return the selected bytes with Content-Range."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    data = bytes(range(256)) * 4
    s3.put_object(Bucket=bucket, Key="r", Body=data)
    got = s3.get_object(Bucket=bucket, Key="r", Range=header)
    assert got["Body"].read() == data[expected]
    assert got["ContentRange"].startswith("bytes ")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    check_metrics(watch, calls, promtool)


def test_list_pagination(
    s3: Any, calls: BotoCallLog, watch: MetricsWatch, promtool: str, request: pytest.FixtureRequest
) -> None:
    """ListObjects v1 and v2 page through five keys two at a time."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    keys = [f"k{i}" for i in range(5)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())

    for operation in ("list_objects", "list_objects_v2"):
        pages = list(
            s3.get_paginator(operation).paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
        )
        listed = [item["Key"] for page in pages for item in page.get("Contents", [])]
        assert len(pages) == 3, operation
        assert listed == keys, operation
    check_metrics(watch, calls, promtool)


def test_copy_and_delete_objects(
    s3: Any, calls: BotoCallLog, watch: MetricsWatch, promtool: str, request: pytest.FixtureRequest
) -> None:
    """CopyObject copies the bytes; DeleteObjects removes several keys in one request."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="source", Body=b"copied bytes")
    s3.copy_object(Bucket=bucket, Key="target", CopySource={"Bucket": bucket, "Key": "source"})
    assert s3.get_object(Bucket=bucket, Key="target")["Body"].read() == b"copied bytes"

    result = s3.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": "source"}, {"Key": "target"}]}
    )
    assert sorted(d["Key"] for d in result["Deleted"]) == ["source", "target"]
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    check_metrics(watch, calls, promtool)


def test_multipart_upload_file(
    s3: Any,
    calls: BotoCallLog,
    watch: MetricsWatch,
    promtool: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """upload_file sends 20 MiB as a multipart upload; the object reads back identical."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    source = tmp_path / "big.bin"
    data = os.urandom(20 * 1024 * 1024)
    source.write_bytes(data)
    s3.upload_file(str(source), bucket, "big.bin")

    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    assert calls.calls[("upload_part", "200")] == 3
    assert calls.calls[("complete_multipart_upload", "200")] == 1
    check_metrics(watch, calls, promtool)


def test_presigned_get_and_put(
    proxy: ProxyProcess,
    s3: Any,
    calls: BotoCallLog,
    watch: MetricsWatch,
    promtool: str,
    request: pytest.FixtureRequest,
) -> None:
    """Presigned SigV4 PUT and GET URLs work with plain urllib."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    # botocore presigns with SigV2 unless configured for SigV4, the proxy accepts only SigV4.
    signer = client_for(proxy, config=Config(signature_version="s3v4"))
    put_url = signer.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "pre signed+key"}, ExpiresIn=300
    )
    # urllib labels a body as a form by default, and moto drops form bodies of PUTs.
    put = urllib.request.Request(
        put_url,
        data=b"presigned body",
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=30) as response:
        assert response.status == 200
    calls.add("put_object", 200)

    get_url = signer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "pre signed+key"}, ExpiresIn=300
    )
    with urllib.request.urlopen(get_url, timeout=30) as response:
        assert response.status == 200
        assert response.read() == b"presigned body"
    calls.add("get_object", 200)
    check_metrics(watch, calls, promtool)


SPECIAL_KEYS = [
    "plus+sign",
    "encoded%2Fslash",
    "dollar$sign",
    "with space",
    "unicode-\u00e9\u00e8-\u4e2d\u6587",
    "double//slash",
    "/leading-slash",
]


def test_special_keys(
    s3: Any, calls: BotoCallLog, watch: MetricsWatch, promtool: str, request: pytest.FixtureRequest
) -> None:
    """Keys with characters that need care in SigV4 canonicalization round-trip."""
    bucket = bucket_name(request)
    s3.create_bucket(Bucket=bucket)
    for key in SPECIAL_KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode("utf-8"))
    for key in SPECIAL_KEYS:
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode("utf-8"), key
    listed = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert listed == sorted(SPECIAL_KEYS)
    check_metrics(watch, calls, promtool)
