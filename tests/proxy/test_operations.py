"""Tests for proxy.operations: the operation name of every supported S3 call."""

from __future__ import annotations

import random

import pytest

from proxy.operations import OPERATIONS, RequestTarget, classify, parse_target

SUFFIXES = ("s3.local",)


def name(method: str, target: str, host: str = "127.0.0.1:9000", copy: bool = False) -> str:
    """Classify a request line the way the gateway does."""
    raw = target.encode("utf-8")
    path, _, query = raw.partition(b"?")
    parsed = parse_target(path, host.encode("ascii"), SUFFIXES)
    return classify(method.encode("ascii"), parsed, query, copy)


@pytest.mark.parametrize(
    ("method", "target", "copy", "expected"),
    [
        ("GET", "/", False, "list_buckets"),
        ("PUT", "/b", False, "create_bucket"),
        ("PUT", "/b/", False, "create_bucket"),
        ("DELETE", "/b", False, "delete_bucket"),
        ("HEAD", "/b", False, "head_bucket"),
        ("GET", "/b?location", False, "get_bucket_location"),
        ("GET", "/b?location=", False, "get_bucket_location"),
        ("GET", "/b", False, "list_objects"),
        ("GET", "/b?prefix=a&marker=b&max-keys=2", False, "list_objects"),
        ("GET", "/b?list-type=2&continuation-token=x", False, "list_objects_v2"),
        ("GET", "/b?versions&prefix=a", False, "list_object_versions"),
        ("GET", "/b?uploads", False, "list_multipart_uploads"),
        ("GET", "/b/k", False, "get_object"),
        ("GET", "/b/k?partNumber=1", False, "get_object"),
        ("GET", "/b/k?versionId=3&response-content-type=x", False, "get_object"),
        ("HEAD", "/b/k", False, "head_object"),
        ("PUT", "/b/k", False, "put_object"),
        ("PUT", "/b/k", True, "copy_object"),
        ("DELETE", "/b/k", False, "delete_object"),
        ("DELETE", "/b/k?versionId=1", False, "delete_object"),
        ("POST", "/b?delete", False, "delete_objects"),
        ("POST", "/b?delete=", False, "delete_objects"),
        ("POST", "/b/k?uploads", False, "create_multipart_upload"),
        ("PUT", "/b/k?partNumber=1&uploadId=u", False, "upload_part"),
        ("PUT", "/b/k?uploadId=u&partNumber=1", True, "upload_part_copy"),
        ("POST", "/b/k?uploadId=u", False, "complete_multipart_upload"),
        ("DELETE", "/b/k?uploadId=u", False, "abort_multipart_upload"),
        ("GET", "/b/k?uploadId=u", False, "list_parts"),
        ("GET", "/b/k?uploadId=u&max-parts=5", False, "list_parts"),
        ("GET", "/b?acl", False, "other"),
        ("PUT", "/b?versioning", False, "other"),
        ("GET", "/b/k?tagging", False, "other"),
        ("PUT", "/b/k?acl", False, "other"),
        ("POST", "/b/k", False, "other"),
        ("POST", "/b", False, "other"),
        ("PUT", "/", False, "other"),
        ("GET", "/?acl", False, "other"),
        ("get", "/b/k", False, "other"),
        ("PATCH", "/b/k", False, "other"),
        ("OPTIONS", "/b", False, "other"),
    ],
)
def test_path_style(method: str, target: str, copy: bool, expected: str) -> None:
    """Path-style requests get the S3 API name of the call they make."""
    assert name(method, target, copy=copy) == expected


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("GET", "/", "list_objects"),
        ("GET", "/?list-type=2", "list_objects_v2"),
        ("PUT", "/", "create_bucket"),
        ("HEAD", "/", "head_bucket"),
        ("GET", "/key", "get_object"),
        ("PUT", "/dir/key", "put_object"),
        ("GET", "//leading", "get_object"),
    ],
)
def test_virtual_hosted_style(method: str, target: str, expected: str) -> None:
    """Virtual-hosted requests under a configured suffix take the bucket from the host."""
    assert name(method, target, host="bucket.s3.local:9000") == expected


def test_virtual_host_bucket_and_key() -> None:
    """The bucket comes from the host and the whole path is the key."""
    target = parse_target(b"//a%20b/c", b"Bucket.S3.Local", SUFFIXES)
    assert target == RequestTarget("bucket", "/a b/c", virtual_host=True)


def test_suffix_itself_is_path_style() -> None:
    """A host equal to the suffix is path-style."""
    assert parse_target(b"/b/k", b"s3.local", SUFFIXES) == RequestTarget("b", "k")


def test_other_host_is_path_style() -> None:
    """A host outside the suffixes is path-style even if it has several labels."""
    assert parse_target(b"/b/k", b"bucket.example.com", SUFFIXES) == RequestTarget("b", "k")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/b/a+b", RequestTarget("b", "a+b")),
        (b"/b/a%2Fb", RequestTarget("b", "a/b")),
        (b"/b/%24dollar", RequestTarget("b", "$dollar")),
        (b"/b/sp%20ace", RequestTarget("b", "sp ace")),
        (b"/b/%C3%A9t%C3%A9", RequestTarget("b", "\u00e9t\u00e9")),
        (b"/b//double", RequestTarget("b", "/double")),
        (b"/b/a//b", RequestTarget("b", "a//b")),
        (b"//", RequestTarget(None, None)),
        (b"", RequestTarget(None, None)),
        (b"http://host:9000/b/k", RequestTarget("b", "k")),
    ],
)
def test_keys_decoded(raw: bytes, expected: RequestTarget) -> None:
    """Keys are percent-decoded and keep slashes as sent."""
    assert parse_target(raw, None) == expected


def test_hostile_input_stays_in_set() -> None:
    """Random bytes in every input never produce a name outside the closed set."""
    rng = random.Random(1234)
    alphabet = b"/?&=%+ abcAZ\x00\xff\r\n.-_:[]" + bytes(range(0x80, 0x90))
    methods = [b"GET", b"PUT", b"POST", b"DELETE", b"HEAD", b"\xff\x00", b"X" * 300]
    for _ in range(3000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        host = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        path, _, query = raw.partition(b"?")
        target = parse_target(path, host, SUFFIXES)
        result = classify(rng.choice(methods), target, query, rng.random() < 0.5)
        assert result in OPERATIONS, (raw, host, result)


def test_operation_set_size() -> None:
    """The closed set has the 21 S3 names plus other."""
    assert len(OPERATIONS) == 22
