"""Hand-built requests: every authentication failure, corrupted aws-chunked bodies, bad HTTP.

Each rejected request must get its S3 error, reach no backend (checked through moto directly)
and be counted exactly once.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import socket
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
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

REGION = "us-east-1"
BUCKET = "gw-auth"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Bodies above this size are streamed to the backend instead of buffered.
RETRY_BODY_MAX = 64 * 1024
MAX_OBJECT_SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def proxy(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy with small body limits, so that streaming and size checks are cheap to reach."""
    options = {
        "server": {"retry_body_max_bytes": RETRY_BODY_MAX, "max_object_size": MAX_OBJECT_SIZE}
    }
    with proxy_stack(tmp_path_factory.mktemp("auth"), s3_server, **options) as running:
        moto = direct_client(s3_server)
        try:
            moto.create_bucket(Bucket=BUCKET)
        except ClientError:
            pass
        yield running


def direct_client(s3_server: MotoServer) -> Any:
    """A boto3 client that talks to moto without the proxy."""
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=REGION,
    )


@pytest.fixture
def watch(proxy: ProxyProcess) -> MetricsWatch:
    return MetricsWatch(proxy)


@pytest.fixture
def calls() -> BotoCallLog:
    return BotoCallLog()


# SigV4, written from the AWS documentation, independent of proxy.sigv4.


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str = REGION) -> bytes:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, "s3", "aws4_request"):
        key = _hmac(key, part)
    return key


def amz_now(offset: float = 0.0) -> str:
    return datetime.fromtimestamp(time.time() + offset, UTC).strftime("%Y%m%dT%H%M%SZ")


def sign(
    method: str,
    path: str,
    headers: dict[str, str],
    payload_hash: str,
    access_key: str = CLIENT_ACCESS_KEY,
    secret: str = CLIENT_SECRET_KEY,
    amz_date: str | None = None,
    region: str = REGION,
) -> tuple[dict[str, str], str]:
    """
    Add SigV4 headers to C{headers} for a request without a query string.

    @return: the headers to send and the signature (the seed of chunk signatures).
    """
    amz_date = amz_date or amz_now()
    signed = {name.lower(): value for name, value in headers.items()}
    signed["x-amz-date"] = amz_date
    signed["x-amz-content-sha256"] = payload_hash
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            path,
            "",
            "".join(f"{name}:{signed[name].strip()}\n" for name in names),
            ";".join(names),
            payload_hash,
        ]
    )
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signature = hmac.new(
        signing_key(secret, amz_date[:8], region), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    signed["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed, signature


def chunked_body(
    chunks: Sequence[bytes], seed: str, amz_date: str, corrupt_index: int | None = None
) -> bytes:
    """Encode C{chunks} as signed aws-chunked data, corrupting one chunk signature if asked."""
    key = signing_key(CLIENT_SECRET_KEY, amz_date[:8])
    scope = f"{amz_date[:8]}/{REGION}/s3/aws4_request"
    previous = seed
    out = bytearray()
    for index, chunk in enumerate([*chunks, b""]):
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                amz_date,
                scope,
                previous,
                EMPTY_SHA256,
                hashlib.sha256(chunk).hexdigest(),
            ]
        )
        previous = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        written = previous
        if index == corrupt_index:
            written = ("0" if previous[0] != "0" else "1") + previous[1:]
        out += f"{len(chunk):x};chunk-signature={written}\r\n".encode("ascii")
        out += chunk + b"\r\n"
    return bytes(out)


def send(
    proxy: ProxyProcess, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes, dict[str, str]]:
    """Send one request with http.client; return status, body and lower-case headers."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        all_headers = {"host": f"127.0.0.1:{proxy.port}", **headers}
        if body or method in ("PUT", "POST"):
            all_headers.setdefault("content-length", str(len(body)))
        for name, value in all_headers.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        data = response.read()
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def error_code(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""


def host_header(proxy: ProxyProcess) -> dict[str, str]:
    return {"host": f"127.0.0.1:{proxy.port}"}


def check_metrics(watch: MetricsWatch, calls: BotoCallLog, promtool: str) -> None:
    """Assert the exact request counts and that promtool accepts the exposition."""
    expected = dict(calls.calls)
    totals, counts = watch.wait_for(expected)
    assert totals == {key: float(value) for key, value in expected.items()}
    assert counts == counts_per_operation(totals)
    code, output = promtool_check(promtool, watch.last_text)
    assert code == 0, output


def object_exists(s3_server: MotoServer, key: str) -> bool:
    try:
        direct_client(s3_server).head_object(Bucket=BUCKET, Key=key)
    except ClientError:
        return False
    return True


# Authentication failures.


def test_no_signature(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A request without any signature gets 403 AccessDenied."""
    status, body, headers = send(proxy, "GET", f"/{BUCKET}/k", {})
    assert status == 403
    assert error_code(body) == "AccessDenied"
    assert headers["x-amz-request-id"]
    assert "x-amz-id-2" in headers
    calls.add("get_object", 403)
    check_metrics(watch, calls, promtool)


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"access_key": "unknown-key"}, 403, "InvalidAccessKeyId"),
        ({"secret": "wrong-secret"}, 403, "SignatureDoesNotMatch"),
        ({"amz_date_offset": -3600}, 403, "RequestTimeTooSkewed"),
        ({"region": "eu-west-1"}, 400, "AuthorizationHeaderMalformed"),
    ],
)
def test_header_signature_rejected(
    proxy: ProxyProcess,
    watch: MetricsWatch,
    calls: BotoCallLog,
    promtool: str,
    change: dict[str, Any],
    status: int,
    code: str,
) -> None:
    """A header signature with a bad key, secret, time or region gets its S3 error."""
    offset = change.pop("amz_date_offset", 0)
    headers, _ = sign(
        "GET", f"/{BUCKET}/k", host_header(proxy), EMPTY_SHA256, amz_date=amz_now(offset), **change
    )
    got_status, body, _ = send(proxy, "GET", f"/{BUCKET}/k", headers)
    assert got_status == status
    assert error_code(body) == code
    calls.add("get_object", status)
    check_metrics(watch, calls, promtool)


def test_malformed_authorization(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A garbled Authorization header gets 400."""
    headers = {
        "authorization": "AWS4-HMAC-SHA256 garbage",
        "x-amz-date": amz_now(),
        "x-amz-content-sha256": EMPTY_SHA256,
    }
    status, body, _ = send(proxy, "GET", f"/{BUCKET}/k", headers)
    assert status == 400
    assert error_code(body) == "AuthorizationHeaderMalformed"
    calls.add("get_object", 400)
    check_metrics(watch, calls, promtool)


def test_expired_presigned_url(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A presigned URL past its expiry gets 403 AccessDenied."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"{proxy.endpoint}/{BUCKET}/k"
    request = AWSRequest(method="GET", url=url)
    S3SigV4QueryAuth(
        Credentials(CLIENT_ACCESS_KEY, CLIENT_SECRET_KEY), "s3", REGION, expires=1
    ).add_auth(request)
    time.sleep(2.5)  # let the one-second validity pass; not a timing assertion
    target = request.url.split(str(proxy.port), 1)[1]
    status, body, _ = send(proxy, "GET", target, {})
    assert status == 403
    assert error_code(body) == "AccessDenied"
    calls.add("get_object", 403)
    check_metrics(watch, calls, promtool)


def test_payload_hash_mismatch(
    proxy: ProxyProcess,
    s3_server: MotoServer,
    watch: MetricsWatch,
    calls: BotoCallLog,
    promtool: str,
) -> None:
    """A body that does not match its signed SHA-256 is rejected and never stored."""
    path = f"/{BUCKET}/hash-mismatch"
    headers, _ = sign("PUT", path, host_header(proxy), hashlib.sha256(b"other").hexdigest())
    status, body, _ = send(proxy, "PUT", path, headers, b"the real body")
    assert status == 400
    assert error_code(body) == "XAmzContentSHA256Mismatch"
    assert not object_exists(s3_server, "hash-mismatch")
    calls.add("put_object", 400)
    check_metrics(watch, calls, promtool)


def test_missing_content_sha256(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A header-signed request without x-amz-content-sha256 gets 400 InvalidRequest."""
    headers, _ = sign("GET", f"/{BUCKET}/k", host_header(proxy), EMPTY_SHA256)
    del headers["x-amz-content-sha256"]
    status, body, _ = send(proxy, "GET", f"/{BUCKET}/k", headers)
    assert status == 400
    assert error_code(body) == "InvalidRequest"
    calls.add("get_object", 400)
    check_metrics(watch, calls, promtool)


# aws-chunked bodies with chunk signatures.


def chunked_put(
    proxy: ProxyProcess, key: str, chunks: list[bytes], corrupt_index: int | None
) -> tuple[int, bytes]:
    path = f"/{BUCKET}/{key}"
    amz_date = amz_now()
    decoded = sum(len(c) for c in chunks)
    base = {
        **host_header(proxy),
        "content-encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(decoded),
    }
    placeholder = chunked_body(chunks, "0" * 64, amz_date)
    base["content-length"] = str(len(placeholder))
    headers, seed = sign("PUT", path, base, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", amz_date=amz_date)
    body = chunked_body(chunks, seed, amz_date, corrupt_index)
    status, response, _ = send(proxy, "PUT", path, headers, body)
    return status, response


@pytest.mark.parametrize(("chunk_size", "mode"), [(8 * 1024, "buffered"), (64 * 1024, "streamed")])
def test_chunked_upload_valid(
    proxy: ProxyProcess,
    s3_server: MotoServer,
    watch: MetricsWatch,
    calls: BotoCallLog,
    promtool: str,
    chunk_size: int,
    mode: str,
) -> None:
    """A correctly signed aws-chunked upload is stored with its decoded bytes."""
    chunks = [bytes([i]) * chunk_size for i in range(3)]
    status, body = chunked_put(proxy, f"chunked-{mode}", chunks, None)
    assert status == 200, body
    stored = direct_client(s3_server).get_object(Bucket=BUCKET, Key=f"chunked-{mode}")
    assert stored["Body"].read() == b"".join(chunks)
    calls.add("put_object", 200)
    check_metrics(watch, calls, promtool)


@pytest.mark.parametrize(("chunk_size", "mode"), [(8 * 1024, "buffered"), (64 * 1024, "streamed")])
def test_corrupted_second_chunk(
    proxy: ProxyProcess,
    s3_server: MotoServer,
    watch: MetricsWatch,
    calls: BotoCallLog,
    promtool: str,
    chunk_size: int,
    mode: str,
) -> None:
    """A bad second chunk signature gets 403, and the stored object is left unchanged."""
    key = f"corrupt-{mode}"
    direct_client(s3_server).put_object(Bucket=BUCKET, Key=key, Body=b"original")
    chunks = [bytes([i]) * chunk_size for i in range(3)]
    status, body = chunked_put(proxy, key, chunks, corrupt_index=1)
    assert status == 403
    assert error_code(body) == "SignatureDoesNotMatch"
    stored = direct_client(s3_server).get_object(Bucket=BUCKET, Key=key)
    assert stored["Body"].read() == b"original"

    new_key = f"corrupt-new-{mode}"
    status, _ = chunked_put(proxy, new_key, chunks, corrupt_index=1)
    assert status == 403
    assert not object_exists(s3_server, new_key)
    calls.add("put_object", 403, times=2)
    check_metrics(watch, calls, promtool)


# Limits and malformed HTTP.


def raw_exchange(proxy: ProxyProcess, data: bytes) -> bytes:
    """Send raw bytes, return everything the proxy sends until it closes or 2 s of silence."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


def test_entity_too_large_before_continue(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A declared body over max_object_size gets 400 EntityTooLarge and no 100 Continue."""
    path = f"/{BUCKET}/too-large"
    size = MAX_OBJECT_SIZE + 1
    headers, _ = sign(
        "PUT", path, {**host_header(proxy), "content-length": str(size)}, "UNSIGNED-PAYLOAD"
    )
    head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "expect: 100-continue\r\n\r\n"
    response = raw_exchange(proxy, head.encode("ascii"))
    assert response.startswith(b"HTTP/1.1 400 ")
    assert b"100 Continue" not in response
    assert b"<Code>EntityTooLarge</Code>" in response
    calls.add("put_object", 400)
    check_metrics(watch, calls, promtool)


def test_auth_failure_before_continue(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A PUT with a bad signature and Expect: 100-continue gets 403 without 100 Continue."""
    path = f"/{BUCKET}/denied"
    headers, _ = sign(
        "PUT",
        path,
        {**host_header(proxy), "content-length": "1000"},
        "UNSIGNED-PAYLOAD",
        secret="wrong",
    )
    head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "expect: 100-continue\r\n\r\n"
    response = raw_exchange(proxy, head.encode("ascii"))
    assert response.startswith(b"HTTP/1.1 403 ")
    assert b"100 Continue" not in response
    calls.add("put_object", 403)
    check_metrics(watch, calls, promtool)


def test_oversized_headers(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """Headers over max_header_bytes get 431."""
    filler = "".join(f"x-filler-{i}: {'a' * 1000}\r\n" for i in range(20))
    response = raw_exchange(proxy, f"GET / HTTP/1.1\r\nhost: x\r\n{filler}\r\n".encode())
    assert response.startswith(b"HTTP/1.1 431 ")
    calls.add("other", 431)
    check_metrics(watch, calls, promtool)


def test_header_line_too_long(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A single header line over max_header_bytes gets 431."""
    response = raw_exchange(proxy, b"GET / HTTP/1.1\r\nx-long: " + b"a" * 20000 + b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 431 ")
    calls.add("other", 431)
    check_metrics(watch, calls, promtool)


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"OPTIONS /bucket HTTP/1.1", 405),
        (b"PATCH /bucket/key HTTP/1.1", 405),
        (b"BREW /bucket/key HTTP/1.1", 501),
    ],
)
def test_unsupported_methods(
    proxy: ProxyProcess,
    watch: MetricsWatch,
    calls: BotoCallLog,
    promtool: str,
    request_line: bytes,
    status: int,
) -> None:
    """HTTP methods S3 does not serve get 405, unknown ones 501."""
    response = raw_exchange(proxy, request_line + b"\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 %d " % status)
    assert b"x-amz-request-id: " in response.lower()
    calls.add("other", status)
    check_metrics(watch, calls, promtool)


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nno-colon-header\r\n\r\n",
        b"PUT /b/k HTTP/1.1\r\ncontent-length: abc\r\n\r\n",
    ],
)
def test_malformed_http(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str, data: bytes
) -> None:
    """Malformed requests get 400 and the proxy keeps serving."""
    response = raw_exchange(proxy, data)
    assert response.startswith(b"HTTP/1.1 400 ")
    status, _, _ = send(proxy, "GET", "/", {})
    assert status == 403
    calls.add("other", 400)
    calls.add("list_buckets", 403)
    check_metrics(watch, calls, promtool)


def test_client_disconnect_counts_499(
    proxy: ProxyProcess, watch: MetricsWatch, calls: BotoCallLog, promtool: str
) -> None:
    """A client that closes in the middle of a streamed upload is counted as 499."""
    path = f"/{BUCKET}/abandoned"
    size = 512 * 1024
    headers, _ = sign(
        "PUT", path, {**host_header(proxy), "content-length": str(size)}, "UNSIGNED-PAYLOAD"
    )
    head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head.encode("ascii") + b"\r\n" + b"x" * (size // 2))
    calls.add("put_object", 499)
    check_metrics(watch, calls, promtool)


def test_percent_encoded_path_forwarded(
    proxy: ProxyProcess,
    s3_server: MotoServer,
    watch: MetricsWatch,
    calls: BotoCallLog,
    promtool: str,
) -> None:
    """A hand-signed PUT with an encoded key stores the decoded key."""
    path = f"/{BUCKET}/" + urllib.parse.quote("a b/c+d", safe="/")
    headers, _ = sign("PUT", path, host_header(proxy), hashlib.sha256(b"x").hexdigest())
    status, body, _ = send(proxy, "PUT", path, headers, b"x")
    assert status == 200, body
    assert object_exists(s3_server, "a b/c+d")
    calls.add("put_object", 200)
    check_metrics(watch, calls, promtool)
