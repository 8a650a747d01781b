"""The flusher: ships the delta buffer to the store on a fixed interval.

Each tick cuts a :class:`Batch` from the buffer on the reactor thread and applies it in a
thread, in one store call that also writes the writer's heartbeat. A batch that fails
stays pending and is resent unchanged on the next tick. Meanwhile new deltas collect in
the buffer, and the next batch is cut only after the pending one is applied. Because the store
applies each (writer, sequence) at most once, a resend after a lost reply is harmless, as
long as it comes within the store's sequence retention (7 days by default).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from collector.buffer import Batch
from collector.definitions import MetricDefinition
from collector.metrics import Metrics
from collector.store import ApplyResult, MetricStore, SchemaConflictError

__all__ = ["Flusher", "RunInThread", "make_writer_id"]

RunInThread = Callable[..., "Deferred[Any]"]
"""Runs ``function(*args)`` off the reactor thread; returns a Deferred of its result."""


def make_writer_id() -> str:
    """Return a new writer id: host name, process id and a random boot id.

    The boot id keeps ids unique when a pid is reused, or when containers all run their
    process as pid 1.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Flusher(Service):
    """A service that flushes the buffer of ``metrics`` to ``store`` every ``interval``.

    :param store: where batches go; its methods are called through ``run_in_thread``,
        except the first registration in :meth:`startService`.
    :param metrics: the recording API whose buffer is flushed; the flusher records its
        own failures and pending series there.
    :param writer_id: this process's id, see :func:`make_writer_id`.
    :param clock: schedules the ticks and timestamps the batches.
    :param run_in_thread: runs a blocking store call off the reactor thread, e.g.
        ``partial(deferToThreadPool, reactor, reactor.getThreadPool())``; tests pass a
        synchronous runner.
    :param interval: seconds between flushes; default 1.
    :param error_log_interval: failures are logged at most once per this many seconds,
        with the number of failures since the last message; default 60.
    """

    _log = Logger()

    def __init__(
        self,
        store: MetricStore,
        metrics: Metrics,
        writer_id: str,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        interval: float = 1.0,
        error_log_interval: float = 60.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"flush interval {interval!r} is invalid; give seconds > 0")
        self.store = store
        self.metrics = metrics
        self.writer_id = writer_id
        self.clock = clock
        # zope.interface declares methods without self, which mypy rejects without the
        # mypy-zope plugin.
        self._now: Callable[[], float] = clock.seconds  # type: ignore[misc]
        self.interval = interval
        self.error_log_interval = error_log_interval
        self._run_in_thread = run_in_thread
        self._definitions: Sequence[MetricDefinition] = metrics.definitions
        self._registered = False
        self._sequence = 0
        self._pending: Batch | None = None
        self._in_flight: Deferred[bool] | None = None
        self._loop: LoopingCall | None = None
        self._failures = 0
        self._unlogged_failures = 0
        self._last_error_log: float | None = None

    @property
    def pending(self) -> Batch | None:
        """The batch that failed and is resent on the next flush, if any."""
        return self._pending

    def startService(self) -> None:
        """Register the definitions and start flushing every ``interval`` seconds.

        The registration runs on the calling thread and blocks until the store replies
        or the store client times out. When the store cannot be reached, the
        registration is retried before each batch.

        :raises SchemaConflictError: (a ValueError) when a stored definition differs
            from this process's one; the service does not start.
        """
        try:
            self.store.register(self._definitions)
            self._registered = True
        except SchemaConflictError:
            raise
        except Exception as err:
            self._log.warn(
                "Could not register metric definitions, retrying before each flush: {error}",
                error=_describe(err),
            )
        super().startService()
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop the ticks, then flush what is left and remove this writer's gauges.

        :return: a Deferred that fires when the last flush has finished, whether or not
            it succeeded; it never fails.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._flush_for_stop())

    async def _flush_for_stop(self) -> None:
        if self._in_flight is not None:
            await self._in_flight
        if self._pending is not None and not await self.flush():
            self._log_lost()
            return
        if not await self.flush(retire=True):
            self._log_lost()

    def _log_lost(self) -> None:
        lost = self._pending.series_count() if self._pending else 0
        self._log.error(
            "Metrics of {series} series were not written to the store at stop",
            series=lost + self.metrics.buffer.series_count(),
        )

    def flush(self, retire: bool = False) -> Deferred[bool]:
        """Apply the pending batch, or cut and apply a new one.

        :param retire: mark a new batch as this writer's last; the store then removes
            the writer's gauges and heartbeat.
        :return: a Deferred that fires with True when a batch was applied (or had been
            before) and False when it failed; it never fails.
        """
        try:
            if self._pending is None:
                buffer = self.metrics.buffer
                self.metrics.metrics_pending_series.set(buffer.delta_count())
                self._sequence += 1
                self._pending = buffer.swap(
                    self.writer_id, self._sequence, self._now(), retire
                )
            batch = self._pending
            shipped = self._run_in_thread(self._ship, batch, self._now())
        except Exception:
            self._log.failure("BUG: could not start a metrics flush")
            return succeed(False)

        result: Deferred[bool] = shipped.addCallbacks(
            self._shipped, self._failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )
        result.addErrback(self._bug)
        self._in_flight = result
        result.addBoth(self._clear_in_flight)
        return result

    def _bug(self, failure: Failure) -> bool:
        self._log.failure("BUG: metrics flush bookkeeping failed", failure)
        return False

    def _clear_in_flight(self, result: bool) -> bool:
        self._in_flight = None
        return result

    def _ship(self, batch: Batch, now: float) -> ApplyResult:
        # Runs in a thread. The definitions must be stored before any deltas so that a
        # collector can render what it finds.
        if not self._registered:
            self.store.register(self._definitions)
            self._registered = True
        result = self.store.apply(batch, now)

        # Redis lost its data (FLUSHALL, a restart without persistence): store the
        # definitions again so that collectors can render the new deltas.
        if result.metadata_missing:
            self._registered = False
            self.store.register(self._definitions)
            self._registered = True
        return result

    def _shipped(self, result: ApplyResult, batch: Batch) -> bool:
        if self._pending is batch:
            self._pending = None
        if self._failures:
            self._log.info(
                "Metrics flush succeeded again after {failures} failed attempts",
                failures=self._failures,
            )
            self._failures = 0
            self._unlogged_failures = 0
            self._last_error_log = None
        if result.failed_operations:
            self._log.warn(
                "Store rejected {count} operations of batch {sequence}; "
                "fields that hold no number cannot be incremented",
                count=result.failed_operations,
                sequence=batch.sequence,
            )
        return True

    def _failed(self, failure: Failure, batch: Batch) -> bool:
        self._failures += 1
        self._unlogged_failures += 1
        self.metrics.metrics_flush_failures_total.inc()

        now = self._now()
        due = self._last_error_log is None or now - self._last_error_log >= self.error_log_interval
        if due:
            self._log.error(
                "Metrics flush of batch {sequence} failed ({count} failures since the last "
                "message), keeping it to resend: {error}",
                sequence=batch.sequence,
                count=self._unlogged_failures,
                error=_describe(failure.value or Exception(failure)),
            )
            self._last_error_log = now
            self._unlogged_failures = 0
        return False


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
