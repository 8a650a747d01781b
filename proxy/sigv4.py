"""
AWS Signature Version 4 for S3: verification of client requests and signing of backend requests.

Verification covers both ways a client can sign: the ``Authorization`` header and presigned
URLs (``X-Amz-Algorithm`` and friends in the query string). The canonical request is built from
the request target exactly as it arrived, because S3 neither normalizes nor double-encodes the
path. Signing for backends uses the same canonicalization code.

The body is verified by the object that ``RequestAuth.payload_verifier()`` returns (see
``proxy.payload``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    from proxy.payload import PayloadVerifier

__all__ = [
    "ALGORITHM",
    "AuthError",
    "HeadersInput",
    "MAX_CLOCK_SKEW_SECONDS",
    "MAX_PRESIGN_EXPIRES_SECONDS",
    "RequestAuth",
    "STREAMING_SIGNED",
    "STREAMING_SIGNED_TRAILER",
    "STREAMING_UNSIGNED_TRAILER",
    "UNSIGNED_PAYLOAD",
    "derive_signing_key",
    "sign_request",
    "verify_request",
]

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

# S3 rejects header-signed requests whose time is more than 15 minutes off.
MAX_CLOCK_SKEW_SECONDS = 15 * 60
# S3 accepts presigned URLs valid for at most 7 days.
MAX_PRESIGN_EXPIRES_SECONDS = 7 * 24 * 3600

HeadersInput = Headers | Iterable[tuple[bytes, bytes]]
"""Request headers: Twisted ``Headers`` or (name, value) byte pairs in arrival order."""


class AuthError(Exception):
    """
    A request failed authentication; the gateway renders it as an S3 XML error.

    :ivar code: the S3 error code, for example ``"SignatureDoesNotMatch"``.
    :ivar message: a human-readable reason. It never contains a secret key or the expected
        signature. It may name the access key id.
    :ivar status: the HTTP status to send, for example 403.
    :ivar details: extra elements for the XML error body, such as ``StringToSign`` and
        ``CanonicalRequest`` (as S3 sends them for ``SignatureDoesNotMatch``).
    """

    def __init__(
        self, code: str, message: str, status: int, details: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(code, message, status)
        self.code = code
        self.message = message
        self.status = status
        self.details: dict[str, str] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code} ({self.status}): {self.message}"


@dataclass(frozen=True)
class RequestAuth:
    """
    The result of a successful signature check.

    :ivar access_key: the access key id that signed the request.
    :ivar kind: ``"header"`` for the ``Authorization`` header, ``"presigned"`` for a query
        string signature.
    :ivar amz_date: the request time as ISO 8601 basic format, ``20130524T000000Z``.
    :ivar scope: the credential scope, ``20130524/us-east-1/s3/aws4_request``.
    :ivar signature: the verified request signature (hex). It seeds the chunk signature
        chain; never log it.
    :ivar content_sha256: the payload mode: a hex SHA-256, ``UNSIGNED-PAYLOAD`` or one of the
        ``STREAMING-*`` values.
    :ivar decoded_content_length: for aws-chunked bodies, the value of
        ``x-amz-decoded-content-length`` in bytes, or None if the client did not send it; for
        other bodies None (use ``Content-Length``).
    :ivar trailer_names: lower-case header names that the client announced in
        ``x-amz-trailer``.
    :ivar forward_target: the request target to send to a backend: the raw target without
        the presigned-URL query parameters (``X-Amz-Algorithm``, ``X-Amz-Signature`` and the
        rest), otherwise byte for byte as received.
    :ivar strip_headers: lower-case names of headers that belong to the client's signature or
        body encoding and must not be forwarded as they are (``authorization``,
        ``x-amz-date``, ``x-amz-content-sha256``, ``x-amz-decoded-content-length``,
        ``x-amz-trailer`` and, for aws-chunked bodies, ``content-encoding`` and
        ``content-length``).
    :ivar backend_content_encoding: the ``Content-Encoding`` to forward after removing
        ``aws-chunked``, or None if nothing remains.
    """

    access_key: str
    kind: Literal["header", "presigned"]
    amz_date: str
    scope: str
    signature: str = field(repr=False)
    signing_key: bytes = field(repr=False)
    content_sha256: str
    decoded_content_length: int | None
    trailer_names: tuple[str, ...]
    forward_target: bytes
    strip_headers: frozenset[str]
    backend_content_encoding: str | None

    @property
    def is_aws_chunked(self) -> bool:
        """True if the body uses aws-chunked encoding (one of the ``STREAMING-*`` modes)."""
        raise NotImplementedError

    @property
    def backend_payload_sha256(self) -> str:
        """
        Payload hash to sign backend requests with: the client's literal SHA-256 if it sent
        one (the decoded body is the same bytes), otherwise ``UNSIGNED-PAYLOAD``.
        """
        raise NotImplementedError

    def payload_verifier(self) -> PayloadVerifier:
        """
        Create the verifier for this request's body (one per request).

        :return: a ``proxy.payload.PayloadVerifier`` matching ``content_sha256``.
        """
        raise NotImplementedError


def derive_signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    """
    Derive the SigV4 signing key.

    :param secret_key: the secret access key.
    :param date: the scope date, ``YYYYMMDD``.
    :param region: the scope region, for example ``us-east-1``.
    :param service: the scope service.
    :return: the 32-byte HMAC key for the string to sign.
    """
    raise NotImplementedError


def verify_request(
    method: str,
    raw_target: bytes,
    headers: HeadersInput,
    users: Mapping[str, str],
    now: float,
    region: str,
) -> RequestAuth:
    """
    Verify the SigV4 signature of a client request, from its header or presigned query.

    The body is not read here; verify it with ``RequestAuth.payload_verifier()``.

    :param method: the HTTP method, upper case (``"GET"``).
    :param raw_target: the request target exactly as received (Twisted's ``request.uri``):
        the path as sent plus the raw query string. An absolute-form target
        (``http://host/path``) is accepted and its path used.
    :param headers: the request headers: Twisted ``Headers`` (``request.requestHeaders``) or
        (name, value) byte pairs in arrival order. Repeated headers are joined with commas
        in arrival order, as SigV4 requires.
    :param users: access key id -> secret access key.
    :param now: the current time, POSIX seconds (``clock.seconds()``).
    :param region: the region clients must sign for.
    :return: the verified authentication state.
    :raises AuthError: ``AccessDenied`` (403) without any signature or for an expired
        presigned URL; ``InvalidAccessKeyId`` (403); ``SignatureDoesNotMatch`` (403);
        ``RequestTimeTooSkewed`` (403) if a header-signed request is more than 15 minutes
        off ``now``; ``AuthorizationHeaderMalformed`` (400) or
        ``AuthorizationQueryParametersError`` (400) for a malformed credential, wrong
        region, missing or incomplete ``SignedHeaders``; ``InvalidArgument`` (400) for an
        invalid ``x-amz-content-sha256`` or more than one signature mechanism;
        ``InvalidRequest`` (400) for a missing ``x-amz-content-sha256`` or an unsupported
        algorithm.
    """
    raise NotImplementedError


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    now: float,
    service: str = "s3",
) -> dict[str, str]:
    """
    Sign a backend request with SigV4 in the ``Authorization`` header.

    All given headers are signed, with the ``host`` header derived from ``url`` unless the
    headers contain one. Pass only headers that will be sent unchanged: a hop-by-hop header
    that an HTTP client rewrites would break the signature.

    :param method: the HTTP method, upper case.
    :param url: the exact URL that goes on the wire, already percent-encoded. Its path and
        query are used without decoding or re-encoding the path.
    :param headers: the headers to send, names in any case.
    :param payload_sha256: hex SHA-256 of the body, or ``UNSIGNED-PAYLOAD``.
    :param access_key: the backend's access key id.
    :param secret_key: the backend's secret access key.
    :param region: the backend's region.
    :param now: the signing time, POSIX seconds.
    :param service: the scope service.
    :return: a new dict with ``headers`` plus ``Host`` (if it was missing), ``X-Amz-Date``,
        ``X-Amz-Content-SHA256`` and ``Authorization``.
    """
    raise NotImplementedError
