"""
Requests signed by other SigV4 implementations, for testing ``proxy.sigv4`` and ``proxy.payload``.

Signatures here come from botocore, through a real boto3 client whose request is captured
before it is sent, or from a small chunk signer written from the AWS documentation. They never
come from ``proxy.sigv4``, so a bug shared by our signer and verifier cannot pass unnoticed.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import boto3
import botocore.auth
import botocore.crt.auth as botocore_crt_auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "sigv4"

# A fixed signing time for botocore-signed requests; verification uses the same instant.
SIGNING_TIME = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
SIGNING_SECONDS = SIGNING_TIME.timestamp()

ACCESS_KEY = "AKIDPROXYTEST0001"
SECRET_KEY = "proxy-test-secret/with+slash=and+plus"
REGION = "eu-west-3"
USERS = {ACCESS_KEY: SECRET_KEY}


def load_aws_examples() -> dict[str, Any]:
    """Return the AWS published SigV4 examples stored in tests/data/sigv4/aws_examples.json."""
    with (DATA_DIR / "aws_examples.json").open(encoding="utf-8") as stream:
        examples: dict[str, Any] = json.load(stream)
    return examples


def amz_seconds(amz_date: str) -> float:
    """Convert ``YYYYMMDDTHHMMSSZ`` to POSIX seconds."""
    return float(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))


def raw_target(url: str) -> bytes:
    """Return the request target (path and query) of ``url`` exactly as written."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return target.encode("ascii")


@dataclass
class CapturedRequest:
    """A request a boto3 client was about to send."""

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def target(self) -> bytes:
        return raw_target(self.url)

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower().encode("latin-1"):
                return value
        return None

    def with_header(self, name: str, value: bytes) -> CapturedRequest:
        """Return a copy with header ``name`` set to ``value`` (replaced if present)."""
        lowered = name.lower().encode("latin-1")
        headers = [(k, v) for k, v in self.headers if k.lower() != lowered]
        headers.append((name.encode("latin-1"), value))
        return CapturedRequest(self.method, self.url, headers, self.body)


class _Captured(Exception):
    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


# botocore signs with awscrt's signer when awscrt is installed and with its own Python signer
# otherwise; tests run both, as two independent SigV4 implementations.
SIGNERS = ("python", "crt")

_PYTHON_SIGNERS = {
    "v4": botocore.auth.SigV4Auth,
    "v4-query": botocore.auth.SigV4QueryAuth,
    "s3v4": botocore.auth.S3SigV4Auth,
    "s3v4-query": botocore.auth.S3SigV4QueryAuth,
}


@contextmanager
def frozen_botocore_clock(when: datetime = SIGNING_TIME, signer: str = "python") -> Iterator[None]:
    """
    Make botocore sign at the time ``when`` with the chosen signer.

    :param signer: ``"python"`` for botocore's own SigV4 code, ``"crt"`` for awscrt's.
    """
    with ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(botocore.auth, "get_current_datetime", return_value=when)
        )
        if signer == "crt":
            crt_maps = botocore_crt_auth.CRT_AUTH_TYPE_MAPS
            stack.enter_context(
                mock.patch.object(botocore_crt_auth, "get_current_datetime", return_value=when)
            )
            stack.enter_context(mock.patch.dict(botocore.auth.AUTH_TYPE_MAPS, crt_maps))
        else:
            stack.enter_context(mock.patch.dict(botocore.auth.AUTH_TYPE_MAPS, _PYTHON_SIGNERS))
        yield


def boto3_client(
    endpoint: str = "http://127.0.0.1:9",
    addressing_style: str = "path",
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
) -> Any:
    """Create a boto3 S3 client; ``capture`` keeps its requests from being sent."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            s3={"addressing_style": addressing_style},
            retries={"max_attempts": 1},
            signature_version="s3v4",
        ),
    )


def capture(client: Any, operation: str, signer: str = "python", **params: Any) -> CapturedRequest:
    """
    Run one client operation with botocore's signing clock frozen, and capture the request.

    The request never leaves the process: a ``before-send`` hook raises once the request is
    signed and prepared.
    """

    def stop(request: Any, **_: Any) -> None:
        raise _Captured(request)

    client.meta.events.register("before-send", stop)
    try:
        with frozen_botocore_clock(signer=signer):
            getattr(client, operation)(**params)
    except _Captured as captured:
        prepared = captured.request
    else:
        raise AssertionError(f"{operation} was not captured")
    finally:
        client.meta.events.unregister("before-send", stop)

    body = prepared.body
    if body is None:
        data = b""
    elif isinstance(body, bytes | bytearray):
        data = bytes(body)
    elif isinstance(body, str):
        data = body.encode("utf-8")
    else:
        data = body.read()
    headers = [
        (
            name.encode("latin-1"),
            value if isinstance(value, bytes) else str(value).encode("utf-8"),
        )
        for name, value in prepared.headers.items()
    ]
    if not any(name.lower() == b"host" for name, _ in headers):
        # botocore's own signer leaves Host to the HTTP client, which sends the URL's
        # authority; awscrt's signer adds the header itself.
        headers.insert(0, (b"Host", urlsplit(prepared.url).netloc.encode("ascii")))
    return CapturedRequest(prepared.method, prepared.url, headers, data)


def botocore_presigned_url(
    client: Any, operation: str, expires: int = 3600, signer: str = "python", **params: Any
) -> str:
    """Return a URL presigned by botocore at ``SIGNING_TIME``."""
    with frozen_botocore_clock(signer=signer):
        url: str = client.generate_presigned_url(operation, Params=params, ExpiresIn=expires)
    return url


def botocore_sign_headers(
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]],
    content_sha256: str,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    when: datetime = SIGNING_TIME,
) -> list[tuple[bytes, bytes]]:
    """
    Sign a request with botocore's generic SigV4 signer and a given ``x-amz-content-sha256``.

    Used for payload modes that boto3 never sends (the signed aws-chunked modes). The
    generic signer signs the payload value found in the ``X-Amz-Content-SHA256`` header.
    The path of ``url`` must not need encoding, because this signer normalizes it.
    """
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    request.headers["X-Amz-Content-SHA256"] = content_sha256
    signer = botocore.auth.SigV4Auth(Credentials(access_key, secret_key), "s3", region)
    with frozen_botocore_clock(when):
        signer.add_auth(request)
    result = [(b"Host", urlsplit(url).netloc.encode("ascii"))]
    result.extend(
        (name.encode("latin-1"), str(value).encode("utf-8"))
        for name, value in request.headers.items()
    )
    return result


def signature_of(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """Return the Signature field of the Authorization header."""
    for name, value in headers:
        if name.lower() == b"authorization":
            return value.decode("ascii").rsplit("Signature=", 1)[1]
    raise AssertionError("no Authorization header")


# --- aws-chunked bodies written from the AWS documentation ---


def _hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def reference_signing_key(secret_key: str, date: str, region: str) -> bytes:
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signed_chunked_body(
    chunks: Sequence[bytes],
    seed_signature: str,
    amz_date: str,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    trailers: Sequence[tuple[str, str]] | None = None,
    tamper: Callable[[int, str], str] | None = None,
) -> bytes:
    """
    Encode ``chunks`` as a signed aws-chunked body, with the final empty chunk added.

    :param trailers: (name, value) pairs for a signed trailer, or None for no trailer.
    :param tamper: maps (chunk index, correct signature) to the signature to write, for
        tests of corrupted bodies; the trailer signature has index -1.
    """
    key = reference_signing_key(secret_key, amz_date[:8], region)
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    empty = hashlib.sha256(b"").hexdigest()
    previous = seed_signature
    out = bytearray()
    for index, chunk in enumerate([*chunks, b""]):
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                amz_date,
                scope,
                previous,
                empty,
                hashlib.sha256(chunk).hexdigest(),
            ]
        )
        previous = _hmac_hex(key, string_to_sign)
        written = tamper(index, previous) if tamper else previous
        out += f"{len(chunk):x};chunk-signature={written}\r\n".encode("ascii")
        if chunk:
            out += chunk + b"\r\n"
    if trailers is None:
        out += b"\r\n"
        return bytes(out)
    canonical = "".join(f"{name}:{value}\n" for name, value in sorted(trailers))
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256-TRAILER",
            amz_date,
            scope,
            previous,
            hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        ]
    )
    trailer_signature = _hmac_hex(key, string_to_sign)
    if tamper:
        trailer_signature = tamper(-1, trailer_signature)
    for name, value in trailers:
        out += f"{name}:{value}\r\n".encode("ascii")
    out += f"x-amz-trailer-signature:{trailer_signature}\r\n\r\n".encode("ascii")
    return bytes(out)
