"""
AWS Signature Version 4 for S3: verification of client requests and signing of backend requests.

Verification covers both ways a client can sign: the ``Authorization`` header and presigned
URLs (``X-Amz-Algorithm`` and the other ``X-Amz-*`` parameters in the query string). The
canonical request is built from the request target exactly as it arrived, because S3 neither
normalizes nor double-encodes the path. Signing for backends uses the same canonicalization
code.

The body is verified by the object that ``RequestAuth.payload_verifier()`` returns (see
``proxy.payload``).

Canonical forms that clients produce differently, and which are all accepted:

- Path: the raw path as sent (botocore signs S3 paths unchanged), or the path decoded once
  and re-encoded with the SigV4 rules (MinIO's verifier builds it this way).
- Query: each key and value decoded and re-encoded with the SigV4 rules, reading ``+`` as a
  space as HTML forms do (MinIO's verifier does the same). Or the raw pairs sorted as sent,
  which is how botocore signs the query of a URL. The two differ only for a query that is
  not encoded the canonical way, such as one with a literal ``+``.

Limitations:

- Only ``AWS4-HMAC-SHA256`` is accepted. Signature Version 2, SigV4a (``AWS4-ECDSA-P256-SHA256``)
  and browser POST policy uploads are rejected.
- ``x-amz-security-token`` must be signed like any ``x-amz-*`` header, but its value is not
  checked: users are static access keys, not temporary credentials.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    from proxy.payload import PayloadVerifier

__all__ = [
    "ALGORITHM",
    "AuthError",
    "EMPTY_SHA256",
    "HeadersInput",
    "MAX_CLOCK_SKEW_SECONDS",
    "MAX_PRESIGN_EXPIRES_SECONDS",
    "PRESIGN_QUERY_PARAMETERS",
    "RequestAuth",
    "STREAMING_MODES",
    "STREAMING_SIGNED",
    "STREAMING_SIGNED_TRAILER",
    "STREAMING_UNSIGNED_TRAILER",
    "UNSIGNED_PAYLOAD",
    "chunk_string_to_sign",
    "derive_signing_key",
    "hmac_sha256_hex",
    "sign_request",
    "trailer_string_to_sign",
    "verify_request",
]

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_MODES = frozenset(
    {STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER}
)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# S3 rejects header-signed requests whose time is more than 15 minutes off.
MAX_CLOCK_SKEW_SECONDS = 15 * 60
# S3 accepts presigned URLs valid for at most 7 days.
MAX_PRESIGN_EXPIRES_SECONDS = 7 * 24 * 3600

PRESIGN_QUERY_PARAMETERS = frozenset(
    {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
    }
)
"""Query parameters that carry a presigned URL's signature; never forwarded to a backend."""

# Headers that HTTP clients and proxies add or rewrite, so a backend signature never covers
# them (the list botocore 1.43 uses).
_UNSIGNABLE_HEADERS = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)

# x-amz-* headers that a client may send without signing them: both are part of the string
# to sign in another form (the payload hash and the request time).
_UNSIGNED_AMZ_HEADERS_ALLOWED = frozenset({"x-amz-content-sha256", "x-amz-date"})

_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_PATTERN = re.compile(r"^\d{8}T\d{6}Z$")
_HEX_SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")

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
        ``CanonicalRequest`` (as S3 sends them for ``SignatureDoesNotMatch``). They repeat the
        client's signed header values back to it, so send them but do not log them.
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
    :ivar signing_key: the derived SigV4 key for ``scope``; never log it.
    :ivar content_sha256: the payload mode: a hex SHA-256, ``UNSIGNED-PAYLOAD`` or one of the
        ``STREAMING-*`` values.
    :ivar decoded_content_length: the value of ``x-amz-decoded-content-length`` in bytes for
        an aws-chunked body. It is None if the client did not send it, and for other bodies
        (which use ``Content-Length``).
    :ivar trailer_names: lower-case header names that the client announced in
        ``x-amz-trailer``.
    :ivar checksum_headers: ``x-amz-checksum-<algorithm>`` values that the client sent as
        request headers, lower-case names. The proxy does not check them (the backend does,
        because they are forwarded unchanged); only trailer checksums are checked here.
    :ivar forward_target: the request target to send to a backend. It is the raw target
        without the presigned-URL query parameters (``X-Amz-Algorithm``, ``X-Amz-Signature``
        and the rest), otherwise byte for byte as received, except that bytes a URL cannot
        carry (space, non-ASCII, controls) are percent-encoded. An absolute-form target is
        reduced to its path and query.
    :ivar strip_headers: lower-case names of headers that belong to the client's signature or
        body encoding and must not be forwarded as they are (``authorization``,
        ``x-amz-date``, ``x-amz-content-sha256``, ``x-amz-security-token``,
        ``x-amz-decoded-content-length``, ``x-amz-trailer`` and, for aws-chunked bodies,
        ``content-encoding`` and ``content-length``).
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
    checksum_headers: Mapping[str, str]
    forward_target: bytes
    strip_headers: frozenset[str]
    backend_content_encoding: str | None

    @property
    def is_aws_chunked(self) -> bool:
        """True if the body uses aws-chunked encoding (one of the ``STREAMING-*`` modes)."""
        return self.content_sha256 in STREAMING_MODES

    @property
    def backend_payload_sha256(self) -> str:
        """
        Payload hash to sign backend requests with: the client's literal SHA-256 if it sent
        one (the decoded body is the same bytes), otherwise ``UNSIGNED-PAYLOAD``.
        """
        if _HEX_SHA256_PATTERN.match(self.content_sha256):
            return self.content_sha256.lower()
        return UNSIGNED_PAYLOAD

    def payload_verifier(self) -> PayloadVerifier:
        """
        Create the verifier for this request's body (one per request).

        :return: a ``proxy.payload.PayloadVerifier`` matching ``content_sha256``.
        """
        # Imported here because proxy.payload imports this module.
        from proxy.payload import create_verifier

        return create_verifier(self)


# --- canonicalization, shared by verification and signing ---


def _uri_encode(data: bytes, keep_slash: bool) -> str:
    """Percent-encode every byte except A-Z a-z 0-9 - . _ ~ (and '/' if kept), upper-case hex."""
    return quote_from_bytes(data, safe="/~" if keep_slash else "~")


def _canonical_path_candidates(raw_path: bytes) -> list[bytes]:
    """Return the raw path and, if it differs, the path decoded once and re-encoded."""
    if not raw_path:
        raw_path = b"/"
    reencoded = _uri_encode(unquote_to_bytes(raw_path), keep_slash=True).encode("ascii")
    if reencoded == raw_path:
        return [raw_path]
    return [raw_path, reencoded]


def _split_query(raw_query: bytes) -> list[tuple[bytes, bytes]]:
    """Split a raw query into (key, value) pairs as sent; empty components are skipped."""
    pairs = []
    for component in raw_query.split(b"&"):
        if not component:
            continue
        key, _, value = component.partition(b"=")
        pairs.append((key, value))
    return pairs


def _decode_query_component(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" "))


def _canonical_query_candidates(
    raw_query: bytes, exclude: frozenset[str] = frozenset()
) -> list[bytes]:
    """
    Return the canonical query strings a client may have signed, the SigV4 one first.

    :param exclude: decoded parameter names to leave out (``X-Amz-Signature`` for presigned
        URLs).
    """
    encoded = []
    raw = []
    for key, value in _split_query(raw_query):
        decoded_key = _decode_query_component(key)
        if decoded_key.decode("utf-8", "replace") in exclude:
            continue
        encoded.append(
            (
                _uri_encode(decoded_key, keep_slash=False).encode("ascii"),
                _uri_encode(_decode_query_component(value), keep_slash=False).encode("ascii"),
            )
        )
        raw.append((key, value))
    candidates = [b"&".join(k + b"=" + v for k, v in sorted(encoded))]
    raw_form = b"&".join(k + b"=" + v for k, v in sorted(raw))
    if raw_form != candidates[0]:
        candidates.append(raw_form)
    return candidates


def _canonical_header_value(values: list[bytes]) -> bytes:
    """Trim each value, collapse inner whitespace runs, and join repeated headers with ','."""
    return b",".join(b" ".join(value.split()) for value in values)


def _canonical_request(
    method: str,
    canonical_uri: bytes,
    canonical_query: bytes,
    signed_names: list[str],
    headers: Mapping[str, list[bytes]],
    payload_hash: str,
) -> bytes:
    lines = [method.encode("ascii"), canonical_uri, canonical_query]
    for name in signed_names:
        lines.append(name.encode("ascii") + b":" + _canonical_header_value(headers.get(name, [])))
    lines.append(b"")
    lines.append(";".join(signed_names).encode("ascii"))
    lines.append(payload_hash.encode("ascii"))
    return b"\n".join(lines)


def _string_to_sign(amz_date: str, scope: str, canonical_request: bytes) -> str:
    digest = hashlib.sha256(canonical_request).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def hmac_sha256_hex(key: bytes, message: str) -> str:
    """Return the hex HMAC-SHA256 of ``message`` (UTF-8) under ``key``."""
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def derive_signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    """
    Derive the SigV4 signing key.

    :param secret_key: the secret access key.
    :param date: the scope date, ``YYYYMMDD``.
    :param region: the scope region, for example ``us-east-1``.
    :param service: the scope service.
    :return: the 32-byte HMAC key for the string to sign.
    """
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def chunk_string_to_sign(
    amz_date: str, scope: str, previous_signature: str, chunk_sha256: str
) -> str:
    """Build the string to sign of one aws-chunked chunk (``AWS4-HMAC-SHA256-PAYLOAD``)."""
    return (
        f"{ALGORITHM}-PAYLOAD\n{amz_date}\n{scope}\n{previous_signature}\n"
        f"{EMPTY_SHA256}\n{chunk_sha256}"
    )


def trailer_string_to_sign(
    amz_date: str, scope: str, previous_signature: str, canonical_trailers: bytes
) -> str:
    """
    Build the string to sign of an aws-chunked trailer (``AWS4-HMAC-SHA256-TRAILER``).

    :param canonical_trailers: each trailer as ``name:value\\n``, names lower case and sorted.
    """
    digest = hashlib.sha256(canonical_trailers).hexdigest()
    return f"{ALGORITHM}-TRAILER\n{amz_date}\n{scope}\n{previous_signature}\n{digest}"


def _format_amz_date(seconds: float) -> str:
    return time.strftime(_AMZ_DATE_FORMAT, time.gmtime(seconds))


def _parse_amz_date(value: str) -> float | None:
    if not _AMZ_DATE_PATTERN.match(value):
        return None
    try:
        return float(calendar.timegm(time.strptime(value, _AMZ_DATE_FORMAT)))
    except ValueError:
        return None


# --- request parsing ---


def _collect_headers(headers: HeadersInput) -> dict[str, list[bytes]]:
    """Map lower-case header names to their raw values in arrival order."""
    collected: dict[str, list[bytes]] = {}
    pairs: Iterator[tuple[bytes, bytes]]
    if isinstance(headers, Headers):
        pairs = ((name, value) for name, values in headers.getAllRawHeaders() for value in values)
    else:
        pairs = iter(headers)
    for name, value in pairs:
        key = name.decode("latin-1").lower()
        collected.setdefault(key, []).append(value)
    return collected


def _header_text(headers: Mapping[str, list[bytes]], name: str) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    return ",".join(v.decode("latin-1").strip() for v in values)


def _split_target(raw_target: bytes) -> tuple[bytes, bytes, bool]:
    """Return (raw path, raw query, whether '?' was present) of an origin- or absolute-form URI."""
    target = raw_target
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        after_scheme = target.index(b"//") + 2
        slash = target.find(b"/", after_scheme)
        question = target.find(b"?", after_scheme)
        if slash == -1 or (question != -1 and question < slash):
            target = b"/" + (target[question:] if question != -1 else b"")
        else:
            target = target[slash:]
    path, question_mark, query = target.partition(b"?")
    # A fragment never reaches a server, but strip one defensively.
    query = query.partition(b"#")[0]
    return path, query, bool(question_mark)


def _query_parameters(raw_query: bytes) -> dict[str, list[str]]:
    parameters: dict[str, list[str]] = {}
    for key, value in _split_query(raw_query):
        name = _decode_query_component(key).decode("utf-8", "replace")
        text = _decode_query_component(value).decode("utf-8", "replace")
        parameters.setdefault(name, []).append(text)
    return parameters


# Bytes that may not appear unescaped in a URL (RFC 3986): controls, space, non-ASCII and
# a few delimiters. Clients sometimes send them raw; they are escaped before forwarding.
_UNSAFE_URL_BYTES = re.compile(rb'[\x00-\x20\x7f-\xff"<>\\^`{|}]')


def _escape_unsafe(target: bytes) -> bytes:
    """Percent-encode the bytes of ``target`` that a URL cannot carry; keep everything else."""
    return _UNSAFE_URL_BYTES.sub(lambda match: b"%%%02X" % match.group()[0], target)


def _forward_target(path: bytes, raw_query: bytes, had_query: bool, presigned: bool) -> bytes:
    if not presigned:
        return _escape_unsafe(path + (b"?" + raw_query if had_query else b""))
    kept = [
        component
        for component in raw_query.split(b"&")
        if component
        and _decode_query_component(component.partition(b"=")[0]).decode("utf-8", "replace")
        not in PRESIGN_QUERY_PARAMETERS
    ]
    return _escape_unsafe(path + (b"?" + b"&".join(kept) if kept else b""))


@dataclass(frozen=True)
class _Credential:
    access_key: str
    date: str
    region: str
    service: str
    terminal: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{self.terminal}"


def _malformed(kind: Literal["header", "presigned"], message: str, **details: str) -> AuthError:
    if kind == "header":
        return AuthError(
            "AuthorizationHeaderMalformed",
            f"The authorization header is malformed; {message}",
            400,
            details,
        )
    return AuthError("AuthorizationQueryParametersError", message, 400, details)


def _parse_credential(kind: Literal["header", "presigned"], value: str, region: str) -> _Credential:
    parts = value.split("/")
    if len(parts) != 5 or not all(parts):
        raise _malformed(
            kind,
            f"the Credential {value!r} is malformed; expected "
            "'<access-key-id>/<YYYYMMDD>/<region>/s3/aws4_request'.",
        )
    credential = _Credential(*parts)
    if not re.match(r"^\d{8}$", credential.date):
        raise _malformed(kind, f"the credential date {credential.date!r} is not YYYYMMDD.")
    if credential.region != region:
        raise _malformed(
            kind,
            f"the region {credential.region!r} is wrong; expecting {region!r}",
            Region=region,
        )
    if credential.service != "s3":
        raise _malformed(
            kind, f"incorrect service {credential.service!r}. This endpoint belongs to 's3'."
        )
    if credential.terminal != "aws4_request":
        raise _malformed(
            kind,
            f"incorrect terminal {credential.terminal!r}. This endpoint uses 'aws4_request'.",
        )
    return credential


def _parse_signed_headers(kind: Literal["header", "presigned"], value: str) -> list[str]:
    names = value.split(";")
    if not value or any(not name or name != name.strip().lower() for name in names):
        raise _malformed(
            kind, f"SignedHeaders {value!r} must be lower-case header names separated by ';'."
        )
    if "host" not in names:
        raise _malformed(kind, "the host header must be signed (add 'host' to SignedHeaders).")
    return names


def _parse_authorization(value: str) -> tuple[str, str, str]:
    """Return (Credential, SignedHeaders, Signature) of an ``AWS4-HMAC-SHA256`` header value."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AuthError(
            "InvalidRequest",
            f"The authorization mechanism {algorithm!r} is not supported. Please use {ALGORITHM}.",
            400,
        )
    fields: dict[str, str] = {}
    for component in rest.split(","):
        name, equals, field_value = component.strip().partition("=")
        if not equals:
            raise _malformed("header", f"the component {component.strip()!r} has no '='.")
        fields[name] = field_value
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if name not in fields]
    if missing:
        raise _malformed("header", f"missing {', '.join(missing)}.")
    return fields["Credential"], fields["SignedHeaders"], fields["Signature"]


def _validate_content_sha256(value: str) -> str:
    if value in (
        UNSIGNED_PAYLOAD,
        STREAMING_SIGNED,
        STREAMING_SIGNED_TRAILER,
        STREAMING_UNSIGNED_TRAILER,
    ) or _HEX_SHA256_PATTERN.match(value):
        return value
    raise AuthError(
        "InvalidArgument",
        f"x-amz-content-sha256 {value!r} is invalid; it must be UNSIGNED-PAYLOAD, "
        f"{STREAMING_UNSIGNED_TRAILER}, {STREAMING_SIGNED}, {STREAMING_SIGNED_TRAILER} "
        "or a hex SHA-256 of the body.",
        400,
        {"ArgumentName": "x-amz-content-sha256", "ArgumentValue": value},
    )


# --- verification ---


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
    :raises AuthError: ``AccessDenied`` (403) without any signature, for an expired presigned
        URL, without a request time, or with unsigned ``x-amz-*`` headers;
        ``InvalidAccessKeyId`` (403); ``SignatureDoesNotMatch`` (403);
        ``RequestTimeTooSkewed`` (403) if a header-signed request is more than 15 minutes
        off ``now``; ``AuthorizationHeaderMalformed`` (400) or
        ``AuthorizationQueryParametersError`` (400) for a malformed credential, wrong
        region, missing or incomplete ``SignedHeaders``; ``InvalidArgument`` (400) for an
        invalid ``x-amz-content-sha256`` or more than one signature mechanism;
        ``InvalidRequest`` (400) for a missing ``x-amz-content-sha256``, an unsupported
        algorithm or an unsupported trailer checksum.
    """
    header_map = _collect_headers(headers)
    path, raw_query, had_query = _split_target(raw_target)
    query = _query_parameters(raw_query)
    authorization = _header_text(header_map, "authorization")

    if authorization is not None and "X-Amz-Algorithm" in query:
        raise AuthError(
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
            "Signature query string parameter or the Authorization header should be specified.",
            400,
            {"ArgumentName": "Authorization"},
        )
    if authorization is not None:
        kind: Literal["header", "presigned"] = "header"
        parsed = _parse_header_auth(authorization, header_map, now)
    elif "X-Amz-Algorithm" in query:
        kind = "presigned"
        parsed = _parse_presigned_auth(query, now)
    elif "Signature" in query and "AWSAccessKeyId" in query:
        raise AuthError(
            "InvalidRequest",
            f"Signature Version 2 presigned URLs are not supported. Please use {ALGORITHM}.",
            400,
        )
    else:
        raise AuthError("AccessDenied", "Access Denied: the request is not signed.", 403)

    credential_value, signed_headers_value, signature, amz_date = parsed
    credential = _parse_credential(kind, credential_value, region)
    signed_names = _parse_signed_headers(kind, signed_headers_value)
    if credential.date != amz_date[:8]:
        raise _malformed(
            kind,
            f"Invalid credential date {credential.date!r}. "
            f"Date is not the same as X-Amz-Date {amz_date!r}.",
        )
    _check_unsigned_amz_headers(header_map, signed_names)

    content_sha256 = _payload_mode(kind, header_map)
    secret_key = users.get(credential.access_key)
    if secret_key is None:
        raise AuthError(
            "InvalidAccessKeyId",
            f"The access key id {credential.access_key!r} does not exist in our records.",
            403,
            {"AWSAccessKeyId": credential.access_key},
        )

    signing_key = derive_signing_key(
        secret_key, credential.date, credential.region, credential.service
    )
    _check_signature(
        method,
        path,
        raw_query,
        kind,
        signed_names,
        header_map,
        content_sha256,
        amz_date,
        credential,
        signing_key,
        signature,
    )
    return _build_auth(
        kind,
        credential,
        amz_date,
        signature,
        signing_key,
        content_sha256,
        header_map,
        path,
        raw_query,
        had_query,
    )


def _parse_header_auth(
    authorization: str, header_map: Mapping[str, list[bytes]], now: float
) -> tuple[str, str, str, str]:
    credential, signed_headers, signature = _parse_authorization(authorization)

    # x-amz-date wins over Date; with only Date, the string to sign carries its time in
    # ISO 8601 basic format.
    amz_date_header = _header_text(header_map, "x-amz-date")
    date_header = _header_text(header_map, "date")
    if amz_date_header is not None:
        request_time = _parse_amz_date(amz_date_header)
        amz_date = amz_date_header
    elif date_header is not None:
        request_time = _parse_http_date(date_header)
        amz_date = _format_amz_date(request_time) if request_time is not None else ""
    else:
        request_time = None
        amz_date = ""
    if request_time is None:
        raise AuthError(
            "AccessDenied",
            "AWS authentication requires a valid Date or x-amz-date header "
            "(x-amz-date as YYYYMMDDTHHMMSSZ).",
            403,
        )

    if abs(now - request_time) > MAX_CLOCK_SKEW_SECONDS:
        raise AuthError(
            "RequestTimeTooSkewed",
            f"The difference between the request time {amz_date} and the server time "
            f"{_format_amz_date(now)} is too large; the maximum is "
            f"{MAX_CLOCK_SKEW_SECONDS} seconds. Check the client's clock.",
            403,
            {
                "RequestTime": amz_date,
                "ServerTime": _format_amz_date(now),
                "MaxAllowedSkewMilliseconds": str(MAX_CLOCK_SKEW_SECONDS * 1000),
            },
        )
    return credential, signed_headers, signature, amz_date


def _parse_http_date(value: str) -> float | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return float(calendar.timegm(parsed.timetuple()))
    return parsed.timestamp()


def _parse_presigned_auth(query: Mapping[str, list[str]], now: float) -> tuple[str, str, str, str]:
    required = (
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Signature",
        "X-Amz-Date",
        "X-Amz-SignedHeaders",
        "X-Amz-Expires",
    )
    if any(len(query.get(name, [])) != 1 for name in required):
        raise _malformed(
            "presigned",
            "Query-string authentication version 4 requires the X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
            "X-Amz-Expires parameters, each exactly once.",
        )
    if query["X-Amz-Algorithm"][0] != ALGORITHM:
        raise _malformed(
            "presigned",
            f"X-Amz-Algorithm only supports {ALGORITHM!r}.",
        )
    amz_date = query["X-Amz-Date"][0]
    request_time = _parse_amz_date(amz_date)
    if request_time is None:
        raise _malformed(
            "presigned", f"X-Amz-Date {amz_date!r} must be in the ISO8601 format YYYYMMDDTHHMMSSZ."
        )
    expires_text = query["X-Amz-Expires"][0]
    if not expires_text.isdigit():
        raise _malformed(
            "presigned", f"X-Amz-Expires {expires_text!r} must be a non-negative integer."
        )
    expires = int(expires_text)
    if expires > MAX_PRESIGN_EXPIRES_SECONDS:
        raise _malformed(
            "presigned",
            f"X-Amz-Expires {expires} must be less than a week (in seconds) that is "
            f"{MAX_PRESIGN_EXPIRES_SECONDS}.",
        )

    # Expiry is checked apart from clock skew: a URL is valid from its X-Amz-Date (less the
    # allowed skew, for clients whose clock runs ahead) until X-Amz-Date + X-Amz-Expires.
    if now > request_time + expires:
        raise AuthError(
            "AccessDenied",
            "Request has expired.",
            403,
            {
                "X-Amz-Expires": str(expires),
                "Expires": _format_amz_date(request_time + expires),
                "ServerTime": _format_amz_date(now),
            },
        )
    if request_time - now > MAX_CLOCK_SKEW_SECONDS:
        raise AuthError(
            "AccessDenied",
            f"Request is not valid yet: X-Amz-Date {amz_date} is in the future.",
            403,
            {"ServerTime": _format_amz_date(now)},
        )
    return (
        query["X-Amz-Credential"][0],
        query["X-Amz-SignedHeaders"][0],
        query["X-Amz-Signature"][0],
        amz_date,
    )


def _check_unsigned_amz_headers(
    header_map: Mapping[str, list[bytes]], signed_names: list[str]
) -> None:
    signed = set(signed_names)
    unsigned = sorted(
        name
        for name in header_map
        if name.startswith("x-amz-")
        and name not in signed
        and name not in _UNSIGNED_AMZ_HEADERS_ALLOWED
    )
    if unsigned:
        raise AuthError(
            "AccessDenied",
            "There were headers present in the request which were not signed: "
            f"{', '.join(unsigned)}. Sign every x-amz-* header.",
            403,
            {"HeadersNotSigned": ", ".join(unsigned)},
        )


def _payload_mode(
    kind: Literal["header", "presigned"], header_map: Mapping[str, list[bytes]]
) -> str:
    value = _header_text(header_map, "x-amz-content-sha256")
    if value is None:
        if kind == "presigned":
            return UNSIGNED_PAYLOAD
        raise AuthError(
            "InvalidRequest",
            "Missing required header for this request: x-amz-content-sha256.",
            400,
        )
    value = _validate_content_sha256(value)
    if kind == "presigned" and value in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        raise AuthError(
            "InvalidArgument",
            f"x-amz-content-sha256 {value!r} needs a header signature to chain chunk "
            "signatures from; presigned URLs cannot use it.",
            400,
            {"ArgumentName": "x-amz-content-sha256", "ArgumentValue": value},
        )
    return value


def _check_signature(
    method: str,
    path: bytes,
    raw_query: bytes,
    kind: Literal["header", "presigned"],
    signed_names: list[str],
    header_map: Mapping[str, list[bytes]],
    content_sha256: str,
    amz_date: str,
    credential: _Credential,
    signing_key: bytes,
    signature: str,
) -> None:
    exclude = frozenset({"X-Amz-Signature"}) if kind == "presigned" else frozenset()
    # Presigned URLs sign UNSIGNED-PAYLOAD unless the client sent x-amz-content-sha256.
    payload_hash = _header_text(header_map, "x-amz-content-sha256") or UNSIGNED_PAYLOAD
    try:
        provided = signature.encode("ascii")
    except UnicodeEncodeError:
        provided = b""

    first: tuple[bytes, str] | None = None
    for canonical_uri in _canonical_path_candidates(path):
        for canonical_query in _canonical_query_candidates(raw_query, exclude):
            canonical = _canonical_request(
                method, canonical_uri, canonical_query, signed_names, header_map, payload_hash
            )
            string_to_sign = _string_to_sign(amz_date, credential.scope, canonical)
            expected = hmac_sha256_hex(signing_key, string_to_sign).encode("ascii")
            if hmac.compare_digest(expected, provided):
                return
            if first is None:
                first = (canonical, string_to_sign)

    assert first is not None
    canonical, string_to_sign = first
    raise AuthError(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
        403,
        {
            "AWSAccessKeyId": credential.access_key,
            "StringToSign": string_to_sign,
            "CanonicalRequest": canonical.decode("utf-8", "replace"),
        },
    )


def _build_auth(
    kind: Literal["header", "presigned"],
    credential: _Credential,
    amz_date: str,
    signature: str,
    signing_key: bytes,
    content_sha256: str,
    header_map: Mapping[str, list[bytes]],
    path: bytes,
    raw_query: bytes,
    had_query: bool,
) -> RequestAuth:
    # Imported here because proxy.payload imports this module.
    from proxy.payload import is_checksum_header

    chunked = content_sha256 in STREAMING_MODES
    strip = {
        "authorization",
        "x-amz-date",
        "x-amz-content-sha256",
        "x-amz-security-token",
        "x-amz-decoded-content-length",
        "x-amz-trailer",
    }

    decoded_length = None
    trailer_names: tuple[str, ...] = ()
    content_encoding = _header_text(header_map, "content-encoding")
    if chunked:
        strip.update({"content-encoding", "content-length"})
        decoded_length = _decoded_content_length(content_sha256, header_map)
        trailer_names = _trailer_names(content_sha256, header_map)
        remaining = [
            token.strip()
            for token in (content_encoding or "").split(",")
            if token.strip() and token.strip().lower() != "aws-chunked"
        ]
        content_encoding = ",".join(remaining) or None

    checksum_headers = {
        name: values[-1].decode("latin-1").strip()
        for name, values in header_map.items()
        if is_checksum_header(name)
    }

    return RequestAuth(
        access_key=credential.access_key,
        kind=kind,
        amz_date=amz_date,
        scope=credential.scope,
        signature=signature,
        signing_key=signing_key,
        content_sha256=content_sha256,
        decoded_content_length=decoded_length,
        trailer_names=trailer_names,
        checksum_headers=checksum_headers,
        forward_target=_forward_target(path, raw_query, had_query, kind == "presigned"),
        strip_headers=frozenset(strip),
        backend_content_encoding=content_encoding,
    )


def _decoded_content_length(
    content_sha256: str, header_map: Mapping[str, list[bytes]]
) -> int | None:
    text = _header_text(header_map, "x-amz-decoded-content-length")
    if text is None:
        if content_sha256 in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
            raise AuthError(
                "MissingContentLength",
                f"x-amz-content-sha256 {content_sha256} requires the "
                "x-amz-decoded-content-length header (the object size in bytes).",
                411,
            )
        return None
    if not text.isdigit():
        raise AuthError(
            "InvalidArgument",
            f"x-amz-decoded-content-length {text!r} is invalid; it must be the object size "
            "in bytes.",
            400,
            {"ArgumentName": "x-amz-decoded-content-length", "ArgumentValue": text},
        )
    return int(text)


def _trailer_names(content_sha256: str, header_map: Mapping[str, list[bytes]]) -> tuple[str, ...]:
    from proxy.payload import validate_checksum_name

    if content_sha256 not in (STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER):
        return ()
    text = _header_text(header_map, "x-amz-trailer") or ""
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    if not names:
        raise AuthError(
            "InvalidRequest",
            f"x-amz-content-sha256 {content_sha256} requires the x-amz-trailer header "
            "naming the trailing checksum, for example x-amz-checksum-crc32.",
            400,
        )
    for name in names:
        validate_checksum_name(name, "trailer")
    return names


# --- signing ---


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

    All given headers are signed except hop-by-hop headers and ``User-Agent``, which HTTP
    clients and proxies rewrite. The ``host`` header is derived from ``url`` (default ports
    omitted) unless the headers contain one.

    :param method: the HTTP method, upper case.
    :param url: the exact URL that goes on the wire, already percent-encoded. Its path is
        used without decoding or re-encoding; its query is canonicalized like a client's.
    :param headers: the headers to send, names in any case, values as the wire bytes decoded
        as ISO-8859-1 (how Twisted's ``Headers`` and http.client encode text). Existing
        ``Authorization``, ``X-Amz-Date`` and ``X-Amz-Content-SHA256`` headers are replaced.
    :param payload_sha256: hex SHA-256 of the body, or ``UNSIGNED-PAYLOAD``.
    :param access_key: the backend's access key id.
    :param secret_key: the backend's secret access key.
    :param region: the backend's region.
    :param now: the signing time, POSIX seconds.
    :param service: the scope service.
    :return: a new dict with ``headers`` plus ``Host`` (if it was missing), ``X-Amz-Date``,
        ``X-Amz-Content-SHA256`` and ``Authorization``.
    :raises ValueError: if ``url`` is not percent-encoded ASCII or a header value has a
        character above U+00FF.
    """
    parts = urlsplit(url)
    replaced = {"authorization", "x-amz-date", "x-amz-content-sha256"}
    result = {name: value for name, value in headers.items() if name.lower() not in replaced}
    if not any(name.lower() == "host" for name in result):
        result["Host"] = _host_header(parts.scheme, parts.netloc)
    amz_date = _format_amz_date(now)
    result["X-Amz-Date"] = amz_date
    result["X-Amz-Content-SHA256"] = payload_sha256

    # The canonical request must hold the bytes that go on the wire, and Twisted and
    # http.client send header values encoded as ISO-8859-1.
    to_sign: dict[str, list[bytes]] = {}
    for name, value in result.items():
        lowered = name.lower()
        if lowered not in _UNSIGNABLE_HEADERS:
            try:
                encoded = value.encode("latin-1")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"header {name!r} value {value!r} has characters above U+00FF; pass the "
                    "wire bytes decoded as ISO-8859-1"
                ) from error
            to_sign.setdefault(lowered, []).append(encoded)
    signed_names = sorted(to_sign)

    try:
        path = parts.path.encode("ascii") or b"/"
        raw_query = parts.query.encode("ascii")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"URL {url!r} is not percent-encoded; encode the path and query before signing"
        ) from error
    canonical_query = _canonical_query_candidates(raw_query)[0]
    canonical = _canonical_request(
        method, path, canonical_query, signed_names, to_sign, payload_sha256
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    signing_key = derive_signing_key(secret_key, amz_date[:8], region, service)
    signature = hmac_sha256_hex(signing_key, _string_to_sign(amz_date, scope, canonical))
    result["Authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed_names)}, Signature={signature}"
    )
    return result


def _host_header(scheme: str, netloc: str) -> str:
    """Return the Host header value for a URL authority, without userinfo or a default port."""
    host = netloc.rpartition("@")[2]
    default_suffix = {"http": ":80", "https": ":443"}.get(scheme.lower())
    if default_suffix is not None and host.endswith(default_suffix):
        host = host[: -len(default_suffix)]
    return host
