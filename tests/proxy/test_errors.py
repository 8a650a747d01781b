"""Tests for proxy.errors: S3 XML error bodies and errors reported inside 200 bodies."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from proxy.errors import (
    S3Error,
    bad_gateway,
    error_status_in_body,
    gateway_timeout,
    render_error,
    service_unavailable,
)


def test_render_fields() -> None:
    """The body carries code, message, resource and request id."""
    root = ET.fromstring(render_error("NoSuchKey", "gone", "/b/k", "REQ1"))
    assert root.tag == "Error"
    assert root.findtext("Code") == "NoSuchKey"
    assert root.findtext("Message") == "gone"
    assert root.findtext("Resource") == "/b/k"
    assert root.findtext("RequestId") == "REQ1"


def test_render_escapes_resource() -> None:
    """Markup in a client-chosen resource stays text."""
    root = ET.fromstring(render_error("X", "m", "/b/</Resource><Code>evil", "R"))
    assert root.findtext("Code") == "X"
    assert root.findtext("Resource") == "/b/</Resource><Code>evil"


def test_render_xml_declaration() -> None:
    """The body starts with the XML declaration, as S3 sends it."""
    assert render_error("X", "m", "/", "R").startswith(b'<?xml version="1.0"')


def test_status_range_checked() -> None:
    """An S3Error with a non-error status is a programming error."""
    with pytest.raises(ValueError):
        S3Error("X", "m", 200)


def test_gateway_errors() -> None:
    """The backend failure helpers use the documented codes and statuses."""
    assert bad_gateway("b", "refused").code == "BadGateway"
    assert bad_gateway("b", "refused").status == 502
    assert gateway_timeout("b", 5).status == 504
    assert gateway_timeout("b", 5).code == "GatewayTimeout"
    assert service_unavailable("none up").status == 503
    assert service_unavailable("none up").headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<Error><Code>InternalError</Code></Error>", 500),
        (b"  \n  <?xml version='1.0'?>\n<Error><Code>SlowDown</Code></Error>", 503),
        (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidPart</Code>', 400),
        (b"<Error><Code>SomethingNew</Code></Error>", 500),
        (b"<CompleteMultipartUploadResult><ETag>x</ETag></CompleteMultipartUploadResult>", None),
        (b"", None),
        (b"   ", None),
    ],
)
def test_error_status_in_body(body: bytes, expected: int | None) -> None:
    """An <Error> document in a 200 body maps to its code's status."""
    assert error_status_in_body(body) == expected
