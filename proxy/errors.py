"""
S3 XML error responses produced by the proxy itself.

An S3 error body looks like::

    <?xml version="1.0" encoding="UTF-8"?>
    <Error><Code>NoSuchKey</Code><Message>...</Message><Resource>/b/k</Resource>
    <RequestId>...</RequestId></Error>

L{S3Error} carries the code, the message and the HTTP status; L{render_error} builds the body.
L{error_status_in_body} reads the code back from a backend body, for the case where S3 answers
200 to CompleteMultipartUpload and reports the failure in the body.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

__all__ = [
    "S3Error",
    "bad_gateway",
    "error_status_in_body",
    "gateway_timeout",
    "render_error",
    "service_unavailable",
    "status_for_code",
]


class S3Error(Exception):
    """
    An error the proxy answers with an S3 XML body.

    @ivar code: the S3 error code, for example C{"SignatureDoesNotMatch"}.
    @ivar message: a human-readable message; it must not contain secrets.
    @ivar status: the HTTP status, 400 to 599.
    @ivar headers: extra response headers, for example C{Retry-After}.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"S3 error status {status!r} is invalid; it must be 400 to 599")
        super().__init__(code, message, status)
        self.code = code
        self.message = message
        self.status = status
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def render_error(code: str, message: str, resource: str, request_id: str) -> bytes:
    """
    Build the XML body of an S3 error response.

    Every text value is XML-escaped, so a resource name sent by a client cannot change the
    document structure.
    """
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error>"
        f"<Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource>"
        f"<RequestId>{escape(request_id)}</RequestId>"
        "</Error>"
    ).encode()


def bad_gateway(backend_id: str, reason: str) -> S3Error:
    """Return the 502 error for a backend that refused, reset or sent a malformed response."""
    return S3Error("BadGateway", f"backend {backend_id!r} failed: {reason}", 502)


def gateway_timeout(backend_id: str, seconds: float) -> S3Error:
    """Return the 504 error for a backend that sent no response headers in time."""
    return S3Error(
        "GatewayTimeout",
        f"backend {backend_id!r} sent no response within {seconds:g} s",
        504,
    )


def service_unavailable(message: str, retry_after: int = 1) -> S3Error:
    """Return the 503 error for a request that no backend can take now."""
    return S3Error(
        "ServiceUnavailable", message, 503, headers={"Retry-After": str(retry_after)}
    )


# The HTTP status S3 documents for error codes that CompleteMultipartUpload may report inside a
# 200 response. Codes not listed count as 500.
_CODE_STATUS = {
    "AccessDenied": 403,
    "EntityTooSmall": 400,
    "InternalError": 500,
    "InvalidArgument": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRequest": 400,
    "MalformedXML": 400,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "PreconditionFailed": 412,
    "ServiceUnavailable": 503,
    "SlowDown": 503,
}

_ERROR_CODE = re.compile(rb"^\s*(?:<\?xml[^>]*\?>\s*)?<Error>.*?<Code>([^<]{1,128})</Code>", re.S)


def status_for_code(code: str) -> int:
    """Return the HTTP status S3 uses for an error code, 500 for codes not known here."""
    return _CODE_STATUS.get(code, 500)


def error_status_in_body(body: bytes) -> int | None:
    """
    Return the status of an C{<Error>} document, or L{None} when C{body} is not one.

    Leading whitespace is skipped, because S3 sends whitespace while CompleteMultipartUpload
    runs.
    """
    match = _ERROR_CODE.match(body)
    if match is None:
        return None
    return status_for_code(match.group(1).decode("utf-8", errors="replace"))
