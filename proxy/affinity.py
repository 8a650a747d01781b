"""Affinity tokens: route the follow-up requests of a multipart upload or a listing to one backend.

An upload ID and a ListObjectsV2 continuation token are only valid on the backend that issued
them. Instead of remembering in memory which backend that was, which would break as soon as a
load balancer sends the next request to another proxy of the fleet, the proxy puts the backend
id into the value itself: ``<backend_id>~<original>``. Every proxy configured with the same
backend ids can route the follow-up request and strip the prefix before forwarding.

The functions here are pure. The gateway calls :func:`route_query` on the raw query string of
every request, and :func:`rewrite_response` on the bodies of the responses listed in
``REWRITTEN_OPERATIONS``.

Note: tokens are not authenticated. A client that edits the prefix can only pick another
configured backend, which then rejects the original value as it would any unknown token.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from xml.sax.saxutils import escape

__all__ = [
    "BACKEND_ID_PATTERN",
    "REWRITTEN_OPERATIONS",
    "SEPARATOR",
    "AffinityError",
    "decode_token",
    "encode_token",
    "rewrite_response",
    "route_query",
]

SEPARATOR = "~"

# Backend ids are limited to characters that percent-encoding leaves alone, so an encoded
# token in a query string starts with the literal backend id.
BACKEND_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

# Query parameters that carry a token, with the S3 error code and HTTP status for a value that
# names no configured backend. S3 rejects an unknown upload ID with 404 NoSuchUpload and a bad
# continuation token or marker with 400 InvalidArgument.
_QUERY_PARAMETERS: dict[str, tuple[str, int]] = {
    "uploadId": ("NoSuchUpload", 404),
    "upload-id-marker": ("InvalidArgument", 400),
    "continuation-token": ("InvalidArgument", 400),
}

# XML elements that carry a token in each response the proxy rewrites. The echoed request
# values (UploadIdMarker, ContinuationToken, UploadId in ListParts) are rewritten too, so the
# client reads back exactly what it sent.
_RESPONSE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "create_multipart_upload": ("UploadId",),
    "list_multipart_uploads": ("UploadId", "UploadIdMarker", "NextUploadIdMarker"),
    "list_parts": ("UploadId",),
    "list_objects_v2": ("ContinuationToken", "NextContinuationToken"),
}

REWRITTEN_OPERATIONS = frozenset(_RESPONSE_ELEMENTS)

# A raw query value: the backend id, then the separator, literal or percent-encoded.
_ENCODED_TOKEN = re.compile(r"([A-Za-z0-9._-]+)(?:~|%7[Ee])(.*)", re.DOTALL)


class AffinityError(ValueError):
    """A token in a request names no configured backend.

    :ivar code: the S3 error code for the response, ``NoSuchUpload`` or ``InvalidArgument``.
    :ivar status: the HTTP status for the response, 404 or 400.
    :ivar parameter: the query parameter that carried the token.
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.code, self.status = _QUERY_PARAMETERS.get(parameter, ("InvalidArgument", 400))


def encode_token(backend_id: str, token: str) -> str:
    """Prefix ``token`` with ``backend_id`` and the separator.

    :raises ValueError: ``backend_id`` contains characters outside ``[A-Za-z0-9._-]``.
    """
    if not BACKEND_ID_PATTERN.fullmatch(backend_id):
        raise ValueError(
            f"backend id {backend_id!r} is invalid; use only letters, digits, '.', '_' and '-'"
        )
    return f"{backend_id}{SEPARATOR}{token}"


def decode_token(token: str, backend_ids: Collection[str], parameter: str) -> tuple[str, str]:
    """Split a decoded token into the backend id and the backend's original value.

    :param token: the value the client sent, after percent-decoding.
    :param backend_ids: the ids of the configured backends.
    :param parameter: the query parameter name, used for the error code and message.
    :raises AffinityError: the token has no backend prefix or names an unknown backend.
    """
    backend_id, separator, original = token.partition(SEPARATOR)
    if not separator:
        raise AffinityError(
            parameter,
            f"{parameter} {token!r} was not issued by this proxy: it has no backend prefix; "
            f"use a value returned by this proxy",
        )
    if backend_id not in backend_ids:
        raise AffinityError(
            parameter,
            f"{parameter} names backend {backend_id!r}, which is not configured; "
            f"restart the operation to get a new value",
        )
    return backend_id, original


def route_query(raw_query: str, backend_ids: Collection[str]) -> tuple[str | None, str]:
    """Find the backend a request must go to and strip the token prefixes from its query.

    The query is processed in its raw, percent-encoded form and every other byte is kept as
    sent, so the result can be signed for the backend exactly as it goes on the wire.

    :param raw_query: the query string without the leading ``?``.
    :param backend_ids: the ids of the configured backends.
    :return: ``(backend_id, query)``: the backend named by the tokens, or ``None`` when the
        query carries no token, and the query with the prefixes removed.
    :raises AffinityError: a token has no backend prefix, names an unknown backend, or two
        tokens name different backends.
    """
    pinned: str | None = None
    parts = raw_query.split("&") if raw_query else []
    for index, part in enumerate(parts):
        name, equals, value = part.partition("=")
        if name not in _QUERY_PARAMETERS or not equals or not value:
            continue

        match = _ENCODED_TOKEN.fullmatch(value)
        if match is None:
            raise AffinityError(
                name,
                f"{name} {value!r} was not issued by this proxy: it has no backend prefix; "
                f"use a value returned by this proxy",
            )
        backend_id, original = match.group(1), match.group(2)
        if backend_id not in backend_ids:
            raise AffinityError(
                name,
                f"{name} names backend {backend_id!r}, which is not configured; "
                f"restart the operation to get a new value",
            )
        if pinned is not None and pinned != backend_id:
            raise AffinityError(
                name,
                f"{name} names backend {backend_id!r} but another parameter names "
                f"{pinned!r}; send values from one response only",
            )

        pinned = backend_id
        parts[index] = f"{name}={original}"
    return pinned, "&".join(parts)


def rewrite_response(operation: str, body: bytes, backend_id: str) -> bytes:
    """Prefix the tokens in a backend's XML response with ``backend_id``.

    Operations outside ``REWRITTEN_OPERATIONS`` and empty elements are returned unchanged.
    The rest of the document is kept byte for byte, namespace prefixes included, because only
    the text of the matched elements is replaced.

    :param operation: the operation name of the request, for example ``list_objects_v2``.
    :param body: the complete response body as the backend sent it.
    :param backend_id: the backend that produced ``body``.
    """
    elements = _RESPONSE_ELEMENTS.get(operation)
    if not elements:
        return body
    prefix = escape(encode_token(backend_id, "")).encode("utf-8")
    names = b"|".join(re.escape(name.encode("ascii")) for name in elements)
    pattern = re.compile(rb"(<(" + names + rb")>)([^<]+)(</\2>)")
    return pattern.sub(lambda m: m.group(1) + prefix + m.group(3) + m.group(4), body)
