"""Tests for proxy.sigv4: AWS published examples, botocore-signed requests, error codes."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from botocore.utils import percent_encode
from twisted.web.http_headers import Headers

from proxy.sigv4 import (
    MAX_CLOCK_SKEW_SECONDS,
    AuthError,
    RequestAuth,
    sign_request,
    verify_request,
)
from tests.support.sigv4_front import verify_with_botocore
from tests.support.sigv4_signing import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    SIGNERS,
    SIGNING_SECONDS,
    USERS,
    CapturedRequest,
    amz_seconds,
    boto3_client,
    botocore_presigned_url,
    botocore_sign_headers,
    capture,
    load_aws_examples,
    raw_target,
    reference_signing_key,
)

AWS = load_aws_examples()
AWS_USERS = {AWS["access_key"]: AWS["secret_key"]}
AWS_NOW = amz_seconds(AWS["time"])


def _header_pairs(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def _aws_authorization(example: dict[str, Any], signature: str) -> tuple[bytes, bytes]:
    value = (
        f"AWS4-HMAC-SHA256 Credential={AWS['access_key']}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={example['signed_headers']},Signature={signature}"
    )
    return (b"Authorization", value.encode())


def _verify_aws(example: dict[str, Any], signature: str | None = None) -> RequestAuth:
    headers = _header_pairs(example["headers"])
    headers.append(_aws_authorization(example, signature or example["signature"]))
    return verify_request(
        example["method"], raw_target(example["url"]), headers, AWS_USERS, AWS_NOW, "us-east-1"
    )


def _verify(request: CapturedRequest, now: float = SIGNING_SECONDS) -> RequestAuth:
    return verify_request(request.method, request.target, request.headers, USERS, now, REGION)


def _auth_error(request: CapturedRequest, now: float = SIGNING_SECONDS) -> AuthError:
    with pytest.raises(AuthError) as info:
        _verify(request, now)
    return info.value


def _put(key: str, signer: str = "python", **extra: Any) -> CapturedRequest:
    return capture(
        boto3_client(), "put_object", signer, Bucket="bucket", Key=key, Body=b"hello", **extra
    )


# --- AWS published examples ---


@pytest.mark.parametrize(
    "example", AWS["header_examples"], ids=[e["name"] for e in AWS["header_examples"]]
)
def test_aws_header_example_verifies(example: dict[str, Any]) -> None:
    """Each header-signed example from the S3 API reference is accepted."""
    auth = _verify_aws(example)
    assert auth.access_key == AWS["access_key"]


@pytest.mark.parametrize(
    "example", AWS["header_examples"], ids=[e["name"] for e in AWS["header_examples"]]
)
def test_aws_canonical_request_hash(example: dict[str, Any]) -> None:
    """A wrong signature reports the string to sign with the published canonical hash."""
    with pytest.raises(AuthError) as info:
        _verify_aws(example, signature="0" * 64)
    assert (
        info.value.details["StringToSign"].splitlines()[-1] == (example["canonical_request_sha256"])
    )


def test_aws_presigned_example_verifies() -> None:
    """The presigned URL example from the S3 API reference is accepted."""
    example = AWS["presigned_example"]
    auth = verify_request(
        "GET",
        raw_target(example["url"]),
        _header_pairs(example["headers"]),
        AWS_USERS,
        AWS_NOW,
        "us-east-1",
    )
    assert auth.kind == "presigned"


def test_aws_presigned_forward_target() -> None:
    """The target forwarded for a presigned URL has no X-Amz-* signing parameters."""
    example = AWS["presigned_example"]
    auth = verify_request(
        "GET",
        raw_target(example["url"]),
        _header_pairs(example["headers"]),
        AWS_USERS,
        AWS_NOW,
        "us-east-1",
    )
    assert auth.forward_target == b"/test.txt"


def test_aws_chunked_seed_verifies() -> None:
    """The seed signature of the aws-chunked example is accepted."""
    example = AWS["chunked_example"]
    auth = _verify_aws(example, signature=example["seed_signature"])
    assert auth.signature == example["seed_signature"]


def test_aws_chunked_canonical_hash() -> None:
    """The aws-chunked example's canonical request hashes to the published value."""
    example = AWS["chunked_example"]
    with pytest.raises(AuthError) as info:
        _verify_aws(example, signature="f" * 64)
    assert (
        info.value.details["StringToSign"].splitlines()[-1] == (example["canonical_request_sha256"])
    )


def test_aws_example_wrong_signature() -> None:
    """A one-digit change in a published signature is SignatureDoesNotMatch (403)."""
    example = AWS["header_examples"][0]
    wrong = ("1" if example["signature"][0] != "1" else "2") + example["signature"][1:]
    with pytest.raises(AuthError) as info:
        _verify_aws(example, signature=wrong)
    assert (info.value.code, info.value.status) == ("SignatureDoesNotMatch", 403)


@pytest.mark.parametrize(
    "example", AWS["header_examples"], ids=[e["name"] for e in AWS["header_examples"]]
)
def test_sign_request_aws_example(example: dict[str, Any]) -> None:
    """sign_request reproduces the published signature of each header example."""
    headers = {
        name: value
        for name, value in example["headers"]
        if name.lower() not in ("host", "x-amz-date", "x-amz-content-sha256")
    }
    payload = dict((k.lower(), v) for k, v in example["headers"])["x-amz-content-sha256"]
    signed = sign_request(
        example["method"],
        example["url"],
        headers,
        payload,
        AWS["access_key"],
        AWS["secret_key"],
        "us-east-1",
        AWS_NOW,
    )
    assert signed["Authorization"].endswith("Signature=" + example["signature"])


def test_sign_request_signed_headers() -> None:
    """sign_request lists every header it signs, host included."""
    example = AWS["header_examples"][0]
    signed = sign_request(
        "GET",
        example["url"],
        {"Range": "bytes=0-9"},
        hashlib.sha256(b"").hexdigest(),
        AWS["access_key"],
        AWS["secret_key"],
        "us-east-1",
        AWS_NOW,
    )
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in signed["Authorization"]


def test_sign_request_result_headers() -> None:
    """sign_request returns Host, X-Amz-Date and X-Amz-Content-SHA256 with the caller's headers."""
    signed = sign_request(
        "PUT",
        "http://127.0.0.1:9000/bucket/key",
        {"Content-Type": "text/plain"},
        "UNSIGNED-PAYLOAD",
        "AK",
        "SK",
        "us-east-1",
        AWS_NOW,
    )
    assert {k: v for k, v in signed.items() if k != "Authorization"} == {
        "Content-Type": "text/plain",
        "Host": "127.0.0.1:9000",
        "X-Amz-Date": "20130524T000000Z",
        "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
    }


def test_sign_request_skips_hop_headers() -> None:
    """sign_request returns hop-by-hop headers but does not sign them."""
    signed = sign_request(
        "PUT",
        "http://127.0.0.1:9000/b/k",
        {"Transfer-Encoding": "chunked", "User-Agent": "x"},
        "UNSIGNED-PAYLOAD",
        "AK",
        "SK",
        "us-east-1",
        AWS_NOW,
    )
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date," in signed["Authorization"]


def test_sign_request_default_port() -> None:
    """The Host header omits the scheme's default port, as HTTP clients send it."""
    signed = sign_request(
        "GET", "https://s3.example.com:443/b/k", {}, "UNSIGNED-PAYLOAD", "AK", "SK", "r", AWS_NOW
    )
    assert signed["Host"] == "s3.example.com"


def test_sign_request_rejects_unencoded_url() -> None:
    """A URL with a raw non-ASCII path raises ValueError naming the URL."""
    with pytest.raises(ValueError, match="not percent-encoded"):
        sign_request("GET", "http://h/b/ключ", {}, "UNSIGNED-PAYLOAD", "AK", "SK", "r", AWS_NOW)


# --- botocore-signed requests (round trips through an independent signer) ---

TRICKY_KEYS = [
    "plain.txt",
    "a+b",
    "space in key",
    "plus+and space",
    "dollar$sign",
    "slash%2Fencoded",
    "unicode-ключ-🎉",
    "double//slash",
    "/leading-slash",
    "trailing/",
    "tilde~and*star!quote'paren()",
    "query?and#hash&amp=eq",
    "percent%25literal",
    "colon:semicolon;comma,at@",
]


@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_botocore_put_key(key: str, signer: str) -> None:
    """A PutObject that botocore signed for a tricky key verifies (path style)."""
    assert _verify(_put(key, signer)).access_key == ACCESS_KEY


@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_botocore_get_key_virtual_host(key: str, signer: str) -> None:
    """A GetObject that botocore signed virtual-hosted style verifies."""
    client = boto3_client(endpoint="http://s3.test:9000", addressing_style="virtual")
    request = capture(client, "get_object", signer, Bucket="bucket", Key=key, Range="bytes=0-9")
    assert _verify(request).access_key == ACCESS_KEY


@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_botocore_presigned_key(key: str, signer: str) -> None:
    """A GetObject URL that botocore presigned for a tricky key verifies."""
    url = botocore_presigned_url(
        boto3_client(), "get_object", signer=signer, Bucket="bucket", Key=key
    )
    auth = verify_request(
        "GET", raw_target(url), [(b"Host", b"127.0.0.1:9")], USERS, SIGNING_SECONDS, REGION
    )
    assert auth.kind == "presigned"


@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("prefix", ["a+b", "a b", "x/y", "ü", "a=b&c", ""])
def test_botocore_list_prefix(prefix: str, signer: str) -> None:
    """ListObjectsV2 with a tricky prefix verifies (query canonicalization)."""
    request = capture(boto3_client(), "list_objects_v2", signer, Bucket="bucket", Prefix=prefix)
    assert _verify(request).access_key == ACCESS_KEY


def test_botocore_multipart_query() -> None:
    """UploadPart with partNumber and an uploadId containing '+', '/' and '=' verifies."""
    request = capture(
        boto3_client(),
        "upload_part",
        Bucket="bucket",
        Key="k",
        PartNumber=3,
        UploadId="a+b/c==",
        Body=b"part",
    )
    assert _verify(request).access_key == ACCESS_KEY


def test_botocore_twisted_headers() -> None:
    """Headers given as Twisted Headers verify like byte pairs."""
    request = _put("k")
    headers = Headers()
    for name, value in request.headers:
        headers.addRawHeader(name, value)
    auth = verify_request(request.method, request.target, headers, USERS, SIGNING_SECONDS, REGION)
    assert auth.access_key == ACCESS_KEY


def test_botocore_literal_hash_mode() -> None:
    """Over http, botocore signs the body hash, and the auth reports it for backend signing."""
    auth = _verify(_put("k"))
    assert auth.backend_payload_sha256 == hashlib.sha256(b"hello").hexdigest()


def test_botocore_https_trailer_mode() -> None:
    """Over https, botocore sends STREAMING-UNSIGNED-PAYLOAD-TRAILER, which verifies."""
    client = boto3_client(endpoint="https://127.0.0.1:9")
    auth = _verify(capture(client, "put_object", Bucket="b", Key="k", Body=b"hello"))
    assert auth.trailer_names == ("x-amz-checksum-crc32",)


def test_botocore_https_trailer_forwarding() -> None:
    """For aws-chunked bodies the auth reports the decoded length and no aws-chunked encoding."""
    client = boto3_client(endpoint="https://127.0.0.1:9")
    auth = _verify(capture(client, "put_object", Bucket="b", Key="k", Body=b"hello"))
    assert (auth.backend_content_encoding, auth.decoded_content_length) == (None, 5)


def test_gzip_encoding_kept() -> None:
    """aws-chunked is removed from Content-Encoding while other encodings stay."""
    client = boto3_client(endpoint="https://127.0.0.1:9")
    request = capture(
        client, "put_object", Bucket="b", Key="k", Body=b"hello", ContentEncoding="gzip"
    )
    assert _verify(request).backend_content_encoding == "gzip"


def test_absolute_form_target() -> None:
    """An absolute-form request target verifies on its path."""
    request = _put("k")
    target = b"http://127.0.0.1:9" + request.target
    auth = verify_request(request.method, target, request.headers, USERS, SIGNING_SECONDS, REGION)
    assert auth.forward_target == request.target


# --- tampering ---


def test_tampered_path() -> None:
    """Changing the key after signing is SignatureDoesNotMatch."""
    request = _put("key-a")
    tampered = CapturedRequest(
        request.method, request.url.replace("key-a", "key-b"), request.headers, request.body
    )
    assert _auth_error(tampered).code == "SignatureDoesNotMatch"


def test_tampered_method() -> None:
    """Replaying a signed PUT as DELETE is SignatureDoesNotMatch."""
    request = _put("k")
    tampered = CapturedRequest("DELETE", request.url, request.headers, b"")
    assert _auth_error(tampered).code == "SignatureDoesNotMatch"


def test_tampered_query() -> None:
    """Changing a query value after signing is SignatureDoesNotMatch."""
    request = capture(boto3_client(), "list_objects_v2", Bucket="bucket", Prefix="public/")
    tampered = CapturedRequest(
        request.method, request.url.replace("public", "secret"), request.headers, b""
    )
    assert _auth_error(tampered).code == "SignatureDoesNotMatch"


def test_tampered_signed_header() -> None:
    """Changing a signed header value is SignatureDoesNotMatch."""
    request = capture(boto3_client(), "get_object", Bucket="b", Key="k", Range="bytes=0-9")
    assert _auth_error(request.with_header("Range", b"bytes=0-99")).code == (
        "SignatureDoesNotMatch"
    )


def test_tampered_payload_hash() -> None:
    """Changing x-amz-content-sha256 is SignatureDoesNotMatch."""
    request = _put("k").with_header("x-amz-content-sha256", b"0" * 64)
    assert _auth_error(request).code == "SignatureDoesNotMatch"


def test_tampered_presigned_path() -> None:
    """A presigned URL used for another key is SignatureDoesNotMatch."""
    url = botocore_presigned_url(boto3_client(), "get_object", Bucket="bucket", Key="one")
    with pytest.raises(AuthError) as info:
        verify_request(
            "GET",
            raw_target(url.replace("/one?", "/two?")),
            [(b"Host", b"127.0.0.1:9")],
            USERS,
            SIGNING_SECONDS,
            REGION,
        )
    assert info.value.code == "SignatureDoesNotMatch"


def test_unsigned_amz_header_added() -> None:
    """An x-amz-* header added after signing is AccessDenied, naming the header."""
    request = _put("k").with_header("x-amz-acl", b"public-read")
    error = _auth_error(request)
    assert (error.code, error.details["HeadersNotSigned"]) == ("AccessDenied", "x-amz-acl")


def test_wrong_secret() -> None:
    """A request signed with another secret is SignatureDoesNotMatch."""
    client = boto3_client(secret_key="not-the-secret")
    assert _auth_error(capture(client, "list_buckets")).code == "SignatureDoesNotMatch"


def test_error_hides_secrets() -> None:
    """A signature error contains neither the secret key nor the expected signature."""
    request = capture(boto3_client(), "get_object", Bucket="b", Key="k", Range="bytes=0-9")
    error = _auth_error(request.with_header("Range", b"bytes=0-99"))
    string_to_sign = error.details["StringToSign"]
    key = reference_signing_key(SECRET_KEY, string_to_sign.splitlines()[1][:8], REGION)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    text = str(error) + repr(error.details)
    assert SECRET_KEY not in text
    assert expected not in text


# --- error codes ---


def test_anonymous_rejected() -> None:
    """A request without any signature is AccessDenied (403)."""
    with pytest.raises(AuthError) as info:
        verify_request("GET", b"/bucket/k", [(b"Host", b"h")], USERS, SIGNING_SECONDS, REGION)
    assert (info.value.code, info.value.status) == ("AccessDenied", 403)


def test_unknown_access_key() -> None:
    """An access key that is not configured is InvalidAccessKeyId (403)."""
    request = capture(boto3_client(access_key="AKIDUNKNOWN"), "list_buckets")
    error = _auth_error(request)
    assert (error.code, error.status) == ("InvalidAccessKeyId", 403)


@pytest.mark.parametrize("offset", [MAX_CLOCK_SKEW_SECONDS + 1, -MAX_CLOCK_SKEW_SECONDS - 1])
def test_clock_skew_rejected(offset: float) -> None:
    """A header signature more than 15 minutes off is RequestTimeTooSkewed (403)."""
    error = _auth_error(_put("k"), now=SIGNING_SECONDS + offset)
    assert (error.code, error.status) == ("RequestTimeTooSkewed", 403)


@pytest.mark.parametrize("offset", [MAX_CLOCK_SKEW_SECONDS, -MAX_CLOCK_SKEW_SECONDS])
def test_clock_skew_limit_accepted(offset: float) -> None:
    """A header signature exactly 15 minutes off is still accepted."""
    assert _verify(_put("k"), now=SIGNING_SECONDS + offset).access_key == ACCESS_KEY


def _presigned_auth(expires: int, now: float) -> RequestAuth:
    url = botocore_presigned_url(
        boto3_client(), "get_object", expires=expires, Bucket="bucket", Key="k"
    )
    return verify_request("GET", raw_target(url), [(b"Host", b"127.0.0.1:9")], USERS, now, REGION)


def test_presigned_valid_until_expiry() -> None:
    """A presigned URL is accepted up to X-Amz-Date + X-Amz-Expires, even past 15 minutes."""
    assert _presigned_auth(3600, SIGNING_SECONDS + 3600).kind == "presigned"


def test_presigned_expired() -> None:
    """A presigned URL used after its expiry is AccessDenied (403)."""
    with pytest.raises(AuthError) as info:
        _presigned_auth(3600, SIGNING_SECONDS + 3601)
    assert (info.value.code, info.value.message) == ("AccessDenied", "Request has expired.")


def test_presigned_not_yet_valid() -> None:
    """A presigned URL dated more than 15 minutes in the future is AccessDenied."""
    with pytest.raises(AuthError) as info:
        _presigned_auth(3600, SIGNING_SECONDS - MAX_CLOCK_SKEW_SECONDS - 1)
    assert info.value.code == "AccessDenied"


def test_presigned_expires_too_long() -> None:
    """X-Amz-Expires above 604800 is AuthorizationQueryParametersError (400)."""
    url = botocore_presigned_url(boto3_client(), "get_object", Bucket="bucket", Key="k")
    target = raw_target(url).replace(b"X-Amz-Expires=3600", b"X-Amz-Expires=604801")
    with pytest.raises(AuthError) as info:
        verify_request("GET", target, [(b"Host", b"127.0.0.1:9")], USERS, SIGNING_SECONDS, REGION)
    assert (info.value.code, info.value.status) == ("AuthorizationQueryParametersError", 400)


def test_presigned_missing_parameter() -> None:
    """A presigned URL without X-Amz-Signature is AuthorizationQueryParametersError."""
    url = botocore_presigned_url(boto3_client(), "get_object", Bucket="bucket", Key="k")
    target = raw_target(url).split(b"&X-Amz-Signature=")[0]
    with pytest.raises(AuthError) as info:
        verify_request("GET", target, [(b"Host", b"127.0.0.1:9")], USERS, SIGNING_SECONDS, REGION)
    assert info.value.code == "AuthorizationQueryParametersError"


def test_presigned_wrong_region() -> None:
    """A presigned URL for another region is AuthorizationQueryParametersError."""
    url = botocore_presigned_url(
        boto3_client(region="us-west-2"), "get_object", Bucket="bucket", Key="k"
    )
    with pytest.raises(AuthError) as info:
        verify_request(
            "GET", raw_target(url), [(b"Host", b"127.0.0.1:9")], USERS, SIGNING_SECONDS, REGION
        )
    assert info.value.code == "AuthorizationQueryParametersError"


def test_header_wrong_region() -> None:
    """A header signature scoped to another region is AuthorizationHeaderMalformed (400)."""
    error = _auth_error(capture(boto3_client(region="us-west-2"), "list_buckets"))
    assert (error.code, error.status, error.details["Region"]) == (
        "AuthorizationHeaderMalformed",
        400,
        REGION,
    )


def _with_authorization(request: CapturedRequest, old: str, new: str) -> CapturedRequest:
    value = request.header("Authorization")
    assert value is not None
    return request.with_header("Authorization", value.replace(old.encode(), new.encode()))


def test_host_not_signed() -> None:
    """SignedHeaders without host is AuthorizationHeaderMalformed (400)."""
    request = _put("k")
    assert b"SignedHeaders=host;" in (request.header("Authorization") or b"")
    error = _auth_error(_with_authorization(request, "SignedHeaders=host;", "SignedHeaders="))
    assert (error.code, error.status) == ("AuthorizationHeaderMalformed", 400)


def test_missing_signed_headers() -> None:
    """An Authorization header without SignedHeaders is AuthorizationHeaderMalformed."""
    request = _with_authorization(_put("k"), "SignedHeaders=", "Unsigned=")
    assert _auth_error(request).code == "AuthorizationHeaderMalformed"


def test_malformed_credential() -> None:
    """A Credential without the five parts is AuthorizationHeaderMalformed."""
    request = _with_authorization(_put("k"), f"{ACCESS_KEY}/", f"{ACCESS_KEY}/x/")
    assert _auth_error(request).code == "AuthorizationHeaderMalformed"


def test_credential_date_mismatch() -> None:
    """A Credential date other than the x-amz-date day is AuthorizationHeaderMalformed."""
    request = _with_authorization(_put("k"), "/20260314/", "/20260313/")
    assert _auth_error(request).code == "AuthorizationHeaderMalformed"


def test_wrong_service() -> None:
    """A Credential for another service is AuthorizationHeaderMalformed."""
    request = _with_authorization(_put("k"), "/s3/aws4_request", "/ec2/aws4_request")
    assert _auth_error(request).code == "AuthorizationHeaderMalformed"


def test_signature_v2_rejected() -> None:
    """A Signature Version 2 Authorization header is InvalidRequest (400)."""
    request = _put("k").with_header("Authorization", b"AWS AKID:c2lnbmF0dXJl")
    error = _auth_error(request)
    assert (error.code, error.status) == ("InvalidRequest", 400)


def test_two_mechanisms_rejected() -> None:
    """An Authorization header on a presigned URL is InvalidArgument (400)."""
    url = botocore_presigned_url(boto3_client(), "get_object", Bucket="bucket", Key="k")
    headers = [(b"Host", b"127.0.0.1:9"), (b"Authorization", b"AWS4-HMAC-SHA256 x")]
    with pytest.raises(AuthError) as info:
        verify_request("GET", raw_target(url), headers, USERS, SIGNING_SECONDS, REGION)
    assert (info.value.code, info.value.status) == ("InvalidArgument", 400)


def test_missing_content_sha256() -> None:
    """A header-signed request without x-amz-content-sha256 is InvalidRequest (400)."""
    request = _put("k")
    stripped = CapturedRequest(
        request.method,
        request.url,
        [(k, v) for k, v in request.headers if k.lower() != b"x-amz-content-sha256"],
        request.body,
    )
    assert _auth_error(stripped).code == "InvalidRequest"


def test_invalid_content_sha256() -> None:
    """An x-amz-content-sha256 that is neither a hash nor a known mode is InvalidArgument."""
    request = _put("k").with_header("x-amz-content-sha256", b"not-a-hash")
    assert _auth_error(request).code == "InvalidArgument"


def test_missing_date() -> None:
    """A header-signed request with neither x-amz-date nor Date is AccessDenied."""
    request = _put("k")
    stripped = CapturedRequest(
        request.method,
        request.url,
        [(k, v) for k, v in request.headers if k.lower() != b"x-amz-date"],
        request.body,
    )
    assert _auth_error(stripped).code == "AccessDenied"


def test_unsupported_trailer_rejected() -> None:
    """A trailer that is not an x-amz-checksum-* the proxy computes is InvalidRequest (400)."""
    headers = botocore_sign_headers(
        "PUT",
        "http://s3.test/bucket/k",
        [("X-Amz-Trailer", "x-amz-checksum-md4"), ("Content-Encoding", "aws-chunked")],
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
    )
    with pytest.raises(AuthError) as info:
        verify_request("PUT", b"/bucket/k", headers, USERS, SIGNING_SECONDS, REGION)
    assert (info.value.code, info.value.status) == ("InvalidRequest", 400)


def test_strip_headers() -> None:
    """The auth names the client's signing headers that must not reach a backend."""
    auth = _verify(_put("k"))
    assert {"authorization", "x-amz-date", "x-amz-content-sha256"} <= auth.strip_headers


def test_date_header_only() -> None:
    """A request that botocore signed with a Date header and no x-amz-date verifies."""
    headers = botocore_sign_headers(
        "GET", "http://s3.test/bucket/k", [("Date", "placeholder")], hashlib.sha256(b"").hexdigest()
    )
    names = {name.lower() for name, _ in headers}
    assert "x-amz-date" not in names
    auth = verify_request("GET", b"/bucket/k", headers, USERS, SIGNING_SECONDS, REGION)
    assert auth.amz_date == "20260314T150926Z"


def test_raw_plus_signed_as_sent() -> None:
    """A query with a raw '+' verifies when signed as sent (botocore's URL query rule)."""
    headers = botocore_sign_headers(
        "GET", "http://s3.test/bucket?prefix=a+b", [], hashlib.sha256(b"").hexdigest()
    )
    auth = verify_request("GET", b"/bucket?prefix=a+b", headers, USERS, SIGNING_SECONDS, REGION)
    assert auth.forward_target == b"/bucket?prefix=a+b"


def test_raw_plus_signed_as_space() -> None:
    """A query with a raw '+' verifies when signed as a space (S3's form decoding)."""
    headers = botocore_sign_headers(
        "GET", "http://s3.test/bucket?prefix=a%20b", [], hashlib.sha256(b"").hexdigest()
    )
    auth = verify_request("GET", b"/bucket?prefix=a+b", headers, USERS, SIGNING_SECONDS, REGION)
    assert auth.access_key == ACCESS_KEY


def test_raw_plus_not_signed_as_plus() -> None:
    """A raw '+' is never read as an encoded plus sign (%2B)."""
    headers = botocore_sign_headers(
        "GET", "http://s3.test/bucket?prefix=a%2Bb", [], hashlib.sha256(b"").hexdigest()
    )
    with pytest.raises(AuthError) as info:
        verify_request("GET", b"/bucket?prefix=a+b", headers, USERS, SIGNING_SECONDS, REGION)
    assert info.value.code == "SignatureDoesNotMatch"


def test_lowercase_percent_escape() -> None:
    """A path sent with lower-case escapes verifies against the upper-case canonical path."""
    request = capture(boto3_client(), "get_object", Bucket="bucket", Key="a*b")
    assert request.target == b"/bucket/a%2Ab"
    lowered = CapturedRequest("GET", request.url.replace("%2A", "%2a"), request.headers, b"")
    assert _verify(lowered).forward_target == b"/bucket/a%2ab"


# --- sign_request checked by botocore (the test front's verifier) ---


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_sign_request_botocore_accepts(key: str) -> None:
    """A backend request signed by sign_request for a tricky key passes botocore's check."""
    url = "http://127.0.0.1:9000/bucket/" + percent_encode(key, safe="/~")
    headers = sign_request(
        "PUT", url, {"Content-Type": "text/plain"}, "UNSIGNED-PAYLOAD", "AK", "SK", REGION, 1e9
    )
    verdict = verify_with_botocore(
        "PUT", raw_target(url).decode(), list(headers.items()), None, {"AK": "SK"}, REGION
    )
    assert verdict.ok


@pytest.mark.parametrize(
    "query",
    ["uploads", "partNumber=2&uploadId=a%2Bb%2Fc%3D%3D", "prefix=a+b", "list-type=2&prefix=%c3%bc"],
)
def test_sign_request_query_botocore_accepts(query: str) -> None:
    """Backend query strings, canonical or not, are signed the way botocore checks them."""
    url = f"http://127.0.0.1:9000/bucket?{query}"
    headers = sign_request("GET", url, {}, "UNSIGNED-PAYLOAD", "AK", "SK", REGION, 1e9)
    verdict = verify_with_botocore(
        "GET", raw_target(url).decode(), list(headers.items()), None, {"AK": "SK"}, REGION
    )
    assert verdict.ok


def test_sign_request_utf8_metadata() -> None:
    """A UTF-8 metadata value, passed as its wire bytes in ISO-8859-1, passes botocore's check."""
    wire_value = "Zoë – ключ".encode().decode("latin-1")
    url = "http://127.0.0.1:9000/bucket/k"
    headers = sign_request(
        "PUT", url, {"x-amz-meta-name": wire_value}, "UNSIGNED-PAYLOAD", "AK", "SK", REGION, 1e9
    )
    verdict = verify_with_botocore(
        "PUT",
        "/bucket/k",
        [(n, v.encode("latin-1").decode("utf-8")) for n, v in headers.items()],
        None,
        {"AK": "SK"},
        REGION,
    )
    assert verdict.ok


def test_sign_request_rejects_wide_header() -> None:
    """A header value with characters above U+00FF raises ValueError naming the header."""
    with pytest.raises(ValueError, match="x-amz-meta-name"):
        sign_request(
            "PUT",
            "http://h/b/k",
            {"x-amz-meta-name": "ключ"},
            "UNSIGNED-PAYLOAD",
            "AK",
            "SK",
            REGION,
            1e9,
        )


def test_raw_utf8_target_escaped() -> None:
    """A target sent with raw UTF-8 and spaces verifies and is forwarded percent-encoded."""
    request = capture(boto3_client(), "get_object", Bucket="bucket", Key="café x")
    assert request.target == b"/bucket/caf%C3%A9%20x"
    auth = verify_request(
        "GET", b"/bucket/caf\xc3\xa9 x", request.headers, USERS, SIGNING_SECONDS, REGION
    )
    assert auth.forward_target == b"/bucket/caf%C3%A9%20x"
