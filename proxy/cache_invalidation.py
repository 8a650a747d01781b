"""
Fleet-wide invalidation of cached objects over Redis pub/sub, with confirmations.

Every proxy publishes the keys that a write changes on the channel
``{<namespace>}:cache:invalidate`` and every proxy with the cache enabled subscribes to it. A
message is JSON::

    {"origin": "<sender id>", "bucket": "photos", "keys": ["a.jpg", "b.jpg"], "id": 17}

A message with an ``id`` requests confirmations. Every subscriber evicts the keys on its
reactor thread and then publishes ``{"origin": "<its id>", "id": 17}`` on the sender's own
channel ``{<namespace>}:cache:confirm:<sender id>``. ``PUBLISH`` returns the number of
subscribers that received the message, so the sender learns how many confirmations to wait for.
Its own subscription counts too and confirms without a round trip. Once they are all in, no
proxy holds the old entry any more, and the write's response may go to the client. Every proxy
subscribes to its confirmation channel, also with the cache disabled, because its writes
change what the other proxies cache.

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
- The sender waits for confirmations for at most ``publish_timeout`` seconds. A subscriber that
  is slower (a stopped or overloaded proxy) may still serve the old entry after the write's
  response, until it gets to the message.
- Any other client subscribed to the invalidation channel is counted by ``PUBLISH`` but never
  confirms, so every write waits the whole timeout.
"""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
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
    "Invalidation",
    "confirmation_channel",
    "decode_confirmation",
    "decode_message",
    "encode_confirmation",
    "encode_message",
    "invalidation_channel",
]

T = TypeVar("T")

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Run a blocking callable off the reactor thread; the Deferred fires with its result."""

class _TimedReactor(Protocol):
    def callLater(self, delay: float, function: Callable[..., Any], *args: Any) -> Any: ...

    def seconds(self) -> float: ...


PUBLISH_THREADS = 4
"""Threads of a bus's own publish pool; more only queue up behind a Redis that does not reply."""


def invalidation_channel(namespace: str) -> str:
    """Return the pub/sub channel of a deployment, inside its ``{namespace}`` hash tag."""
    return f"{{{namespace}}}:cache:invalidate"


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

        :param confirm: wait until every subscribed proxy has evicted the keys.
        :return: a Deferred that fires with True once the message reached Redis and, with
            ``confirm``, every subscriber confirmed it; with False when publishing failed, took
            too long, or confirmations are missing (all logged). It never fails, so a caller
            may wait on it safely.
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

    def subscribe(self, listener: InvalidationListener | None) -> None:
        """Report the subscription as ready at once."""
        if listener is not None:
            listener.subscription_ready()

    def close(self) -> Deferred[None]:
        """Do nothing."""
        return succeed(None)


@dataclass
class _Confirmations:
    """A published message that waits for the confirmations of its subscribers."""

    result: Deferred[bool]
    # Set when Redis replies to PUBLISH; confirmations may arrive before that.
    expected: int | None = None
    confirmed_by: set[str] = field(default_factory=set)


class RedisInvalidationBus:
    """
    Invalidation over Redis pub/sub: publishes through a thread pool, subscribes in a thread.

    :param client_factory: returns a new ``redis.Redis``. It is called once for publishing and
        once per subscription attempt. Use :meth:`from_url` for the production settings.
    :param namespace: the deployment's namespace; it names the channels, see
        :func:`invalidation_channel` and :func:`confirmation_channel`.
    :param origin: the id of this process, unique in the deployment; messages with this
        origin are not delivered to the listener because the local eviction already happened.
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
        Redis has not replied or confirmations are missing, so that a slow Redis or a slow
        proxy delays writes by at most this much; None waits without a limit. It needs a
        reactor with ``callLater`` and ``seconds``.
    """

    _log = Logger()

    WARNING_INTERVAL = 10.0
    """Seconds between two warnings about missing confirmations; the ones between are counted."""

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        namespace: str,
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
        self._namespace = namespace
        self._channel = invalidation_channel(namespace)
        self._confirmation_channel = confirmation_channel(namespace, origin)
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
        # Reactor thread only: whether confirmations can reach this process, and the messages
        # that wait for them by id.
        self._confirming = False
        self._last_id = 0
        self._waiting: dict[int, _Confirmations] = {}
        self._last_warning: float | None = None
        self._unwarned = 0

    @classmethod
    def from_url(
        cls, redis_url: str, namespace: str, origin: str, reactor: IReactorFromThreads
    ) -> RedisInvalidationBus:
        """
        Build the bus for ``redis_url`` with the channels of ``namespace``.

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

        return cls(client_factory, namespace, origin, reactor)

    @property
    def confirming(self) -> bool:
        """Whether this process's confirmation subscription is confirmed (reactor thread)."""
        return self._confirming

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

    def publish(
        self, bucket: str, keys: Sequence[str] | None, confirm: bool = True
    ) -> Deferred[bool]:
        """
        Publish one message for ``keys`` of ``bucket`` from a pool thread.

        With ``confirm``, the Deferred waits for a confirmation from every subscriber that
        received the message. It needs this process's own confirmation subscription: while
        that is down, the message asks for no confirmations and the Deferred fires with False
        once Redis accepted it.
        """
        key_count = "all" if keys is None else str(len(keys))
        result: Deferred[bool] = Deferred()
        waiting: _Confirmations | None = None
        message_id = None
        if confirm and self._confirming:
            self._last_id += 1
            message_id = self._last_id
            waiting = self._waiting[message_id] = _Confirmations(result)
        payload = encode_message(self._origin, bucket, keys, message_id)

        def send() -> int:
            return int(self._publisher.publish(self._channel, payload))

        def published(receivers: int) -> None:
            if waiting is None:
                # Asked to confirm without a confirmation subscription: not confirmed.
                self._settle(result, not confirm)
                return
            waiting.expected = receivers
            self._check_confirmed(message_id, waiting)

        def failed(failure: Failure) -> None:
            self._log.warn(
                "Publishing a cache invalidation for {count} key(s) of bucket {bucket!r} on"
                " {channel} failed: {error}; other proxies keep their entries for these keys"
                " until the cache ttl expires",
                count=key_count,
                bucket=bucket,
                channel=self._channel,
                error=failure.getErrorMessage(),
            )
            self._settle(result, False, message_id)

        self._run_in_thread(send).addCallbacks(published, failed)
        if self._publish_timeout is not None and not result.called:
            timer = cast(_TimedReactor, self._reactor).callLater(
                self._publish_timeout, self._timed_out, result, confirm, message_id, bucket,
                key_count,
            )
            result.addBoth(self._cancel_timer, timer)
        return result

    @staticmethod
    def _cancel_timer(value: T, timer: Any) -> T:
        if timer.active():
            timer.cancel()
        return value

    def _settle(
        self, result: Deferred[bool], confirmed: bool, message_id: int | None = None
    ) -> None:
        if message_id is not None:
            self._waiting.pop(message_id, None)
        if not result.called:
            result.callback(confirmed)

    def _check_confirmed(self, message_id: int | None, waiting: _Confirmations) -> None:
        if waiting.expected is not None and len(waiting.confirmed_by) >= waiting.expected:
            self._settle(waiting.result, True, message_id)

    def _timed_out(
        self,
        result: Deferred[bool],
        confirm: bool,
        message_id: int | None,
        bucket: str,
        key_count: str,
    ) -> None:
        # The publish thread goes on and may still publish; only the caller stops waiting.
        if not confirm:
            self._settle(result, False)
            return
        waiting = self._waiting.get(message_id) if message_id is not None else None
        if waiting is None or waiting.expected is None:
            problem = "Redis did not accept the message"
        else:
            problem = (
                f"{len(waiting.confirmed_by)} of {waiting.expected} subscribers confirmed the"
                " eviction"
            )
        self._warn_unconfirmed(bucket, key_count, problem)
        self._settle(result, False, message_id)

    def _warn_unconfirmed(self, bucket: str, key_count: str, problem: str) -> None:
        """Warn at most once per WARNING_INTERVAL, with the number of warnings left out."""
        now = cast(_TimedReactor, self._reactor).seconds()
        if self._last_warning is not None and now - self._last_warning < self.WARNING_INTERVAL:
            self._unwarned += 1
            return
        self._log.warn(
            "Cache invalidation of {count} key(s) of bucket {bucket!r} not confirmed within"
            " {timeout} s: {problem}. The write was answered anyway, and another proxy may"
            " serve the old object until it catches up ({unwarned} more such writes since the"
            " last warning). Look for a stopped or overloaded proxy, or for a client other"
            " than a proxy subscribed to {channel}",
            count=key_count,
            bucket=bucket,
            problem=problem,
            timeout=self._publish_timeout,
            unwarned=self._unwarned,
            channel=self._channel,
        )
        self._last_warning = now
        self._unwarned = 0

    def _confirmation_received(self, origin: str, message_id: int) -> None:
        waiting = self._waiting.get(message_id)
        if waiting is None:
            # Late (after the timeout) or for a message of an earlier subscription.
            return
        waiting.confirmed_by.add(origin)
        self._check_confirmed(message_id, waiting)

    def _confirming_changed(self, confirming: bool) -> None:
        self._confirming = confirming
        if not confirming:
            # Confirmations sent while the subscription is down are lost; stop waiting.
            for message_id, waiting in list(self._waiting.items()):
                self._settle(waiting.result, False, message_id)

    def _evict_and_confirm(self, listener: InvalidationListener, message: Invalidation) -> None:
        """Evict on the reactor thread, then confirm, so the sender never hears it too early."""
        listener.invalidation_received(message.bucket, message.keys)
        if message.message_id is None:
            return
        channel = confirmation_channel(self._namespace, message.origin)
        payload = encode_confirmation(self._origin, message.message_id)

        def failed(failure: Failure) -> None:
            self._log.debug(
                "Confirming cache invalidation {message_id} to {channel} failed: {error}",
                message_id=message.message_id,
                channel=channel,
                error=failure.getErrorMessage(),
            )

        self._run_in_thread(lambda: self._publisher.publish(channel, payload)).addErrback(failed)

    # Subscribing.

    def subscribe(self, listener: InvalidationListener | None) -> None:
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

    def _run(self, listener: InvalidationListener | None) -> None:
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
                self._reactor.callFromThread(self._confirming_changed, False)
                if listener is not None:
                    self._reactor.callFromThread(listener.subscription_lost, str(err))
                self._log_failure(err, failed_attempts, delay, listener is not None)
            self._stopping.wait(delay)
            delay = min(delay * 2, self._max_backoff)

    def _log_failure(
        self, err: Exception, failed_attempts: int, delay: float, caching: bool
    ) -> None:
        """Warn once per outage; later attempts of the same outage log at debug level."""
        if failed_attempts == 1:
            self._log.warn(
                "Cache invalidation subscription to {channel} lost: {error}; {consequence};"
                " next attempt in {delay:.1f} s, later ones up to {max_backoff:.1f} s apart",
                channel=self._channel if caching else self._confirmation_channel,
                error=str(err),
                consequence=(
                    "the cache is emptied and stays off until the subscription is back"
                    if caching
                    else "writes are answered without waiting for other proxies to evict"
                ),
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

    def _listen(self, listener: InvalidationListener | None) -> None:
        """Hold one subscription until it fails or the bus closes (runs in a thread)."""
        client = self._client_factory()
        pubsub = client.pubsub()
        try:
            channels = [self._confirmation_channel]
            if listener is not None:
                channels.append(self._channel)
            pubsub.subscribe(*channels)
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

    def _dispatch(self, listener: InvalidationListener | None, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if kind == "subscribe":
            self._ready = True
            if channel == self._confirmation_channel:
                self._reactor.callFromThread(self._confirming_changed, True)
            elif listener is not None:
                self._log.info(
                    "Cache invalidation subscription to {channel} ready", channel=self._channel
                )
                self._reactor.callFromThread(listener.subscription_ready)
        elif kind == "message" and channel == self._confirmation_channel:
            try:
                origin, message_id = decode_confirmation(message["data"])
            except ValueError as err:
                self._log.warn("{error}; ignored", error=str(err))
                return
            self._reactor.callFromThread(self._confirmation_received, origin, message_id)
        elif kind == "message" and listener is not None:
            try:
                invalidation = decode_message(message["data"])
            except ValueError as err:
                # The keys it names are unknown, so nothing cached can be trusted.
                self._log.error("{error}; emptying the cache", error=str(err))
                self._reactor.callFromThread(listener.subscription_lost, str(err))
                self._reactor.callFromThread(listener.subscription_ready)
                return
            if invalidation.origin != self._origin:
                self._reactor.callFromThread(self._evict_and_confirm, listener, invalidation)
            elif invalidation.message_id is not None:
                # The local eviction happened before the publish.
                self._reactor.callFromThread(
                    self._confirmation_received, self._origin, invalidation.message_id
                )
