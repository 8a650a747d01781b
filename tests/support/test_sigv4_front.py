"""Tests for the SigV4-verifying test front (tests.support.sigv4_front)."""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.servers import MotoServer
from tests.support.sigv4_front import SigV4Front, start_front, verify_with_botocore
from tests.support.sigv4_signing import (
    boto3_client,
    load_aws_examples,
    raw_target,
)

AWS = load_aws_examples()
AWS_CREDENTIALS = {AWS["access_key"]: AWS["secret_key"]}
ACCESS_KEY = "AKIDFRONTTEST"
SECRET_KEY = "front/secret+key"
REGION = "us-east-1"


def _aws_headers(example: dict[str, Any], signature: str) -> list[tuple[str, str]]:
    headers = [(name, value) for name, value in example["headers"]]
    headers.append(
        (
            "Authorization",
            f"AWS4-HMAC-SHA256 Credential={AWS['access_key']}/20130524/us-east-1/s3/"
            f"aws4_request,SignedHeaders={example['signed_headers']},Signature={signature}",
        )
    )
    return headers


# --- the verifier against AWS's published examples ---


@pytest.mark.parametrize(
    "example", AWS["header_examples"], ids=[e["name"] for e in AWS["header_examples"]]
)
def test_front_accepts_aws_example(example: dict[str, Any]) -> None:
    """botocore's recomputation accepts each published header example."""
    verdict = verify_with_botocore(
        example["method"],
        raw_target(example["url"]).decode(),
        _aws_headers(example, example["signature"]),
        example.get("body", "").encode(),
        AWS_CREDENTIALS,
        "us-east-1",
    )
    assert verdict.ok


@pytest.mark.parametrize(
    "example", AWS["header_examples"], ids=[e["name"] for e in AWS["header_examples"]]
)
def test_front_rejects_tampered_example(example: dict[str, Any]) -> None:
    """A published example with a changed signature is SignatureDoesNotMatch."""
    verdict = verify_with_botocore(
        example["method"],
        raw_target(example["url"]).decode(),
        _aws_headers(example, "0" * 64),
        None,
        AWS_CREDENTIALS,
        "us-east-1",
    )
    assert verdict.code == "SignatureDoesNotMatch"


def test_front_accepts_aws_presigned_example() -> None:
    """botocore's recomputation accepts the published presigned URL."""
    example = AWS["presigned_example"]
    verdict = verify_with_botocore(
        "GET",
        raw_target(example["url"]).decode(),
        example["headers"],
        None,
        AWS_CREDENTIALS,
        "us-east-1",
    )
    assert verdict.ok


def test_front_accepts_aws_chunked_seed() -> None:
    """botocore's recomputation accepts the aws-chunked example's seed signature."""
    example = AWS["chunked_example"]
    verdict = verify_with_botocore(
        "PUT",
        raw_target(example["url"]).decode(),
        _aws_headers(example, example["seed_signature"]),
        None,
        AWS_CREDENTIALS,
        "us-east-1",
    )
    assert verdict.ok


def test_front_rejects_wrong_body() -> None:
    """A body that does not match its literal x-amz-content-sha256 is rejected."""
    example = AWS["header_examples"][1]
    verdict = verify_with_botocore(
        "PUT",
        raw_target(example["url"]).decode(),
        _aws_headers(example, example["signature"]),
        b"Welcome to Amazon S4.",
        AWS_CREDENTIALS,
        "us-east-1",
    )
    assert verdict.code == "XAmzContentSHA256Mismatch"


def test_front_rejects_unknown_key() -> None:
    """A signature by an access key the front does not know is InvalidAccessKeyId."""
    example = AWS["header_examples"][0]
    verdict = verify_with_botocore(
        "GET",
        "/test.txt",
        _aws_headers(example, example["signature"]),
        None,
        {"OTHER": "x"},
        "us-east-1",
    )
    assert verdict.code == "InvalidAccessKeyId"


def test_front_rejects_unsigned() -> None:
    """A request without a signature is AccessDenied."""
    verdict = verify_with_botocore("GET", "/b/k", [("Host", "h")], None, AWS_CREDENTIALS, REGION)
    assert (verdict.code, verdict.status) == ("AccessDenied", 403)


# --- the running front in front of moto ---


@pytest.fixture
def front(s3_server: MotoServer) -> Iterator[SigV4Front]:
    running = start_front(s3_server.endpoint, ACCESS_KEY, SECRET_KEY, REGION)
    try:
        yield running
    finally:
        running.stop()


def _client(front: SigV4Front, secret_key: str = SECRET_KEY) -> Any:
    return boto3_client(
        endpoint=front.endpoint, access_key=ACCESS_KEY, secret_key=secret_key, region=REGION
    )


def _bucket() -> str:
    return f"front-{uuid.uuid4().hex[:12]}"


@pytest.mark.integration
def test_boto3_round_trip(front: SigV4Front) -> None:
    """A boto3 client can create a bucket, put, get and list through the front."""
    client = _client(front)
    bucket = _bucket()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="dir/a b+c.txt", Body=b"hello front")
    body = client.get_object(Bucket=bucket, Key="dir/a b+c.txt")["Body"].read()
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert (body, keys) == (b"hello front", ["dir/a b+c.txt"])


@pytest.mark.integration
def test_counts_requests(front: SigV4Front) -> None:
    """The front counts verified requests per method and raw path."""
    client = _client(front)
    bucket = _bucket()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    front.reset_stats()
    client.get_object(Bucket=bucket, Key="k")
    client.get_object(Bucket=bucket, Key="k")
    client.head_object(Bucket=bucket, Key="k")
    stats = front.stats
    assert stats.requests("GET", f"/{bucket}/k") == 2
    assert stats.requests("HEAD") == 1
    assert (stats.verified, stats.rejected) == (3, 0)


@pytest.mark.integration
def test_wrong_secret_rejected(front: SigV4Front) -> None:
    """A client with the wrong secret gets 403 SignatureDoesNotMatch, and nothing is forwarded."""
    with pytest.raises(ClientError) as info:
        _client(front, secret_key="wrong").list_buckets()
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert (front.stats.rejected, front.stats.verified) == (1, 0)


@pytest.mark.integration
def test_tampered_request_rejected(front: SigV4Front) -> None:
    """A signed request whose path is changed on the way is rejected with 403 XML."""
    client = _client(front)
    bucket = _bucket()
    client.create_bucket(Bucket=bucket)
    captured: dict[str, Any] = {}

    def grab(request: Any, **_: Any) -> None:
        captured["request"] = request

    client.meta.events.register("before-send", grab)
    client.put_object(Bucket=bucket, Key="original", Body=b"v1")
    request = captured["request"]
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    connection.request(
        "PUT",
        f"/{bucket}/tampered",
        body=b"v1",
        headers={k: v for k, v in request.headers.items() if k.lower() != "expect"},
    )
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    assert response.status == 403
    assert b"<Code>SignatureDoesNotMatch</Code>" in payload
    assert front.stats.requests("PUT", f"/{bucket}/tampered") == 0


@pytest.mark.integration
def test_presigned_get(front: SigV4Front) -> None:
    """A URL presigned by boto3 works through the front."""
    client = _client(front)
    bucket = _bucket()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="p", Body=b"presigned body")
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p"})
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == b"presigned body"


@pytest.mark.integration
def test_anonymous_rejected(front: SigV4Front) -> None:
    """An unsigned request gets 403 AccessDenied from the front."""
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{front.endpoint}/some-bucket/key", timeout=30)
    assert info.value.code == 403


@pytest.mark.integration
def test_sign_request_through_front(front: SigV4Front) -> None:
    """A PUT signed by proxy.sigv4.sign_request, with a UTF-8 metadata value, reaches moto."""
    from proxy.sigv4 import sign_request

    bucket = _bucket()
    _client(front).create_bucket(Bucket=bucket)
    body = b"signed by the proxy"
    target = f"/{bucket}/dir/a%20b%2Bc%24.txt"
    url = front.endpoint + target
    headers = sign_request(
        "PUT",
        url,
        {"Content-Length": str(len(body)), "x-amz-meta-note": "caf\xc3\xa9"},
        hashlib.sha256(body).hexdigest(),
        ACCESS_KEY,
        SECRET_KEY,
        REGION,
        time.time(),
    )
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    connection.putrequest("PUT", target, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    response.read()
    connection.close()
    stored = _client(front).get_object(Bucket=bucket, Key="dir/a b+c$.txt")
    assert (response.status, front.stats.rejected) == (200, 0)
    assert stored["Body"].read() == body


@pytest.mark.integration
def test_chunked_transfer_forwarded(front: SigV4Front) -> None:
    """A body sent with Transfer-Encoding: chunked reaches moto whole, with a Content-Length."""
    from proxy.sigv4 import sign_request

    bucket = _bucket()
    _client(front).create_bucket(Bucket=bucket)
    parts = [b"first part, ", b"second part"]
    target = f"/{bucket}/chunked"
    headers = sign_request(
        "PUT",
        front.endpoint + target,
        {},
        hashlib.sha256(b"".join(parts)).hexdigest(),
        ACCESS_KEY,
        SECRET_KEY,
        REGION,
        time.time(),
    )
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    connection.request("PUT", target, body=iter(parts), headers=headers, encode_chunked=True)
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200
    stored = _client(front).get_object(Bucket=bucket, Key="chunked")["Body"].read()
    assert stored == b"".join(parts)
