"""
Name the S3 operation of a request from its method, target and headers.

The names form a closed set (L{OPERATIONS}); anything that is not one of the listed S3 calls is
C{"other"}. No input can produce a name outside the set, because every name is a literal in
this module, so the names are safe as metric label values.

Both addressing styles are understood: path-style (C{/bucket/key}) and virtual-hosted-style
(C{Host: bucket.s3.example}), the latter only for host names ending in one of the configured
suffixes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = [
    "OPERATIONS",
    "RequestInfo",
    "RequestTarget",
    "classify",
    "parse_target",
]

OPERATIONS: frozenset[str] = frozenset(
    {
        "list_buckets",
        "create_bucket",
        "delete_bucket",
        "head_bucket",
        "get_bucket_location",
        "list_objects",
        "list_objects_v2",
        "list_object_versions",
        "get_object",
        "head_object",
        "put_object",
        "copy_object",
        "delete_object",
        "delete_objects",
        "create_multipart_upload",
        "upload_part",
        "upload_part_copy",
        "complete_multipart_upload",
        "abort_multipart_upload",
        "list_parts",
        "list_multipart_uploads",
        "other",
    }
)

# Query parameters that select an S3 sub-resource. A request carrying one that is not handled
# below (for example ?acl or ?tagging) is a different API call and is named "other". Parameters
# not in this set (prefix, marker, versionId, response-content-type, X-Amz-Signature, ...) do
# not change the operation.
_SUBRESOURCES = frozenset(
    {
        "accelerate",
        "acl",
        "analytics",
        "attributes",
        "cors",
        "delete",
        "encryption",
        "intelligent-tiering",
        "inventory",
        "legal-hold",
        "lifecycle",
        "location",
        "logging",
        "metrics",
        "notification",
        "object-lock",
        "ownershipControls",
        "partNumber",
        "policy",
        "policyStatus",
        "publicAccessBlock",
        "replication",
        "requestPayment",
        "restore",
        "retention",
        "select",
        "session",
        "tagging",
        "torrent",
        "uploadId",
        "uploads",
        "versioning",
        "versions",
        "website",
    }
)


@dataclass(frozen=True)
class RequestTarget:
    """
    The bucket and key a request addresses, percent-decoded.

    C{bucket} is L{None} for the service (C{GET /}); C{key} is L{None} for bucket requests. A
    key keeps leading slashes and repeated slashes as sent (C{/bucket//a} has key C{/a}).
    C{virtual_host} tells whether the bucket came from the C{Host} header.
    """

    bucket: str | None
    key: str | None
    virtual_host: bool = False


@dataclass(frozen=True)
class RequestInfo:
    """
    A classified client request, as the gateway passes it to the backend pool.

    @ivar request_id: the id sent back in C{x-amz-request-id} and written to the access log.
    @ivar replayable: whether the body can be sent again to another backend (no body, or a body
        buffered completely), which is what allows a retry.
    @ivar backend_id: the backend that an upload ID or continuation token in the query names
        (see C{proxy.affinity}); the request may go nowhere else. L{None} when it names none.
    """

    request_id: str
    method: str
    operation: str
    bucket: str | None
    key: str | None
    replayable: bool
    backend_id: str | None = None


def parse_target(
    raw_path: bytes, host: bytes | None, virtual_host_suffixes: Iterable[str] = ()
) -> RequestTarget:
    """
    Split a request path (without the query) into bucket and key.

    @param raw_path: the path as sent on the request line, still percent-encoded.
    @param host: the C{Host} header, or L{None}.
    @param virtual_host_suffixes: lower-case DNS suffixes under which the first label of the
        host name is the bucket (C{bucket.s3.local} with suffix C{s3.local}).
    """
    path = _decode(raw_path)
    if not path.startswith("/"):
        # An absolute-form target (http://host/path) or a malformed one; keep the path part.
        scheme_end = path.find("://")
        if scheme_end != -1:
            path_start = path.find("/", scheme_end + 3)
            path = path[path_start:] if path_start != -1 else "/"
        else:
            path = "/" + path

    bucket = _virtual_host_bucket(host, virtual_host_suffixes)
    if bucket is not None:
        return RequestTarget(bucket, path[1:] or None, virtual_host=True)

    rest = path[1:]
    if not rest:
        return RequestTarget(None, None)
    bucket_name, slash, key = rest.partition("/")
    if not bucket_name:
        return RequestTarget(None, None)
    return RequestTarget(bucket_name, key if slash and key else None)


def classify(
    method: bytes | str,
    target: RequestTarget,
    query: bytes | str,
    has_copy_source: bool,
) -> str:
    """
    Return the operation name of a request, one of L{OPERATIONS}.

    @param method: the request method as sent; methods are case-sensitive, so C{get} is
        C{"other"}.
    @param query: the raw query string (without C{?}).
    @param has_copy_source: whether the request carries C{x-amz-copy-source}.
    """
    verb = method.decode("latin-1") if isinstance(method, bytes) else method
    params = _query_names(query)
    subresources = params & _SUBRESOURCES

    if target.bucket is None:
        if verb == "GET" and not subresources:
            return "list_buckets"
        return "other"
    if target.key is None:
        return _classify_bucket(verb, params, subresources)
    return _classify_object(verb, subresources, has_copy_source)


def _classify_bucket(verb: str, params: set[str], subresources: set[str]) -> str:
    if verb == "GET":
        if subresources == {"location"}:
            return "get_bucket_location"
        if subresources == {"uploads"}:
            return "list_multipart_uploads"
        if subresources == {"versions"}:
            return "list_object_versions"
        if subresources:
            return "other"
        return "list_objects_v2" if "list-type" in params else "list_objects"
    if verb == "POST":
        return "delete_objects" if subresources == {"delete"} else "other"
    if subresources:
        return "other"
    return {"PUT": "create_bucket", "DELETE": "delete_bucket", "HEAD": "head_bucket"}.get(
        verb, "other"
    )


def _classify_object(verb: str, subresources: set[str], has_copy_source: bool) -> str:
    if verb == "GET":
        if subresources == {"uploadId"}:
            return "list_parts"
        return "get_object" if subresources <= {"partNumber"} else "other"
    if verb == "HEAD":
        return "head_object" if subresources <= {"partNumber"} else "other"
    if verb == "PUT":
        if subresources == {"partNumber", "uploadId"}:
            return "upload_part_copy" if has_copy_source else "upload_part"
        if subresources:
            return "other"
        return "copy_object" if has_copy_source else "put_object"
    if verb == "DELETE":
        if subresources == {"uploadId"}:
            return "abort_multipart_upload"
        return "delete_object" if not subresources else "other"
    if verb == "POST":
        if subresources == {"uploads"}:
            return "create_multipart_upload"
        if subresources == {"uploadId"}:
            return "complete_multipart_upload"
    return "other"


def _decode(raw: bytes) -> str:
    return unquote(raw.decode("latin-1"), encoding="utf-8", errors="replace")


def _query_names(query: bytes | str) -> set[str]:
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    names = set()
    for part in text.split("&"):
        if part:
            names.add(unquote(part.partition("=")[0], errors="replace"))
    return names


def _virtual_host_bucket(host: bytes | None, suffixes: Iterable[str]) -> str | None:
    if not host:
        return None
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):
        return None  # an IPv6 literal is never a virtual host
    name = name.rsplit(":", 1)[0] if ":" in name else name
    name = name.rstrip(".")
    for suffix in suffixes:
        if name.endswith("." + suffix):
            bucket = name[: -len(suffix) - 1]
            if bucket:
                return bucket
    return None
