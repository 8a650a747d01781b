"""Run the exporter or the proxy service in this process, as ``twistd`` would.

Run as ``python -m bench._serve exporter|proxy|proxy-metrics-off LOG_FILE OPTIONS...``.
The options are those of ``twistd s3proxy-exporter`` or ``twistd s3proxy``; the service
tree comes from the same ``makeService``. Log events go to LOG_FILE as twistd writes
them, so per-request logging costs the same as in a deployment. SIGTERM stops the
services and the reactor.

``proxy-metrics-off`` builds the same proxy, but every module gets a :class:`NullMetrics`
whose recording calls do nothing, and the flusher never starts. It exists only to measure
what recording and flushing cost the proxy; the product has no such switch.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from twisted.application.service import Service
from twisted.logger import globalLogBeginner, textFileLogObserver

__all__ = ["NullMetrics", "main"]


class _NullChild:
    """A series whose recording calls do nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class _NullFamily(_NullChild):
    """A family whose ``labels()`` returns one shared :class:`_NullChild`."""

    _child = _NullChild()

    def labels(self, *values: object, **named: object) -> _NullChild:
        return self._child


class NullMetrics:
    """Stands in for ``collector.Metrics``: every family attribute records nothing."""

    _family = _NullFamily()

    def __getattr__(self, name: str) -> _NullFamily:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._family

    def family(self, name: str) -> _NullFamily:
        return self._family


def _metrics_off() -> None:
    """Make ``collector.open_monitoring`` hand out :class:`NullMetrics` and no flusher."""
    import collector

    real_open_monitoring = collector.open_monitoring

    def open_monitoring_without_metrics(*args: Any, **kwargs: Any) -> Any:
        monitoring = real_open_monitoring(*args, **kwargs)
        metrics: Any = NullMetrics()
        service: Any = Service()
        return dataclasses.replace(monitoring, metrics=metrics, service=service)

    # proxy.tap imports open_monitoring from the collector package when it builds the
    # service, so replacing the package attribute reaches it.
    collector.open_monitoring = open_monitoring_without_metrics


def main(argv: list[str]) -> int:
    kind, log_path, options_argv = argv[1], argv[2], argv[3:]
    if kind == "exporter":
        from collector import exporter_tap as tap
    elif kind in ("proxy", "proxy-metrics-off"):
        from proxy import tap  # type: ignore[no-redef]

        if kind == "proxy-metrics-off":
            _metrics_off()
    else:
        raise SystemExit(f"unknown service {kind!r}; use exporter, proxy or proxy-metrics-off")

    # The file stays open until the process exits.
    log_file = open(log_path, "a", encoding="utf-8")
    observer: Any = textFileLogObserver(log_file)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    options = tap.Options()
    options.parseOptions(options_argv)
    service: Any = tap.makeService(options)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
