"""
Graceful stop of C{twistd s3proxy}: stop accepting, let requests finish, flush, exit.

On SIGTERM the reactor calls C{stopService} of the root service and waits for the Deferred it
returns. C{MultiService} calls every child's C{stopService} at once, so the metrics flusher
would cut its last batch while requests are still in flight. L{SequentialMultiService} stops
its children one after the other, last added first, each after the previous one's Deferred
fired. The proxy adds the flusher first, then L{DrainService}, then the S3 listener: the
listener stops accepting, the drain waits for the requests in flight (at most
C{[server] shutdown_timeout} seconds), and the flusher writes the last batch after them.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from proxy.forward import Clock

__all__ = ["Drainable", "DrainService", "SequentialMultiService"]


class Drainable(Protocol):
    """Something with requests in flight, such as the gateway."""

    @property
    def in_flight(self) -> int:
        """The number of requests that started and have not been counted yet."""
        ...

    def drain(self) -> Deferred[None]:
        """Return a Deferred that fires once no request is in flight."""
        ...


class SequentialMultiService(MultiService):
    """
    A C{MultiService} that stops its children one at a time, in reverse order of addition.

    Each child's C{stopService} starts only after the previous child's Deferred fired. A child
    that fails to stop is logged and the next one is stopped anyway.
    """

    _log = Logger()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order(list(reversed(list(self)))))

    async def _stop_in_order(self, services: list[Any]) -> None:
        for service in services:
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                self._log.failure("Stopping service {service!r} failed", service=service)


class DrainService(Service):
    """
    Waits at stop for the requests in flight, at most C{timeout} seconds.

    @param target: the gateway whose requests are waited for.
    @param timeout: seconds to wait; 0 does not wait.
    @param clock: schedules the timeout.
    """

    _log = Logger()

    def __init__(self, target: Drainable, timeout: float, clock: Clock) -> None:
        if not timeout >= 0:
            raise ValueError(f"shutdown timeout {timeout!r} is invalid; give seconds >= 0")
        self.target = target
        self.timeout = timeout
        self.clock = clock

    def stopService(self) -> Deferred[None]:
        """
        Return a Deferred that fires when no request is in flight or the timeout passed.

        It never fails. Requests still running at the timeout are logged; they are counted
        only if they end before the metrics flusher's last batch.
        """
        super().stopService()
        waiting = self.target.in_flight
        if not waiting:
            return succeed(None)
        self._log.info(
            "Stopping: waiting up to {timeout} s for {count} requests in flight",
            timeout=self.timeout,
            count=waiting,
        )
        done: Deferred[None] = Deferred()
        timer: Any = None

        def drained(_: object) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not done.called:
                self._log.info("Stopping: every request in flight has finished")
                done.callback(None)

        def timed_out() -> None:
            if not done.called:
                self._log.warn(
                    "Stopping: {count} requests still in flight after {timeout} s; "
                    "stopping without them",
                    count=self.target.in_flight,
                    timeout=self.timeout,
                )
                done.callback(None)

        timer = self.clock.callLater(self.timeout, timed_out)
        self.target.drain().addCallback(drained)
        return done
