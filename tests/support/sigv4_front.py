"""
A SigV4-verifying HTTP front for a test S3 backend (moto accepts any signature).

The front listens on 127.0.0.1, recomputes the signature of every request with botocore's
S3 signer (``botocore.auth.S3SigV4Auth``) from the request's own ``X-Amz-Date``, signed
headers and raw path, and forwards verified requests unchanged to the backend. Rejected
requests get a 403 ``SignatureDoesNotMatch`` XML error (or another S3 error code) and never
reach the backend. It never imports ``proxy``: a bug shared by the proxy's signer and
verifier cannot hide behind it.

It also counts requests, so tests can assert how many GETs reached the backend::

    front = start_front(s3_server.endpoint, "backend-key", "backend-secret", "us-east-1")
    ...
    assert front.stats.requests("GET", "/bucket/key") == 1
    front.stop()

Limitations: bodies are buffered in memory on both legs. An aws-chunked body is forwarded
without checking its chunk signatures, because the proxy sends decoded bodies to backends.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

__all__ = [
    "FrontStats",
    "SigV4Front",
    "Verdict",
    "sigv4_front_factory",
    "start_front",
    "verify_with_botocore",
]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_STREAMING_PREFIX = "STREAMING-"
_BAD_REQUEST_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "InvalidRequest", "XAmzContentSHA256Mismatch"}
)


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one request's signature."""

    ok: bool
    code: str = ""
    message: str = ""
    access_key: str | None = None

    @property
    def status(self) -> int:
        """The HTTP status S3 sends with ``code``."""
        return 400 if self.code in _BAD_REQUEST_CODES else 403


class _ReceivedRequestSigner(botocore.auth.S3SigV4Auth):
    """botocore's S3 signer with the payload hash taken from the received request."""

    def __init__(self, credentials: Credentials, region: str, payload_hash: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_hash = payload_hash

    def payload(self, request: AWSRequest) -> str:
        return self._payload_hash


def _parse_authorization(value: str) -> dict[str, str] | None:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return None
    fields = {}
    for component in rest.split(","):
        name, _, field_value = component.strip().partition("=")
        fields[name] = field_value
    if not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
        return None
    return fields


def _amz_date_from_http_date(value: str) -> str | None:
    try:
        return parsedate_to_datetime(value).strftime("%Y%m%dT%H%M%SZ")
    except (TypeError, ValueError, IndexError):
        return None


def verify_with_botocore(
    method: str,
    raw_target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
    credentials: Mapping[str, str],
    region: str,
) -> Verdict:
    """
    Check a request's SigV4 signature (header or presigned query) with botocore's signer.

    :param raw_target: the request target as received, path and query.
    :param headers: received (name, value) pairs, values as text.
    :param body: the body, to check a literal ``x-amz-content-sha256``; None skips the check.
    :param credentials: access key id -> secret key.
    :param region: the region the signature must be scoped to.
    """
    lowered: dict[str, list[str]] = {}
    for name, value in headers:
        lowered.setdefault(name.lower(), []).append(value)
    path, _, query = raw_target.partition("?")
    query_pairs = parse_qsl(query, keep_blank_values=True)
    query_names = {name for name, _ in query_pairs}

    # Find the signature, its scope and the signed header names.
    if "authorization" in lowered:
        fields = _parse_authorization(lowered["authorization"][0])
        if fields is None:
            return Verdict(False, "AccessDenied", "unsupported Authorization header")
        credential, signed_headers, signature = (
            fields["Credential"],
            fields["SignedHeaders"],
            fields["Signature"],
        )
        amz_date = lowered.get("x-amz-date", [None])[0] or _amz_date_from_http_date(
            lowered.get("date", [""])[0]
        )
        payload_hash = lowered.get("x-amz-content-sha256", [None])[0]
        if payload_hash is None:
            return Verdict(False, "InvalidRequest", "missing x-amz-content-sha256")
        presigned = False
    elif "X-Amz-Signature" in query_names:
        values = dict(query_pairs)
        credential = values.get("X-Amz-Credential", "")
        signed_headers = values.get("X-Amz-SignedHeaders", "")
        signature = values["X-Amz-Signature"]
        amz_date = values.get("X-Amz-Date")
        payload_hash = lowered.get("x-amz-content-sha256", ["UNSIGNED-PAYLOAD"])[0]
        presigned = True
    else:
        return Verdict(False, "AccessDenied", "the request is not signed")
    if not amz_date:
        return Verdict(False, "AccessDenied", "no request time")

    scope = credential.split("/")
    if len(scope) != 5 or scope[2:] != [region, "s3", "aws4_request"] or scope[1] != amz_date[:8]:
        return Verdict(
            False, "AuthorizationHeaderMalformed", f"credential {credential!r} is not for {region}"
        )
    access_key = scope[0]
    secret_key = credentials.get(access_key)
    if secret_key is None:
        return Verdict(False, "InvalidAccessKeyId", f"unknown access key {access_key!r}")
    names = signed_headers.split(";")
    if "host" not in names:
        return Verdict(False, "AuthorizationHeaderMalformed", "host is not signed", access_key)

    # Recompute the signature with botocore from the received pieces only.
    signer = _ReceivedRequestSigner(Credentials(access_key, secret_key), region, payload_hash)
    for request in _botocore_requests(method, path, query_pairs, query, presigned, names, lowered):
        request.context["timestamp"] = amz_date
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace")):
            break
    else:
        return Verdict(False, "SignatureDoesNotMatch", "signature mismatch", access_key)

    if (
        body is not None
        and len(payload_hash) == 64
        and not payload_hash.startswith(_STREAMING_PREFIX)
    ):
        if hashlib.sha256(body).hexdigest() != payload_hash.lower():
            return Verdict(
                False, "XAmzContentSHA256Mismatch", "body does not match its hash", access_key
            )
    return Verdict(True, access_key=access_key)


def _botocore_requests(
    method: str,
    path: str,
    query_pairs: list[tuple[str, str]],
    raw_query: str,
    presigned: bool,
    signed_names: list[str],
    headers: Mapping[str, list[str]],
) -> Iterator[AWSRequest]:
    """
    Yield the request as botocore would have signed it, raw query first.

    botocore canonicalizes a query from the URL as sent, or re-encodes it from parameters.
    A backend request whose query is not in canonical form may have been signed either way.
    """
    host = headers.get("host", [""])[0]
    kept_raw = "&".join(
        part
        for part in raw_query.split("&")
        if part and not (presigned and part.startswith("X-Amz-Signature="))
    )
    kept_pairs = [(k, v) for k, v in query_pairs if not (presigned and k == "X-Amz-Signature")]
    for use_params in (False, True):
        url = f"http://{host}{path}"
        if not use_params and kept_raw:
            url += "?" + kept_raw
        request = AWSRequest(method=method, url=url)
        request.headers = HTTPHeaders()
        for name in signed_names:
            for value in headers.get(name, []):
                request.headers[name] = value
        if use_params:
            request.params = kept_pairs
        yield request


@dataclass
class FrontStats:
    """Counts of what the front saw; a snapshot, safe to read while requests go on."""

    verified: int = 0
    rejected: int = 0
    routes: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejections: list[tuple[str, str, str]] = field(default_factory=list)

    def requests(self, method: str, path: str | None = None) -> int:
        """Return how many verified requests with ``method`` (and raw ``path``) were forwarded."""
        return sum(
            count
            for (m, p), count in self.routes.items()
            if m == method and (path is None or p == path)
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FrontServer

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet; the stats record what happened."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        front = self.server.front
        body = self._read_body()
        headers = [
            (name, value.encode("latin-1").decode("utf-8", "replace"))
            for name, value in self.headers.items()
        ]
        verdict = verify_with_botocore(
            self.command, self.path, headers, body, front.credentials, front.region
        )
        path = self.path.partition("?")[0]
        front.record(self.command, path, verdict)
        if not verdict.ok:
            self._send_error(verdict)
            return
        status, reason, response_headers, response_body = front.forward(
            self.command, self.path, self.headers.items(), body
        )
        self.send_response(status, reason)
        for name, value in response_headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in response_headers).get("content-length")
            self.send_header("Content-Length", length or "0")
        else:
            self.send_header("Content-Length", str(len(response_body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response_body)

    def _send_error(self, verdict: Verdict) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(verdict.code)}</Code>"
            f"<Message>{escape(verdict.message)}</Message>"
            "<RequestId>sigv4-front</RequestId></Error>"
        ).encode()
        self.send_response(verdict.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)


class _FrontServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, front: SigV4Front) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.front = front


class SigV4Front:
    """A running front; create it with ``start_front``."""

    def __init__(self, backend_endpoint: str, credentials: Mapping[str, str], region: str) -> None:
        backend = urlsplit(backend_endpoint)
        if backend.scheme != "http" or backend.hostname is None:
            raise ValueError(f"backend endpoint {backend_endpoint!r} must be http://host:port")
        self._backend_host = backend.hostname
        self._backend_port = backend.port or 80
        self.credentials = dict(credentials)
        self.region = region
        self._lock = threading.Lock()
        self._stats = FrontStats()
        self._server = _FrontServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sigv4-front", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The front's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> FrontStats:
        """A snapshot of the counters."""
        with self._lock:
            return FrontStats(
                self._stats.verified,
                self._stats.rejected,
                Counter(self._stats.routes),
                list(self._stats.rejections),
            )

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = FrontStats()

    def record(self, method: str, path: str, verdict: Verdict) -> None:
        with self._lock:
            if verdict.ok:
                self._stats.verified += 1
                self._stats.routes[(method, path)] += 1
            else:
                self._stats.rejected += 1
                self._stats.rejections.append((method, path, verdict.code))

    def forward(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the backend unchanged (bar hop-by-hop headers); runs in a thread."""
        connection = http.client.HTTPConnection(self._backend_host, self._backend_port, timeout=60)
        try:
            connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            if body or method in ("PUT", "POST"):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            response_body = response.read()
            return response.status, response.reason, response.getheaders(), response_body
        finally:
            connection.close()

    def start(self) -> SigV4Front:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_front(
    backend_endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1"
) -> SigV4Front:
    """
    Start a SigV4-verifying front on a free loopback port in front of ``backend_endpoint``.

    :param backend_endpoint: ``http://127.0.0.1:PORT`` of the backend (moto).
    :param access_key: the access key id the front accepts.
    :param secret_key: its secret key.
    :param region: the region signatures must be scoped to.
    :return: the running front; call ``stop()`` when done.
    """
    return SigV4Front(backend_endpoint, {access_key: secret_key}, region).start()


@pytest.fixture
def sigv4_front_factory() -> Iterator[Callable[..., SigV4Front]]:
    """
    Start fronts with ``start_front``'s arguments; all are stopped at teardown.

    Use it from a test module with ``pytest_plugins`` in the root conftest, or wrap
    ``start_front`` in a local fixture.
    """
    fronts: list[SigV4Front] = []

    def start(
        backend_endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1"
    ) -> SigV4Front:
        front = start_front(backend_endpoint, access_key, secret_key, region)
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()
