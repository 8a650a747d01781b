"""
The messages, channels and interfaces of fleet-wide cache invalidation.

A write through any proxy evicts the keys it changes in every proxy of the deployment. The
keys are published as JSON on the channel ``{<namespace>}:cache:invalidate``::

    {"origin": "<sender id>", "bucket": "photos", "keys": ["a.jpg", "b.jpg"], "id": 17}

A message with an ``id`` requests confirmations: each proxy that caches publishes
``{"origin": "<its id>", "id": 17}`` on the sender's channel
``{<namespace>}:cache:confirm:<sender id>`` once it has evicted the keys.
:mod:`proxy.invalidation_bus` carries them over Redis; :class:`LocalInvalidationBus` stands in
for a single process without Redis.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

__all__ = [
    "InvalidationBus",
    "delete_objects_keys",
    "written_keys",
    "InvalidationListener",
    "LocalInvalidationBus",
    "Invalidation",
    "confirmation_channel",
    "decode_confirmation",
    "decode_message",
    "encode_confirmation",
    "encode_message",
    "invalidation_channel",
    "registry_key",
]

def invalidation_channel(namespace: str) -> str:
    """Return the pub/sub channel of a deployment, inside its ``{namespace}`` hash tag."""
    return f"{{{namespace}}}:cache:invalidate"


def registry_key(namespace: str) -> str:
    """Return the sorted set of the proxies that cache, by origin, scored by Redis time in ms."""
    return f"{{{namespace}}}:cache:proxies"


def confirmation_channel(namespace: str, origin: str) -> str:
    """Return the channel on which the proxy ``origin`` receives confirmations."""
    return f"{{{namespace}}}:cache:confirm:{origin}"


@dataclass(frozen=True)
class Invalidation:
    """
    One decoded invalidation message.

    :ivar keys: the changed keys, or None for keys that are not known (every key).
    :ivar message_id: the sender's number for the message when it asks for confirmations,
        else None.
    """

    origin: str
    bucket: str
    keys: list[str] | None
    message_id: int | None = None


def encode_message(
    origin: str, bucket: str, keys: Sequence[str] | None, message_id: int | None = None
) -> bytes:
    """Encode one invalidation message as UTF-8 JSON; ``keys`` None means every key."""
    listed = None if keys is None else list(keys)
    document: dict[str, Any] = {"origin": origin, "bucket": bucket, "keys": listed}
    if message_id is not None:
        document["id"] = message_id
    return json.dumps(document).encode("utf-8")


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {payload[:80]!r} is not JSON: {err}") from err
    except RecursionError as err:
        # json.loads recurses once per nesting level, so "[" * 100000 exhausts the stack.
        raise ValueError(f"{what} {payload[:80]!r} is nested too deeply") from err
    if not isinstance(document, dict):
        raise ValueError(f"{what} {payload[:80]!r} is not a JSON object")
    return document


def _message_id(document: dict[str, Any], payload: bytes, what: str) -> int | None:
    message_id = document.get("id")
    # bool is an int in Python, but true is no message number.
    if message_id is not None and (type(message_id) is not int or message_id < 1):
        raise ValueError(f"{what} {payload[:80]!r} has an 'id' that is not a positive integer")
    return message_id


def decode_message(payload: bytes) -> Invalidation:
    """
    Decode an invalidation message.

    :raises ValueError: the payload is not a well-formed invalidation message.
    """
    what = "invalidation message"
    document = _json_object(payload, what)
    origin = document.get("origin")
    bucket = document.get("bucket")
    keys = document.get("keys")
    if not isinstance(origin, str) or not isinstance(bucket, str):
        raise ValueError(f"{what} {payload[:80]!r} lacks string 'origin' or 'bucket'")
    if "keys" not in document:
        raise ValueError(f"{what} {payload[:80]!r} has no 'keys'")
    if keys is not None:
        if not isinstance(keys, list):
            raise ValueError(f"{what} {payload[:80]!r} has no list or null 'keys'")
        if not all(isinstance(key, str) for key in keys):
            raise ValueError(f"{what} {payload[:80]!r} has a non-string key")
    return Invalidation(origin, bucket, keys, _message_id(document, payload, what))


def encode_confirmation(origin: str, message_id: int) -> bytes:
    """Encode the confirmation that ``origin`` evicted the keys of message ``message_id``."""
    return json.dumps({"origin": origin, "id": message_id}).encode("utf-8")


def decode_confirmation(payload: bytes) -> tuple[str, int]:
    """
    Decode a confirmation into (origin of the confirming proxy, message id).

    :raises ValueError: the payload is not a well-formed confirmation.
    """
    what = "invalidation confirmation"
    document = _json_object(payload, what)
    origin = document.get("origin")
    message_id = _message_id(document, payload, what)
    if not isinstance(origin, str) or message_id is None:
        raise ValueError(f"{what} {payload[:80]!r} lacks string 'origin' or integer 'id'")
    return origin, message_id


# Operations on an object key that never change the object's bytes or headers.
_NON_WRITING_OPERATIONS = frozenset(
    {
        "get_object",
        "head_object",
        "create_multipart_upload",
        "upload_part",
        "upload_part_copy",
        "abort_multipart_upload",
        "list_parts",
    }
)
_S3_XML_NAMESPACE = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def written_keys(
    operation: str, method: str, key: str | None, body: bytes | None
) -> list[str] | None:
    """
    Return the object keys that a request may change, for invalidation.

    Every request with an object key and a method other than GET or HEAD counts as a write
    (PutObject, CopyObject onto the key, DeleteObject, CompleteMultipartUpload, and the tagging,
    ACL, retention and restore requests) unless its operation only touches upload parts.
    DeleteObjects names its keys in the body.

    :param body: the complete request body of a DeleteObjects request, or None if the body was
        not kept.
    :return: the keys, an empty list for a request that changes no object, or None when the
        keys are unknown (a DeleteObjects body that is missing or cannot be parsed), which
        callers treat as "every key".
    """
    if operation == "delete_objects":
        return None if body is None else delete_objects_keys(body)
    if key is None or method in ("GET", "HEAD") or operation in _NON_WRITING_OPERATIONS:
        return []
    return [key]


def delete_objects_keys(body: bytes) -> list[str] | None:
    """
    Return the keys named by a DeleteObjects request body, or None if it cannot be parsed.

    A body with a document type declaration is not parsed, because entities are the
    means of the "billion laughs" and "quadratic blowup" attacks, to which the documentation of
    Python's ``xml`` package says Expat before 2.7.2 may be vulnerable.
    """
    if b"<!DOCTYPE" in body.upper():
        return None
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    keys = []
    for element in root.iter():
        if element.tag in ("Key", _S3_XML_NAMESPACE + "Key"):
            keys.append(element.text or "")
    return keys


class InvalidationListener(Protocol):
    """The receiving side of an invalidation bus; every method runs on the reactor thread."""

    def subscription_ready(self) -> None:
        """Start trusting the cache: the subscription is confirmed."""

    def subscription_lost(self, reason: str) -> None:
        """Stop trusting the cache: invalidations may be missed from now on."""

    def invalidation_received(self, bucket: str, keys: Sequence[str] | None) -> None:
        """Evict the given keys of ``bucket``, which another proxy changed (None: all keys)."""


class InvalidationBus(Protocol):
    """Carries invalidations between the proxies of one deployment."""

    def publish(
        self, bucket: str, keys: Sequence[str] | None, confirm: bool = True
    ) -> Deferred[bool]:
        """
        Tell the other proxies that ``keys`` of ``bucket`` changed (None: unknown keys).

        :param confirm: wait until every caching proxy has evicted the keys.
        :return: a Deferred that fires with True once the message reached Redis and, with
            ``confirm``, every caching proxy confirmed it; with False when publishing failed, took
            too long, or confirmations are missing (all logged). It never fails, so a caller
            may wait on it safely.
        """

    def serving_allowed(self) -> bool:
        """
        Return whether cached objects may be served now (reactor thread).

        False while the bus cannot prove that it would have received every invalidation
        published up to a moment shortly before now.
        """

    def subscribe(self, listener: InvalidationListener | None) -> None:
        """
        Start receiving confirmations, and invalidations for ``listener`` if there is one.

        A proxy with the cache disabled passes None: it caches nothing, but its writes still
        wait for the other proxies' confirmations.
        """

    def close(self) -> Deferred[None]:
        """Stop the subscription; the Deferred fires when its thread has ended."""


class LocalInvalidationBus:
    """The bus of a single process without Redis: nothing to publish, always subscribed."""

    def publish(
        self, bucket: str, keys: Sequence[str] | None, confirm: bool = True
    ) -> Deferred[bool]:
        """Do nothing: the local eviction already happened, and there are no other proxies."""
        return succeed(True)

    def serving_allowed(self) -> bool:
        """Return True: no other process can change what this one caches."""
        return True

    def subscribe(self, listener: InvalidationListener | None) -> None:
        """Report the subscription as ready at once."""
        if listener is not None:
            listener.subscription_ready()

    def close(self) -> Deferred[None]:
        """Do nothing."""
        return succeed(None)
