"""Tests for proxy.payload: literal hashes, aws-chunked signatures, trailer checksums."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from typing import Any

import pytest

import proxy.payload as payload_module
from proxy.payload import MAX_CHUNK_SIZE, PayloadVerifier, supported_checksum_algorithms
from proxy.sigv4 import AuthError, RequestAuth, verify_request
from tests.support.sigv4_signing import (
    REGION,
    SIGNING_SECONDS,
    USERS,
    CapturedRequest,
    amz_seconds,
    boto3_client,
    botocore_sign_headers,
    capture,
    load_aws_examples,
    raw_target,
    signature_of,
    signed_chunked_body,
)

AWS = load_aws_examples()
CHUNKED = AWS["chunked_example"]
AWS_DATA = b"a" * 66560


def _aws_chunked_auth() -> RequestAuth:
    headers = [(n.encode(), v.encode()) for n, v in CHUNKED["headers"]]
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={AWS['access_key']}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={CHUNKED['signed_headers']},Signature={CHUNKED['seed_signature']}"
    )
    headers.append((b"Authorization", authorization.encode()))
    return verify_request(
        "PUT",
        raw_target(CHUNKED["url"]),
        headers,
        {AWS["access_key"]: AWS["secret_key"]},
        amz_seconds(AWS["time"]),
        "us-east-1",
    )


def _aws_chunked_body(signatures: Sequence[str] | None = None) -> bytes:
    signatures = signatures or [chunk["signature"] for chunk in CHUNKED["chunks"]]
    body = bytearray()
    for chunk, signature in zip(CHUNKED["chunks"], signatures, strict=True):
        body += f"{chunk['size']:x};chunk-signature={signature}\r\n".encode()
        if chunk["size"]:
            body += chunk["byte"].encode() * chunk["size"] + b"\r\n"
    return bytes(body + b"\r\n")


def _feed_all(verifier: PayloadVerifier, body: bytes, step: int) -> bytes:
    out = bytearray()
    for start in range(0, len(body), step):
        out += verifier.feed(body[start : start + step])
    return bytes(out)


def _failure(verifier: PayloadVerifier, body: bytes, step: int = 64) -> tuple[AuthError, bytes]:
    """
    Feed ``body`` in ``step``-byte pieces until the verifier raises.

    :return: the error and the bytes released before it. A feed call that raises returns
        nothing, even bytes it verified before the failure.
    """
    released = bytearray()
    with pytest.raises(AuthError) as info:
        for start in range(0, len(body), step):
            released += verifier.feed(body[start : start + step])
        released += verifier.finish()
    return info.value, bytes(released)


# --- the AWS aws-chunked example ---


@pytest.mark.parametrize("step", [1, 7, 8192, 66824])
def test_aws_chunked_example(step: int) -> None:
    """The published aws-chunked body decodes to 66560 'a' bytes, in any feed sizes."""
    verifier = _aws_chunked_auth().payload_verifier()
    data = _feed_all(verifier, _aws_chunked_body(), step) + verifier.finish()
    assert data == AWS_DATA


def test_aws_chunked_holds_last_byte() -> None:
    """Before finish(), everything but the last decoded byte is released."""
    verifier = _aws_chunked_auth().payload_verifier()
    released = _feed_all(verifier, _aws_chunked_body(), 66824)
    assert len(released) == len(AWS_DATA) - 1


def test_aws_chunked_decoded_length() -> None:
    """decoded_length counts the decoded bytes."""
    verifier = _aws_chunked_auth().payload_verifier()
    _feed_all(verifier, _aws_chunked_body(), 1000)
    verifier.finish()
    assert verifier.decoded_length == 66560


def test_corrupted_second_chunk() -> None:
    """A corrupted second chunk signature is SignatureDoesNotMatch, and none of it is released."""
    signatures = [chunk["signature"] for chunk in CHUNKED["chunks"]]
    signatures[1] = signatures[1][:-1] + ("0" if signatures[1][-1] != "0" else "1")
    error, released = _failure(
        _aws_chunked_auth().payload_verifier(), _aws_chunked_body(signatures)
    )
    assert (error.code, error.status) == ("SignatureDoesNotMatch", 403)
    assert len(released) == 65536 - 1


def test_corrupted_chunk_data() -> None:
    """A changed byte inside the first chunk is SignatureDoesNotMatch before any release."""
    body = bytearray(_aws_chunked_body())
    body[200] = ord("b")
    error, released = _failure(_aws_chunked_auth().payload_verifier(), bytes(body))
    assert (error.code, released) == ("SignatureDoesNotMatch", b"")


def test_corrupted_final_chunk() -> None:
    """A bad signature on the empty final chunk fails, and the last byte is never released."""
    signatures = [chunk["signature"] for chunk in CHUNKED["chunks"]]
    signatures[2] = "0" * 64
    error, released = _failure(
        _aws_chunked_auth().payload_verifier(), _aws_chunked_body(signatures)
    )
    assert (error.code, len(released)) == ("SignatureDoesNotMatch", len(AWS_DATA) - 1)


def test_reordered_chunks() -> None:
    """The second chunk sent first fails, because each signature chains the previous one."""
    second = CHUNKED["chunks"][1]
    body = f"400;chunk-signature={second['signature']}\r\n".encode() + b"a" * 1024 + b"\r\n"
    error, released = _failure(_aws_chunked_auth().payload_verifier(), body)
    assert (error.code, released) == ("SignatureDoesNotMatch", b"")


def test_truncated_body() -> None:
    """A body that stops before the final chunk is IncompleteBody at finish()."""
    body = _aws_chunked_body()
    verifier = _aws_chunked_auth().payload_verifier()
    verifier.feed(body[:60000])
    with pytest.raises(AuthError) as info:
        verifier.finish()
    assert (info.value.code, info.value.status) == ("IncompleteBody", 400)


def test_error_is_sticky() -> None:
    """After a failure every later call raises the same error."""
    signatures = [chunk["signature"] for chunk in CHUNKED["chunks"]]
    signatures[0] = "0" * 64
    verifier = _aws_chunked_auth().payload_verifier()
    error, _ = _failure(verifier, _aws_chunked_body(signatures))
    with pytest.raises(AuthError) as info:
        verifier.finish()
    assert info.value is error


def test_data_after_end() -> None:
    """Bytes after the end of the aws-chunked body are InvalidRequest."""
    error, _ = _failure(_aws_chunked_auth().payload_verifier(), _aws_chunked_body() + b"x")
    assert (error.code, error.status) == ("InvalidRequest", 400)


def test_missing_final_crlf_accepted() -> None:
    """A body that ends right after the final chunk line (no empty line) is accepted."""
    verifier = _aws_chunked_auth().payload_verifier()
    data = _feed_all(verifier, _aws_chunked_body()[:-2], 4096) + verifier.finish()
    assert data == AWS_DATA


# --- signed aws-chunked bodies made with the reference chunk signer ---

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _signed_stream_auth(
    mode: str, decoded_length: int | None, trailer: str | None = None
) -> RequestAuth:
    headers = [("Content-Encoding", "aws-chunked")]
    if decoded_length is not None:
        headers.append(("x-amz-decoded-content-length", str(decoded_length)))
    if trailer is not None:
        headers.append(("x-amz-trailer", trailer))
    signed = botocore_sign_headers("PUT", "http://s3.test/bucket/key", headers, mode)
    return verify_request("PUT", b"/bucket/key", signed, USERS, SIGNING_SECONDS, REGION)


def _crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_signed_stream_round_trip() -> None:
    """A body signed chunk by chunk by the reference signer verifies and decodes."""
    chunks = [b"x" * 8192, b"y" * 8192, b"z" * 10]
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 16394)
    body = signed_chunked_body(chunks, auth.signature, auth.amz_date)
    verifier = auth.payload_verifier()
    assert _feed_all(verifier, body, 1000) + verifier.finish() == b"".join(chunks)


def test_decoded_length_short() -> None:
    """Fewer bytes than x-amz-decoded-content-length is IncompleteBody."""
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 100)
    error, _ = _failure(
        auth.payload_verifier(), signed_chunked_body([b"x" * 99], auth.signature, auth.amz_date)
    )
    assert (error.code, error.status) == ("IncompleteBody", 400)


def test_decoded_length_long() -> None:
    """More bytes than x-amz-decoded-content-length fail before the extra bytes are released."""
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 100)
    error, released = _failure(
        auth.payload_verifier(),
        signed_chunked_body([b"x" * 101], auth.signature, auth.amz_date),
    )
    assert (error.code, released) == ("InvalidRequest", b"")


def test_decoded_length_required_when_signed() -> None:
    """The signed aws-chunked mode without x-amz-decoded-content-length is rejected."""
    with pytest.raises(AuthError) as info:
        _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", None)
    assert (info.value.code, info.value.status) == ("MissingContentLength", 411)


def test_chunk_too_large() -> None:
    """A chunk size above MAX_CHUNK_SIZE is EntityTooLarge before its data is read."""
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", MAX_CHUNK_SIZE + 1)
    line = f"{MAX_CHUNK_SIZE + 1:x};chunk-signature={'0' * 64}\r\n".encode()
    error, _ = _failure(auth.payload_verifier(), line)
    assert (error.code, error.status) == ("EntityTooLarge", 400)


@pytest.mark.parametrize(
    "line", [b"zz;chunk-signature=00\r\n", b";chunk-signature=00\r\n", b"1" * 5000]
)
def test_malformed_chunk_line(line: bytes) -> None:
    """An unparsable or endless chunk-size line is InvalidRequest."""
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 1)
    error, _ = _failure(auth.payload_verifier(), line)
    assert (error.code, error.status) == ("InvalidRequest", 400)


def test_missing_chunk_signature() -> None:
    """A signed-mode chunk without chunk-signature is SignatureDoesNotMatch."""
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 1)
    error, _ = _failure(auth.payload_verifier(), b"1\r\nx\r\n0\r\n\r\n")
    assert error.code == "SignatureDoesNotMatch"


def test_chunk_without_crlf() -> None:
    """Chunk data not followed by CRLF is InvalidRequest."""
    auth = _signed_stream_auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 2)
    body = signed_chunked_body([b"xy"], auth.signature, auth.amz_date).replace(b"xy\r\n", b"xyXX")
    error, _ = _failure(auth.payload_verifier(), body)
    assert error.code == "InvalidRequest"


def test_signed_trailer_round_trip() -> None:
    """Signed chunks plus a signed crc32 trailer verify; the checksum is exposed after finish."""
    data = b"trailer payload " * 1000
    auth = _signed_stream_auth(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", len(data), "x-amz-checksum-crc32"
    )
    body = signed_chunked_body(
        [data[:8192], data[8192:]],
        auth.signature,
        auth.amz_date,
        trailers=[("x-amz-checksum-crc32", _crc32_b64(data))],
    )
    verifier = auth.payload_verifier()
    assert _feed_all(verifier, body, 333) + verifier.finish() == data
    assert verifier.checksum_headers() == {"x-amz-checksum-crc32": _crc32_b64(data)}


def test_signed_trailer_bad_signature() -> None:
    """A wrong x-amz-trailer-signature is SignatureDoesNotMatch; the last byte stays held."""
    data = b"abc" * 100
    auth = _signed_stream_auth(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", len(data), "x-amz-checksum-crc32"
    )
    body = signed_chunked_body(
        [data],
        auth.signature,
        auth.amz_date,
        trailers=[("x-amz-checksum-crc32", _crc32_b64(data))],
        tamper=lambda index, sig: "0" * 64 if index == -1 else sig,
    )
    error, released = _failure(auth.payload_verifier(), body)
    assert (error.code, len(released)) == ("SignatureDoesNotMatch", len(data) - 1)


def test_signed_trailer_bad_checksum() -> None:
    """A correctly signed trailer with a wrong crc32 is BadDigest (400)."""
    data = b"abc" * 100
    auth = _signed_stream_auth(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", len(data), "x-amz-checksum-crc32"
    )
    body = signed_chunked_body(
        [data], auth.signature, auth.amz_date, trailers=[("x-amz-checksum-crc32", "AAAAAA==")]
    )
    error, released = _failure(auth.payload_verifier(), body)
    assert (error.code, error.status, len(released)) == ("BadDigest", 400, len(data) - 1)


def test_signed_trailer_missing() -> None:
    """An announced trailer that never arrives is MalformedTrailerError."""
    data = b"abc"
    auth = _signed_stream_auth(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", len(data), "x-amz-checksum-crc32"
    )
    body = signed_chunked_body([data], auth.signature, auth.amz_date, trailers=[])
    error, _ = _failure(auth.payload_verifier(), body)
    assert error.code == "MalformedTrailerError"


def test_unannounced_trailer() -> None:
    """A trailer not named in x-amz-trailer is MalformedTrailerError."""
    data = b"abc"
    auth = _signed_stream_auth(
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", len(data), "x-amz-checksum-crc32"
    )
    body = signed_chunked_body(
        [data],
        auth.signature,
        auth.amz_date,
        trailers=[("x-amz-checksum-crc32", _crc32_b64(data)), ("x-amz-meta-x", "1")],
    )
    error, _ = _failure(auth.payload_verifier(), body)
    assert error.code == "MalformedTrailerError"


# --- botocore's STREAMING-UNSIGNED-PAYLOAD-TRAILER bodies ---


def _botocore_trailer_request(data: bytes, algorithm: str | None = None) -> CapturedRequest:
    client = boto3_client(endpoint="https://127.0.0.1:9")
    extra: dict[str, Any] = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    return capture(client, "put_object", Bucket="b", Key="k", Body=data, **extra)


def _verifier_for(request: CapturedRequest) -> PayloadVerifier:
    auth = verify_request(
        request.method, request.target, request.headers, USERS, SIGNING_SECONDS, REGION
    )
    return auth.payload_verifier()


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"])
def test_botocore_trailer_checksum(algorithm: str) -> None:
    """A botocore aws-chunked upload with a trailing checksum verifies and decodes."""
    data = bytes(range(256)) * 5000
    request = _botocore_trailer_request(data, algorithm)
    assert request.header("x-amz-content-sha256") == b"STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    verifier = _verifier_for(request)
    assert _feed_all(verifier, request.body, 65536) + verifier.finish() == data


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"])
def test_botocore_trailer_corrupted(algorithm: str) -> None:
    """One flipped data byte in a botocore trailer upload is BadDigest; the end stays held."""
    data = b"0123456789" * 1000
    request = _botocore_trailer_request(data, algorithm)
    body = bytearray(request.body)
    position = body.index(b"0123456789") + 5
    body[position] ^= 0x01
    error, released = _failure(_verifier_for(request), bytes(body))
    assert (error.code, len(released)) == ("BadDigest", len(data) - 1)


def test_botocore_trailer_wrong_value() -> None:
    """A trailer checksum replaced by another valid value is BadDigest."""
    data = b"payload"
    request = _botocore_trailer_request(data)
    body = request.body.replace(_crc32_b64(data).encode(), _crc32_b64(b"other").encode())
    error, _ = _failure(_verifier_for(request), body)
    assert error.code == "BadDigest"


def test_botocore_trailer_not_base64() -> None:
    """A trailer checksum that is not base64 is InvalidRequest."""
    request = _botocore_trailer_request(b"payload")
    body = request.body.replace(_crc32_b64(b"payload").encode(), b"@@@@")
    error, _ = _failure(_verifier_for(request), body)
    assert error.code == "InvalidRequest"


def test_unsigned_trailer_signature_line() -> None:
    """An x-amz-trailer-signature in an unsigned-trailer body is MalformedTrailerError."""
    request = _botocore_trailer_request(b"payload")
    body = request.body[:-2] + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n\r\n"
    error, _ = _failure(_verifier_for(request), body)
    assert error.code == "MalformedTrailerError"


def test_supported_algorithms() -> None:
    """With awscrt installed, every S3 checksum algorithm can be verified."""
    assert set(supported_checksum_algorithms()) == {
        "crc32",
        "crc32c",
        "crc64nvme",
        "sha1",
        "sha256",
        "sha512",
        "xxhash64",
        "xxhash3",
        "xxhash128",
    }


# --- plain bodies ---


def _plain_auth(body: bytes, content_sha256: str | None = None) -> RequestAuth:
    payload = content_sha256 or hashlib.sha256(body).hexdigest()
    headers = botocore_sign_headers("PUT", "http://s3.test/bucket/key", [], payload)
    return verify_request("PUT", b"/bucket/key", headers, USERS, SIGNING_SECONDS, REGION)


def test_literal_hash_ok() -> None:
    """A body matching its literal x-amz-content-sha256 is released whole at finish()."""
    verifier = _plain_auth(b"hello world").payload_verifier()
    assert verifier.feed(b"hello ") + verifier.feed(b"world") + verifier.finish() == b"hello world"


def test_literal_hash_mismatch() -> None:
    """A body that does not match x-amz-content-sha256 is XAmzContentSHA256Mismatch (400)."""
    verifier = _plain_auth(b"hello world").payload_verifier()
    error, released = _failure(verifier, b"hello there")
    assert (error.code, error.status, released) == ("XAmzContentSHA256Mismatch", 400, b"hello ther")


def test_literal_hash_upper_case() -> None:
    """An upper-case hex x-amz-content-sha256 is compared case-insensitively."""
    verifier = _plain_auth(b"x", hashlib.sha256(b"x").hexdigest().upper()).payload_verifier()
    assert verifier.feed(b"x") + verifier.finish() == b"x"


def test_empty_body_hash() -> None:
    """An empty body with the empty-string hash verifies."""
    verifier = _plain_auth(b"").payload_verifier()
    assert verifier.finish() == b""


def test_unsigned_payload() -> None:
    """UNSIGNED-PAYLOAD releases everything but the last byte until finish()."""
    verifier = _plain_auth(b"", "UNSIGNED-PAYLOAD").payload_verifier()
    assert (verifier.feed(b"abc"), verifier.finish()) == (b"ab", b"c")


def test_header_checksum_exposed() -> None:
    """A checksum sent as a header is exposed for the backend before finish()."""
    request = capture(boto3_client(), "put_object", Bucket="b", Key="k", Body=b"hello")
    verifier = _verifier_for(request)
    assert verifier.checksum_headers() == {"x-amz-checksum-crc32": _crc32_b64(b"hello")}


def test_signature_of_helper() -> None:
    """The helper reads the signature botocore wrote (guards the other tests' setup)."""
    headers = botocore_sign_headers("GET", "http://s3.test/b/k", [], EMPTY_SHA256)
    assert len(signature_of(headers)) == 64


def test_trailer_without_awscrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without awscrt, a CRC32C trailer is rejected before the body, never accepted unchecked."""
    monkeypatch.delitem(payload_module._CHECKSUM_FACTORIES, "crc32c")
    with pytest.raises(AuthError) as info:
        _signed_stream_auth(
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", 3, "x-amz-checksum-crc32c"
        )
    assert info.value.code == "InvalidRequest"
    assert "awscrt" in info.value.message
