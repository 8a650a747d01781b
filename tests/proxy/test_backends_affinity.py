"""Unit tests of the affinity tokens that route follow-up requests to one backend."""

from __future__ import annotations

import pytest

from proxy.affinity import (
    REWRITTEN_OPERATIONS,
    AffinityError,
    decode_token,
    encode_token,
    rewrite_response,
    route_query,
)

IDS = {"east", "west"}

CREATE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Bucket>b</Bucket><Key>k</Key><UploadId>VXBsb2FkSUQ.x_y-z</UploadId>"
    b"</InitiateMultipartUploadResult>"
)

LIST_V2 = (
    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Name>b</Name><ContinuationToken>abc+/=</ContinuationToken>"
    b"<NextContinuationToken>def&amp;g</NextContinuationToken>"
    b"<Contents><Key>UploadId</Key></Contents></ListBucketResult>"
)

LIST_UPLOADS = (
    b"<ListMultipartUploadsResult><UploadIdMarker></UploadIdMarker>"
    b"<NextUploadIdMarker>u2</NextUploadIdMarker>"
    b"<Upload><Key>a</Key><UploadId>u1</UploadId></Upload>"
    b"<Upload><Key>b</Key><UploadId>u2</UploadId></Upload>"
    b"</ListMultipartUploadsResult>"
)


def test_token_round_trip() -> None:
    """Decoding an encoded token gives back the backend id and the original value."""
    token = encode_token("east", "abc~def")
    assert decode_token(token, IDS, "uploadId") == ("east", "abc~def")


def test_encode_invalid_id() -> None:
    """A backend id with a separator cannot be encoded."""
    with pytest.raises(ValueError, match="'a~b'"):
        encode_token("a~b", "x")


def test_decode_unknown_backend() -> None:
    """A token naming an unconfigured backend raises NoSuchUpload for an upload ID."""
    with pytest.raises(AffinityError) as caught:
        decode_token("north~x", IDS, "uploadId")
    assert caught.value.code == "NoSuchUpload"
    assert caught.value.status == 404


def test_decode_no_prefix() -> None:
    """A continuation token without a prefix raises InvalidArgument."""
    with pytest.raises(AffinityError) as caught:
        decode_token("plain", IDS, "continuation-token")
    assert caught.value.code == "InvalidArgument"
    assert caught.value.status == 400


def test_create_rewrite() -> None:
    """CreateMultipartUpload's UploadId gets the backend prefix; the rest stays byte for byte."""
    rewritten = rewrite_response("create_multipart_upload", CREATE, "east")
    assert rewritten == CREATE.replace(b"<UploadId>", b"<UploadId>east~")


def test_list_v2_rewrite() -> None:
    """ListObjectsV2 tokens get the prefix, escaped text and keys named like tags stay as is."""
    rewritten = rewrite_response("list_objects_v2", LIST_V2, "west")
    assert b"<ContinuationToken>west~abc+/=</ContinuationToken>" in rewritten
    assert b"<NextContinuationToken>west~def&amp;g</NextContinuationToken>" in rewritten
    assert b"<Key>UploadId</Key>" in rewritten


def test_list_uploads_rewrite() -> None:
    """ListMultipartUploads prefixes every UploadId and the marker, not empty elements."""
    rewritten = rewrite_response("list_multipart_uploads", LIST_UPLOADS, "east")
    assert rewritten.count(b"<UploadId>east~") == 2
    assert b"<NextUploadIdMarker>east~u2</NextUploadIdMarker>" in rewritten
    assert b"<UploadIdMarker></UploadIdMarker>" in rewritten


def test_other_operation_unchanged() -> None:
    """A response of an operation without tokens is returned unchanged."""
    assert rewrite_response("get_object", CREATE, "east") is CREATE


def test_rewritten_operations() -> None:
    """The operations whose responses carry tokens are the four listed."""
    assert REWRITTEN_OPERATIONS == {
        "create_multipart_upload", "list_multipart_uploads", "list_parts", "list_objects_v2",
    }


def test_route_upload_id() -> None:
    """An uploadId routes to its backend and loses its prefix; other parameters stay raw."""
    query = "partNumber=3&uploadId=east~VXBs%2Bb2Fk&x-id=UploadPart"
    assert route_query(query, IDS) == ("east", "partNumber=3&uploadId=VXBs%2Bb2Fk&x-id=UploadPart")


def test_route_encoded_separator() -> None:
    """A separator that the client percent-encoded as %7E is recognised."""
    assert route_query("uploadId=west%7eabc", IDS) == ("west", "uploadId=abc")


def test_route_continuation_token() -> None:
    """A continuation token routes to its backend and keeps its own percent-encoding."""
    query = "continuation-token=west~abc%2B%2F%3D&list-type=2"
    assert route_query(query, IDS) == ("west", "continuation-token=abc%2B%2F%3D&list-type=2")


def test_route_no_token() -> None:
    """A query without tokens leaves routing free and the query unchanged."""
    assert route_query("list-type=2&prefix=a", IDS) == (None, "list-type=2&prefix=a")


def test_route_empty_query() -> None:
    """An empty query routes freely."""
    assert route_query("", IDS) == (None, "")


def test_route_empty_marker() -> None:
    """An empty upload-id-marker is passed on without routing."""
    assert route_query("uploads&upload-id-marker=", IDS) == (None, "uploads&upload-id-marker=")


def test_route_unknown_backend() -> None:
    """An uploadId naming an unknown backend raises NoSuchUpload."""
    with pytest.raises(AffinityError) as caught:
        route_query("uploadId=north~abc", IDS)
    assert caught.value.code == "NoSuchUpload"


def test_route_no_prefix() -> None:
    """A continuation token without a prefix raises InvalidArgument naming the parameter."""
    with pytest.raises(AffinityError, match="continuation-token") as caught:
        route_query("list-type=2&continuation-token=abc", IDS)
    assert caught.value.code == "InvalidArgument"


def test_route_conflicting_backends() -> None:
    """Two tokens naming different backends are rejected."""
    with pytest.raises(AffinityError, match="'east'"):
        route_query("key-marker=k&upload-id-marker=west~a&uploadId=east~b", IDS)


def test_full_round_trip() -> None:
    """An UploadId from a rewritten response routes back to the backend that issued it."""
    rewritten = rewrite_response("create_multipart_upload", CREATE, "west")
    upload_id = rewritten.split(b"<UploadId>")[1].split(b"</UploadId>")[0].decode()
    assert route_query(f"uploadId={upload_id}", IDS) == ("west", "uploadId=VXBsb2FkSUQ.x_y-z")
