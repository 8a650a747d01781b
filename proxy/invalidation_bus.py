"""
Cache invalidation over Redis pub/sub, with confirmations, a registry and a lease.

Three mechanisms together make a write's response safe to act on: once a client has it, no
proxy serves the object's older bytes from its cache, unless the write was counted as
unconfirmed.

- **Confirmations.** Every subscriber evicts the keys of a message on its reactor thread and
  then publishes a confirmation on the sender's channel. The sender waits (for at most
  ``publish_timeout``) for a confirmation from every proxy in the registry.
- **Registry.** Each proxy that caches keeps its origin in the sorted set
  ``{<namespace>}:cache:proxies``, scored with the Redis server's clock and refreshed every
  ``ping_interval``. A sender reads it in the same script that publishes. So it also waits for a
  proxy whose connection Redis has dropped but which has not noticed yet, which ``PUBLISH``
  alone would not count. Members older than ``registry_ttl`` no longer count, and clients that
  subscribe to the channel without registering (``redis-cli SUBSCRIBE``) are never waited for.
- **Lease.** A proxy serves cached objects only while its subscription has proved alive within
  the last ``lease`` seconds: a PONG for a PING that it sent no longer ago than that, and a
  successful registry refresh started no longer ago than that. A PONG for a PING sent at time
  ``t`` comes after every message that Redis published before it read the PING, so nothing
  published before ``t`` can still be missing. The lease is shorter than ``publish_timeout``:
  a proxy that a write waited for in vain because it is cut off from Redis has stopped serving
  cached objects by the time the write is answered.

Limitations:

- A write that is answered without every confirmation (timeout, failed publish) is counted by
  the caller. A GET through a proxy whose reactor is slower than the timeout can then return
  the old bytes, and so can one through a proxy that was cut off after its last PONG but
  before the message reached it, within the rest of its lease.
- A proxy that stops (SIGKILL, a lost host) stays in the registry for ``registry_ttl``, so
  writes during that time wait the whole ``publish_timeout``.
- The lease is measured with this host's monotonic clock and the registry with the Redis
  server's wall clock; neither depends on the clocks of other proxies. A step of the Redis
  clock shifts the registry: backwards, a killed proxy stays registered for that much longer;
  forwards by more than ``registry_ttl``, every proxy drops out until its next refresh, and
  writes in between do not wait for anyone.
- When this process cannot confirm (its own subscription is down, or publishing failed), a
  write is held back until the timeout, so that proxies cut off at the same moment have let
  their leases lapse. A fleet with the cache disabled everywhere skips that wait once it has
  read an empty registry.
"""

from __future__ import annotations

import threading
import time
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

from proxy.cache_invalidation import (
    Invalidation,
    InvalidationListener,
    confirmation_channel,
    decode_confirmation,
    decode_message,
    encode_confirmation,
    encode_message,
    invalidation_channel,
    registry_key,
)

__all__ = ["PUBLISH_THREADS", "RedisInvalidationBus"]

T = TypeVar("T")

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Run a blocking callable off the reactor thread; the Deferred fires with its result."""

PUBLISH_THREADS = 4
"""Threads of a bus's own publish pool; more only queue up behind a Redis that does not reply."""

_PING_PREFIX = "s3proxy-lease "
"""Starts the payload of this bus's PINGs; the rest is the send time on the bus's clock."""

# Both scripts take the time from the Redis server, so the proxies' clocks do not matter. Redis
# 5 and later replicate a script by its effects, which allows TIME before a write.
_REGISTER_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
"""

_PUBLISH_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
return {receivers, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""


class _TimedReactor(Protocol):
    def callLater(self, delay: float, function: Callable[..., Any], *args: Any) -> Any: ...


class _LogLimiter:
    """Allows one log line per ``interval`` seconds and counts the ones left out."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._skipped = 0

    def allow(self) -> int | None:
        """Return the number of lines left out since the last one if a line is due, else None."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._skipped += 1
            return None
        skipped, self._skipped, self._last = self._skipped, 0, now
        return skipped


@dataclass
class _Confirmations:
    """A published message that waits for the confirmations of the registered proxies."""

    result: Deferred[bool]
    # The registered proxies, known once Redis replies; confirmations may arrive before that.
    expected: set[str] | None = None
    confirmed_by: set[str] = field(default_factory=set)
    # Why confirming is impossible, once that is known.
    problem: str | None = None


class RedisInvalidationBus:
    """
    Invalidation over Redis pub/sub: publishes through a thread pool, subscribes in a thread.

    :param client_factory: returns a new ``redis.Redis``. It is called once per subscription
        attempt, and once for commands unless ``command_client`` is given. Use
        :meth:`from_url` for the production settings.
    :param namespace: the deployment's namespace; it names the channels and the registry.
    :param origin: the id of this process, unique in the deployment. Messages with this
        origin are not delivered to the listener, because the local eviction already happened.
    :param reactor: delivers to the listener with ``callFromThread``.
    :param run_in_thread: runs a blocking publish; defaults to a thread pool of the bus's own
        (:data:`PUBLISH_THREADS` threads, started on the first publish, stopped by
        :meth:`close`). It is not the reactor's pool, because while Redis does not reply
        every publish holds its thread for the socket timeout (5 s), and in the reactor's
        pool that starved name resolution, so backend connections waited behind them.
    :param ping_interval: seconds between PINGs on the subscription and between registry
        refreshes.
    :param loss_timeout: seconds without any reply on the subscription after which it counts
        as lost; the cache is then emptied.
    :param max_backoff: upper bound in seconds of the delay between subscription attempts,
        which starts at 0.1 s and doubles.
    :param publish_timeout: seconds after which the Deferred of :meth:`publish` fires even if
        Redis has not replied or confirmations are missing, so that a slow Redis or a slow
        proxy delays writes by at most this much; None waits without a limit. It needs a
        reactor with ``callLater``.
    :param lease: seconds after the last proof of a live subscription during which
        :meth:`serving_allowed` is true; it must be shorter than ``publish_timeout`` and longer
        than ``ping_interval``.
    :param registry_ttl: seconds a registration counts after its last refresh; it must be
        longer than ``lease``.
    :param clock: the monotonic clock of the lease and the log rate limits.
    :param command_client: the client for publishing and the registry; in a Redis Cluster it
        must route by key, unlike the subscriber's client.
    :raises ValueError: the timing parameters do not fit together.
    """

    _log = Logger()

    WARNING_INTERVAL = 10.0
    """Seconds between two warnings of one kind; the ones between are counted."""

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        namespace: str,
        origin: str,
        reactor: IReactorFromThreads,
        run_in_thread: RunInThread | None = None,
        ping_interval: float = 0.25,
        loss_timeout: float = 15.0,
        max_backoff: float = 5.0,
        publish_timeout: float | None = 1.0,
        lease: float = 0.75,
        registry_ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        command_client: Any = None,
    ) -> None:
        if not 0 < ping_interval < lease < registry_ttl:
            raise ValueError(
                f"ping_interval {ping_interval!r}, lease {lease!r} and registry_ttl"
                f" {registry_ttl!r} are invalid; they must satisfy 0 < ping_interval < lease"
                " < registry_ttl"
            )
        if publish_timeout is not None and lease >= publish_timeout:
            raise ValueError(
                f"lease {lease!r} is invalid; it must be shorter than publish_timeout"
                f" {publish_timeout!r}"
            )

        self._client_factory = client_factory
        self._namespace = namespace
        self._channel = invalidation_channel(namespace)
        self._confirmation_channel = confirmation_channel(namespace, origin)
        self._registry = registry_key(namespace)
        self._origin = origin
        self._reactor = reactor
        self._run_in_thread = run_in_thread or self._default_run_in_thread
        self._ping_interval = ping_interval
        self._loss_timeout = loss_timeout
        self._max_backoff = max_backoff
        self._publish_timeout = publish_timeout
        self._lease = lease
        self._registry_ttl_ms = int(registry_ttl * 1000)
        self._clock = clock

        # Creating a client opens no connection; redis-py clients are thread-safe.
        self._commands = command_client if command_client is not None else client_factory()
        self._register_script = self._commands.register_script(_REGISTER_SCRIPT)
        self._publish_script = self._commands.register_script(_PUBLISH_SCRIPT)

        self._stopping = threading.Event()
        # Subscriber thread only: whether the current connection's SUBSCRIBE is confirmed, and
        # whether this process is in the registry.
        self._ready = False
        self._registered = False
        self._malformed_log = _LogLimiter(self.WARNING_INTERVAL, clock)
        self._loss_log = _LogLimiter(self.WARNING_INTERVAL, clock)
        self._thread: threading.Thread | None = None
        self._publish_pool: ThreadPool | None = None

        # Reactor thread only: whether confirmations can reach this process, the messages that
        # wait for them by id, and the lease.
        self._confirming = False
        self._last_id = 0
        self._waiting: dict[int, _Confirmations] = {}
        self._heard_at: float | None = None
        self._registered_at: float | None = None
        # The start of the first registry refresh after the lease lapsed. Writers may have
        # skipped this process before it, so only PINGs sent after it renew the lease.
        self._registered_since: float | None = None
        # Whether this process caches (it subscribed with a listener), and whether the registry
        # was empty when last read; unknown counts as not empty.
        self._caching = False
        self._registry_empty = False
        self._unconfirmed_log = _LogLimiter(self.WARNING_INTERVAL, clock)
        self._publish_failure_log = _LogLimiter(self.WARNING_INTERVAL, clock)

    @classmethod
    def from_url(
        cls, redis_url: str, namespace: str, origin: str, reactor: IReactorFromThreads
    ) -> RedisInvalidationBus:
        """
        Build the bus for ``redis_url`` with the channels of ``namespace``.

        The clients are built without retries, so every connection error reaches this class
        and a gap in the subscription always reaches the listener. While handling the error,
        redis-py 8 still reconnects and subscribes once on the connection that is then
        closed.
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

    def serving_allowed(self) -> bool:
        """Return whether the lease holds: cached objects may be served now (reactor thread)."""
        if self._heard_at is None or self._registered_at is None:
            return False
        assert self._registered_since is not None
        now = self._clock()
        return (
            now - self._heard_at <= self._lease
            and now - self._registered_at <= self._lease
            and self._heard_at >= self._registered_since
        )

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

        With ``confirm``, the Deferred waits for a confirmation from every proxy in the
        registry, which needs this process's own confirmation subscription. When confirming is
        impossible (that subscription is down, or publishing failed), the Deferred fires with
        False only at the timeout. By then every proxy cut off from Redis has let its lease
        lapse, so holding the write back keeps such a proxy from serving the old bytes to the
        writer's client. There is no hold when nothing can be cached: this proxy's cache is
        disabled and the registry was empty when last read.
        """
        key_count = "all" if keys is None else str(len(keys))
        result: Deferred[bool] = Deferred()
        waiting: _Confirmations | None = None
        message_id = None
        if confirm:
            waiting = _Confirmations(result)
            if self._confirming:
                self._last_id += 1
                message_id = self._last_id
                self._waiting[message_id] = waiting
            else:
                waiting.problem = "the writer's own confirmation subscription is down"
        payload = encode_message(self._origin, bucket, keys, message_id)

        def send() -> set[str] | None:
            if message_id is None:
                self._commands.publish(self._channel, payload)
                return None
            _receivers, members = self._publish_script(
                keys=[self._registry], args=[self._channel, payload, self._registry_ttl_ms]
            )
            return {
                member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
                for member in members
            }

        def published(registered: set[str] | None) -> None:
            if waiting is None:
                self._settle(result, True)
            elif registered is None:
                self._give_up(waiting)
            else:
                self._registry_empty = not registered
                waiting.expected = registered
                self._check_confirmed(message_id, waiting)

        def failed(failure: Failure) -> None:
            error = failure.getErrorMessage()
            if waiting is not None:
                waiting.problem = f"publishing failed: {error}"
                if message_id is not None:
                    self._waiting.pop(message_id, None)
                if self._give_up(waiting):
                    # The timeout warns, with this problem.
                    return
            skipped = self._publish_failure_log.allow()
            if skipped is not None:
                self._log.warn(
                    "Publishing a cache invalidation for {count} key(s) of bucket {bucket!r} on"
                    " {channel} failed: {error}. Other proxies keep their entries for these"
                    " keys until the cache ttl expires ({skipped} more failures since the last"
                    " warning)",
                    count=key_count,
                    bucket=bucket,
                    channel=self._channel,
                    error=error,
                    skipped=skipped,
                )
            self._settle(result, False)

        self._run_in_thread(send).addCallbacks(published, failed)
        if self._publish_timeout is not None and not result.called:
            timer = cast(_TimedReactor, self._reactor).callLater(
                self._publish_timeout, self._timed_out, waiting, result, message_id, bucket,
                key_count,
            )
            result.addBoth(self._cancel_timer, timer)
        return result

    def _give_up(self, waiting: _Confirmations) -> bool:
        """
        Fire a confirmation request that cannot succeed with False, or leave it to the timeout.

        :return: True when the timeout fires it, because a cut-off proxy may still cache.
        """
        holding = self._publish_timeout is not None and (
            self._caching or not self._registry_empty
        )
        if not holding:
            self._settle(waiting.result, False)
        return holding

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
        if waiting.expected is not None and waiting.expected <= waiting.confirmed_by:
            self._settle(waiting.result, True, message_id)

    def _timed_out(
        self,
        waiting: _Confirmations | None,
        result: Deferred[bool],
        message_id: int | None,
        bucket: str,
        key_count: str,
    ) -> None:
        # The publish thread goes on and may still publish; only the caller stops waiting.
        if waiting is None:
            self._settle(result, False)
            return
        if waiting.problem is not None:
            problem = waiting.problem
        elif waiting.expected is None:
            problem = "Redis did not accept the message"
        else:
            missing = sorted(waiting.expected - waiting.confirmed_by)
            problem = (
                f"{len(waiting.expected) - len(missing)} of {len(waiting.expected)} registered"
                f" proxies confirmed the eviction; missing: {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        skipped = self._unconfirmed_log.allow()
        if skipped is not None:
            self._log.warn(
                "Cache invalidation of {count} key(s) of bucket {bucket!r} not confirmed within"
                " {timeout} s: {problem}. The write was answered anyway, and a proxy that has"
                " not evicted the keys yet may serve the old object ({skipped} more such writes"
                " since the last warning). Look for a stopped or overloaded proxy",
                count=key_count,
                bucket=bucket,
                problem=problem,
                timeout=self._publish_timeout,
                skipped=skipped,
            )
        self._settle(result, False, message_id)

    def _confirmation_received(self, origin: str, message_id: int) -> None:
        waiting = self._waiting.get(message_id)
        if waiting is None:
            # Late (after the timeout) or for a message of an earlier subscription.
            return
        waiting.confirmed_by.add(origin)
        self._check_confirmed(message_id, waiting)

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

        self._run_in_thread(lambda: self._commands.publish(channel, payload)).addErrback(failed)

    # State handed over from the subscriber thread.

    def _connection_up(self, confirming: bool) -> None:
        self._confirming = confirming

    def _connection_down(self) -> None:
        self._confirming = False
        self._heard_at = None
        self._registered_at = None
        self._registered_since = None
        # Confirmations sent while the subscription is down are lost; stop waiting for them.
        waiting_list = list(self._waiting.values())
        self._waiting.clear()
        for waiting in waiting_list:
            waiting.problem = "the writer's own confirmation subscription was lost"
            self._give_up(waiting)

    def _heard(self, ping_sent_at: float) -> None:
        if self._heard_at is None or ping_sent_at > self._heard_at:
            self._heard_at = ping_sent_at

    def _registration_refreshed(self, started_at: float) -> None:
        if self._registered_at is None or started_at - self._registered_at > self._lease:
            # Writers may have skipped this process since its lease lapsed.
            self._registered_since = started_at
        if self._registered_at is None or started_at > self._registered_at:
            self._registered_at = started_at

    # Subscribing.

    def subscribe(self, listener: InvalidationListener | None) -> None:
        """Start the subscriber thread; it runs until :meth:`close`."""
        if self._thread is not None:
            raise RuntimeError(f"the subscriber of {self._channel} is already running")
        self._caching = listener is not None
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
            except Exception as err:
                self._deregister()
                if self._stopping.is_set():
                    break
                if not isinstance(err, (redis.RedisError, OSError)):
                    self._log.failure(
                        "Cache invalidation subscriber of {channel} failed; handling it as a"
                        " lost subscription",
                        channel=self._channel,
                    )
                if self._ready:
                    # A confirmed subscription broke, so a new outage starts here.
                    delay = 0.1
                    failed_attempts = 0
                failed_attempts += 1
                self._reactor.callFromThread(self._connection_down)
                if listener is not None:
                    self._reactor.callFromThread(listener.subscription_lost, str(err))
                self._log_failure(err, failed_attempts, delay, listener is not None)
            self._stopping.wait(delay)
            delay = min(delay * 2, self._max_backoff)
        self._deregister()

    def _log_failure(
        self, err: Exception, failed_attempts: int, delay: float, caching: bool
    ) -> None:
        """
        Warn once per outage, and at most once per WARNING_INTERVAL when outages follow each
        other; everything else logs at debug level.
        """
        skipped = self._loss_log.allow() if failed_attempts == 1 else None
        if skipped is not None:
            self._log.warn(
                "Cache invalidation subscription to {channel} lost: {error}; {consequence};"
                " next attempt in {delay:.1f} s, later ones up to {max_backoff:.1f} s apart"
                " ({skipped} more losses since the last warning)",
                channel=self._channel if caching else self._confirmation_channel,
                error=str(err),
                consequence=(
                    "the cache is emptied and stays off until the subscription is back"
                    if caching
                    else "writes are answered without waiting for other proxies to evict"
                ),
                delay=delay,
                max_backoff=self._max_backoff,
                skipped=skipped,
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
            # time.monotonic paces the loop; the lease uses self._clock, which tests control.
            last_received = last_ping = last_refresh = time.monotonic()
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=self._ping_interval)
                now = time.monotonic()
                ping_now = False
                if message is not None:
                    last_received = now
                    # A first registration starts the lease with a PING sent after it.
                    ping_now = self._dispatch(listener, message)
                elif now - last_received > self._loss_timeout:
                    raise redis.ConnectionError(
                        f"no reply on the subscription for {now - last_received:.1f} s"
                    )
                if ping_now or now - last_ping >= self._ping_interval:
                    pubsub.ping(f"{_PING_PREFIX}{self._clock()!r}")
                    last_ping = now
                if self._registered and now - last_refresh >= self._ping_interval:
                    self._register()
                    last_refresh = now
        finally:
            pubsub.close()
            client.close()

    def _register(self) -> None:
        """Add or refresh this process in the registry (subscriber thread)."""
        started_at = self._clock()
        self._register_script(keys=[self._registry], args=[self._origin, self._registry_ttl_ms])
        self._registered = True
        self._reactor.callFromThread(self._registration_refreshed, started_at)

    def _deregister(self) -> None:
        """Leave the registry, so writes stop waiting for this process (subscriber thread)."""
        if not self._registered:
            return
        self._registered = False
        try:
            self._commands.zrem(self._registry, self._origin)
        except (redis.RedisError, OSError) as err:
            self._log.debug(
                "Leaving the cache registry {key} failed: {error}; the entry expires by itself",
                key=self._registry,
                error=str(err),
            )

    def _dispatch(self, listener: InvalidationListener | None, message: dict[str, Any]) -> bool:
        """Hand one message to the reactor; return True right after the first registration."""
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if kind == "pong":
            self._pong_received(message.get("data"))
        elif kind == "subscribe":
            self._ready = True
            if channel == self._confirmation_channel:
                self._reactor.callFromThread(self._connection_up, True)
            elif listener is not None:
                # Registered before caching starts, so every write that this cache could miss
                # waits for it.
                self._register()
                self._log.info(
                    "Cache invalidation subscription to {channel} ready", channel=self._channel
                )
                self._reactor.callFromThread(listener.subscription_ready)
                return True
        elif kind == "message" and channel == self._confirmation_channel:
            try:
                origin, message_id = decode_confirmation(message["data"])
            except ValueError as err:
                self._log_malformed(str(err), "ignored")
                return False
            self._reactor.callFromThread(self._confirmation_received, origin, message_id)
        elif kind == "message" and listener is not None:
            try:
                invalidation = decode_message(message["data"])
            except ValueError as err:
                # The keys it names are unknown, so nothing cached can be trusted.
                self._log_malformed(str(err), "emptying the cache")
                self._reactor.callFromThread(listener.subscription_lost, str(err))
                self._reactor.callFromThread(listener.subscription_ready)
                return False
            if invalidation.origin != self._origin:
                self._reactor.callFromThread(self._evict_and_confirm, listener, invalidation)
            elif invalidation.message_id is not None:
                # The local eviction happened before the publish.
                self._reactor.callFromThread(
                    self._confirmation_received, self._origin, invalidation.message_id
                )
        return False

    def _pong_received(self, data: Any) -> None:
        """Extend the lease to the send time of the PING that this PONG replies to."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if not isinstance(data, str) or not data.startswith(_PING_PREFIX):
            return
        try:
            ping_sent_at = float(data[len(_PING_PREFIX) :])
        except ValueError:
            return
        self._reactor.callFromThread(self._heard, ping_sent_at)

    def _log_malformed(self, error: str, consequence: str) -> None:
        skipped = self._malformed_log.allow()
        if skipped is not None:
            self._log.error(
                "{error}; {consequence} ({skipped} more malformed messages since the last"
                " error)",
                error=error,
                consequence=consequence,
                skipped=skipped,
            )
