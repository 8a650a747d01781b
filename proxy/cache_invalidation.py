"""
Fleet-wide invalidation of cached objects over Redis pub/sub.

Every proxy publishes the keys that a write changes on the channel
``{<namespace>}:cache:invalidate`` and every proxy with the cache enabled subscribes to it. A
message is JSON::

    {"origin": "<sender id>", "bucket": "photos", "keys": ["a.jpg", "b.jpg"]}

The subscriber runs in its own thread (redis-py blocks) and hands everything to the reactor thread
with ``callFromThread``. The listener (the cache) learns three things:

- ``subscription_ready()``: the subscription is confirmed, so from now on no invalidation can be
  missed. Sent again after every reconnect.
- ``subscription_lost(reason)``: invalidations may have been missed from this point on.
- ``invalidation_received(bucket, keys)``: another proxy changed these keys.

Limitations:

- A message published while this proxy is not subscribed is lost. The listener must treat every
  ``subscription_lost()`` as "anything cached may be stale".
- A publish that fails (Redis down or unreachable from the writer only) is logged and dropped.
  Proxies that still hold their subscription keep their entries for those keys until ``ttl``
  expires.
"""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = [
    "InvalidationBus",
    "delete_objects_keys",
    "written_keys",
    "InvalidationListener",
    "LocalInvalidationBus",
    "RedisInvalidationBus",
    "decode_message",
    "encode_message",
    "invalidation_channel",
]

T = TypeVar("T")

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Run a blocking callable off the reactor thread; the Deferred fires with its result."""

PUBLISH_THREADS = 4
"""Threads of a bus's own publish pool; more only queue up behind a Redis that does not reply."""


def invalidation_channel(namespace: str) -> str:
    """Return the pub/sub channel of a deployment, inside its ``{namespace}`` hash tag."""
    return f"{{{namespace}}}:cache:invalidate"


def encode_message(origin: str, bucket: str, keys: Sequence[str] | None) -> bytes:
    """Encode one invalidation message as UTF-8 JSON; ``keys`` None means every key."""
    listed = None if keys is None else list(keys)
    return json.dumps({"origin": origin, "bucket": bucket, "keys": listed}).encode("utf-8")


def decode_message(payload: bytes) -> tuple[str, str, list[str] | None]:
    """
    Decode an invalidation message into (origin, bucket, keys), keys None for every key.

    :raises ValueError: the payload is not a well-formed invalidation message.
    """
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"invalidation message {payload[:80]!r} is not JSON: {err}") from err
    if not isinstance(document, dict):
        raise ValueError(f"invalidation message {payload[:80]!r} is not a JSON object")
    origin = document.get("origin")
    bucket = document.get("bucket")
    keys = document.get("keys")
    if not isinstance(origin, str) or not isinstance(bucket, str):
        raise ValueError(
            f"invalidation message {payload[:80]!r} lacks string 'origin' or 'bucket'"
        )
    if "keys" not in document:
        raise ValueError(f"invalidation message {payload[:80]!r} has no 'keys'")
    if keys is None:
        return origin, bucket, None
    if not isinstance(keys, list):
        raise ValueError(f"invalidation message {payload[:80]!r} has no list or null 'keys'")
    if not all(isinstance(key, str) for key in keys):
        raise ValueError(f"invalidation message {payload[:80]!r} has a non-string key")
    return origin, bucket, keys


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

    def publish(self, bucket: str, keys: Sequence[str] | None) -> Deferred[None]:
        """
        Tell the other proxies that ``keys`` of ``bucket`` changed (None: unknown keys).

        The Deferred fires with None once the message is handed to Redis or the attempt
        failed (failures are logged, never raised), so a caller may wait on it safely.
        """

    def subscribe(self, listener: InvalidationListener) -> None:
        """Start delivering subscription state and invalidations to ``listener``."""

    def close(self) -> Deferred[None]:
        """Stop the subscription; the Deferred fires when its thread has ended."""


class LocalInvalidationBus:
    """The bus of a single process without Redis: nothing to publish, always subscribed."""

    def publish(self, bucket: str, keys: Sequence[str] | None) -> Deferred[None]:
        """Do nothing: the local eviction already happened."""
        return succeed(None)

    def subscribe(self, listener: InvalidationListener) -> None:
        """Report the subscription as ready at once."""
        listener.subscription_ready()

    def close(self) -> Deferred[None]:
        """Do nothing."""
        return succeed(None)


class RedisInvalidationBus:
    """
    Invalidation over Redis pub/sub: publishes through a thread pool, subscribes in a thread.

    :param client_factory: returns a new ``redis.Redis``. It is called once for publishing and
        once per subscription attempt. Use :meth:`from_url` for the production settings.
    :param channel: the pub/sub channel, see :func:`invalidation_channel`.
    :param origin: the id of this process; messages with this origin are ignored because the
        local eviction already happened.
    :param reactor: delivers to the listener with ``callFromThread``.
    :param run_in_thread: runs a blocking publish; defaults to a thread pool of the bus's own
        (:data:`PUBLISH_THREADS` threads, started on the first publish, stopped by
        :meth:`close`). It is not the reactor's pool, because while Redis does not reply
        every publish holds its thread for the socket timeout (5 s), and in the reactor's
        pool that starved name resolution, so backend connections waited behind them.
    :param ping_interval: seconds between PINGs on an idle subscription. A subscription that
        returns nothing, not even the PONG, for three intervals counts as lost.
    :param max_backoff: upper bound in seconds of the delay between subscription attempts,
        which starts at 0.1 s and doubles.
    :param publish_timeout: seconds after which the Deferred of :meth:`publish` fires even if
        Redis has not replied, so that a slow Redis delays writes by at most this much; None
        waits for the Redis client's own timeouts. It needs a reactor with ``callLater``.
    """

    _log = Logger()

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        channel: str,
        origin: str,
        reactor: IReactorFromThreads,
        run_in_thread: RunInThread | None = None,
        ping_interval: float = 5.0,
        max_backoff: float = 5.0,
        publish_timeout: float | None = 1.0,
    ) -> None:
        if ping_interval <= 0:
            raise ValueError(f"ping_interval {ping_interval!r} is invalid; it must be > 0 seconds")
        self._client_factory = client_factory
        self._channel = channel
        self._origin = origin
        self._reactor = reactor
        self._run_in_thread = run_in_thread or self._default_run_in_thread
        self._ping_interval = ping_interval
        self._max_backoff = max_backoff
        self._publish_timeout = publish_timeout
        # Creating a client opens no connection; redis-py clients are thread-safe.
        self._publisher = client_factory()
        self._stopping = threading.Event()
        # Set by the subscriber thread once the current connection's SUBSCRIBE is confirmed.
        self._ready = False
        self._thread: threading.Thread | None = None
        self._publish_pool: ThreadPool | None = None

    @classmethod
    def from_url(
        cls, redis_url: str, namespace: str, origin: str, reactor: IReactorFromThreads
    ) -> RedisInvalidationBus:
        """
        Build the bus for ``redis_url`` with the channel of ``namespace``.

        The subscriber's client never retries by itself: redis-py would reconnect and
        resubscribe silently, and a gap in the subscription must always reach the listener.
        """

        def client_factory() -> redis.Redis:
            return redis.Redis.from_url(
                redis_url,
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
            )

        return cls(client_factory, invalidation_channel(namespace), origin, reactor)

    def _default_run_in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        if self._publish_pool is None:
            self._publish_pool = ThreadPool(
                0, PUBLISH_THREADS, name=f"cache-invalidation publish {self._channel}"
            )
            self._publish_pool.start()
        return threads.deferToThreadPool(self._reactor, self._publish_pool, work)

    def _stop_publish_pool(self, result: T) -> T:
        pool, self._publish_pool = self._publish_pool, None
        if pool is not None:
            # Joins the pool's threads, so a publish stuck on a silent Redis delays the stop
            # by up to the socket timeout.
            pool.stop()
        return result

    # Publishing.

    def publish(self, bucket: str, keys: Sequence[str] | None) -> Deferred[None]:
        """
        Publish one message for ``keys`` of ``bucket`` from a pool thread.

        The Deferred fires with None when Redis accepted the message or the publish failed; a
        failure is logged with the bucket and the number of keys.
        """
        payload = encode_message(self._origin, bucket, keys)

        def send() -> int:
            return int(self._publisher.publish(self._channel, payload))

        def failed(failure: Failure) -> None:
            self._log.warn(
                "Publishing a cache invalidation for {count} key(s) of bucket {bucket!r} on"
                " {channel} failed: {error}; other proxies keep their entries for these keys"
                " until the cache ttl expires",
                count="all" if keys is None else len(keys),
                bucket=bucket,
                channel=self._channel,
                error=failure.getErrorMessage(),
            )

        published: Deferred[Any] = self._run_in_thread(send)
        if self._publish_timeout is not None:
            # The thread goes on and may still publish; only the caller stops waiting.
            published.addTimeout(self._publish_timeout, cast(IReactorTime, self._reactor))
        published.addCallbacks(lambda _receivers: None, failed)
        return published

    # Subscribing.

    def subscribe(self, listener: InvalidationListener) -> None:
        """Start the subscriber thread; it runs until :meth:`close`."""
        if self._thread is not None:
            raise RuntimeError(f"the subscriber of {self._channel} is already running")
        self._thread = threading.Thread(
            target=self._run,
            args=(listener,),
            name=f"cache-invalidation {self._channel}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> Deferred[None]:
        """Stop the subscriber thread and the publish pool; the Deferred fires once both ended."""
        self._stopping.set()
        thread = self._thread
        self._thread = None
        if thread is None:
            joined: Deferred[Any] = succeed(None)
        else:
            joined = self._run_in_thread(lambda: thread.join(timeout=10.0))
        return joined.addBoth(self._stop_publish_pool)

    def _run(self, listener: InvalidationListener) -> None:
        """Subscribe, deliver, and on any error report the loss and try again (runs in a thread)."""
        delay = 0.1
        failed_attempts = 0
        while not self._stopping.is_set():
            self._ready = False
            try:
                self._listen(listener)
            except (redis.RedisError, OSError) as err:
                if self._stopping.is_set():
                    break
                if self._ready:
                    # A confirmed subscription broke, so a new outage starts here.
                    delay = 0.1
                    failed_attempts = 0
                failed_attempts += 1
                self._reactor.callFromThread(listener.subscription_lost, str(err))
                self._log_failure(err, failed_attempts, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, self._max_backoff)

    def _log_failure(self, err: Exception, failed_attempts: int, delay: float) -> None:
        """Warn once per outage; later attempts of the same outage log at debug level."""
        if failed_attempts == 1:
            self._log.warn(
                "Cache invalidation subscription to {channel} lost: {error}; the cache is"
                " emptied and stays off until the subscription is back; next attempt in"
                " {delay:.1f} s, later ones up to {max_backoff:.1f} s apart",
                channel=self._channel,
                error=str(err),
                delay=delay,
                max_backoff=self._max_backoff,
            )
        else:
            self._log.debug(
                "Cache invalidation subscription to {channel}: attempt {attempt} failed: {error}",
                channel=self._channel,
                attempt=failed_attempts,
                error=str(err),
            )

    def _listen(self, listener: InvalidationListener) -> None:
        """Hold one subscription until it fails or the bus closes (runs in a thread)."""
        client = self._client_factory()
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self._channel)
            # time.monotonic measures silence on the socket; this thread has no reactor clock.
            last_received = last_ping = time.monotonic()
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=min(1.0, self._ping_interval))
                now = time.monotonic()
                if message is not None:
                    last_received = now
                    self._dispatch(listener, message)
                elif now - last_received > 3 * self._ping_interval:
                    raise redis.ConnectionError(
                        f"no reply on the subscription for {now - last_received:.1f} s"
                    )
                if now - last_ping >= self._ping_interval:
                    pubsub.ping()
                    last_ping = now
        finally:
            pubsub.close()
            client.close()

    def _dispatch(self, listener: InvalidationListener, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._ready = True
            self._log.info(
                "Cache invalidation subscription to {channel} ready", channel=self._channel
            )
            self._reactor.callFromThread(listener.subscription_ready)
        elif kind == "message":
            try:
                origin, bucket, keys = decode_message(message["data"])
            except ValueError as err:
                # The keys it names are unknown, so nothing cached can be trusted.
                self._log.error("{error}; emptying the cache", error=str(err))
                self._reactor.callFromThread(listener.subscription_lost, str(err))
                self._reactor.callFromThread(listener.subscription_ready)
                return
            if origin != self._origin:
                self._reactor.callFromThread(listener.invalidation_received, bucket, keys)
