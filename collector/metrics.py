"""The recording API: counters, gauges and histograms backed by a :class:`DeltaBuffer`.

Usage mirrors prometheus_client::

    metrics.requests_total.labels("get_object", "200").inc()
    metrics.request_latency_seconds.labels(operation="get_object").observe(0.012)
    metrics.backend_state.labels("primary").set(1)
    metrics.cache_hits_total.inc()

A recording call only updates the in-process buffer and never waits on Redis. Calls must
run on the reactor thread because the buffer has no lock.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Generic, TypeVar, cast

from collector.buffer import DeltaBuffer, HistogramDelta, SeriesKey
from collector.definitions import (
    APPLICATION_METRICS,
    WRITER_METRICS,
    MetricDefinition,
    check_unique,
)

__all__ = [
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "Metrics",
]

_INF = math.inf


class CounterChild:
    """One counter series."""

    __slots__ = ("_buffer", "_key")

    def __init__(self, buffer: DeltaBuffer, key: SeriesKey) -> None:
        self._buffer = buffer
        self._key = key

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to the counter.

        :raises ValueError: when ``amount`` is negative, infinite or NaN.
        """
        if not 0 <= amount < _INF:
            raise ValueError(
                f"counter increment {amount!r} of {self._key[0]!r} is invalid; "
                "counters only increase by a finite amount >= 0"
            )
        counters = self._buffer.counters
        key = self._key
        total = counters.get(key)
        if total is None:
            # First delta of this series since the last swap; see DeltaBuffer.admit.
            key = self._buffer.admit(key)
            total = counters.get(key, 0.0)
        counters[key] = total + amount


class GaugeChild:
    """One gauge series of this writer."""

    __slots__ = ("_buffer", "_key")

    def __init__(self, buffer: DeltaBuffer, key: SeriesKey) -> None:
        self._buffer = buffer
        self._key = key

    def set(self, value: float) -> None:
        """Set the gauge to ``value``.

        :raises ValueError: when ``value`` is infinite or NaN.
        """
        if not -_INF < value < _INF:
            raise ValueError(
                f"gauge value {value!r} of {self._key[0]!r} is invalid; give a finite number"
            )
        buffer = self._buffer
        buffer.gauges[self._key] = float(value)
        if buffer.clock is not None:
            buffer.gauge_times[self._key] = buffer.clock()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (may be negative) to the gauge; an unset gauge starts at 0.

        :raises ValueError: when ``amount`` is infinite or NaN.
        """
        self.set(self._buffer.gauges.get(self._key, 0.0) + self._check_amount(amount))

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount`` from the gauge; an unset gauge starts at 0.

        :raises ValueError: when ``amount`` is infinite or NaN.
        """
        self.set(self._buffer.gauges.get(self._key, 0.0) - self._check_amount(amount))

    def _check_amount(self, amount: float) -> float:
        if not -_INF < amount < _INF:
            raise ValueError(
                f"gauge change {amount!r} of {self._key[0]!r} is invalid; give a finite number"
            )
        return amount


class HistogramChild:
    """One histogram series."""

    __slots__ = ("_buffer", "_key", "_bounds")

    def __init__(self, buffer: DeltaBuffer, key: SeriesKey, bounds: tuple[float, ...]) -> None:
        self._buffer = buffer
        self._key = key
        self._bounds = bounds

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` in its bucket and add it to the sum.

        :raises ValueError: when ``value`` is infinite or NaN.
        """
        if not -_INF < value < _INF:
            raise ValueError(
                f"observation {value!r} of {self._key[0]!r} is invalid; give a finite number"
            )
        histograms = self._buffer.histograms
        delta = histograms.get(self._key)
        if delta is None:
            # First observation of this series since the last swap; see DeltaBuffer.admit.
            key = self._buffer.admit(self._key)
            delta = histograms.get(key)
            if delta is None:
                delta = histograms[key] = HistogramDelta(len(self._bounds))
        # A value equal to a bound belongs to that bucket (le means "less or equal").
        delta.buckets[bisect_left(self._bounds, value)] += 1
        delta.sum += value


def _check_encodable(name: str, values: tuple[str, ...]) -> None:
    # A lone surrogate cannot be encoded as UTF-8 for Redis; rejecting it here keeps one
    # bad value from failing every later batch.
    for value in values:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"label value {value!r} of {name!r} is invalid: {err.reason}; "
                "give text that encodes as UTF-8"
            ) from None


ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


class _Family(Generic[ChildT]):
    """A metric family: resolves label values to a cached child series."""

    def __init__(self, definition: MetricDefinition, buffer: DeltaBuffer) -> None:
        self.definition = definition
        self._buffer = buffer
        self._children: dict[tuple[str, ...], ChildT] = {}

    def labels(self, *values: object, **named: object) -> ChildT:
        """Return the series for the given label values, positional or by name.

        Values are converted with ``str()``.

        :raises ValueError: when the values do not match the family's label names, or
            when the family has no labels.
        """
        # Fast path: string values of a series seen before are their own cache key.
        if values and not named:
            cached = self._children.get(cast("tuple[str, ...]", values))
            if cached is not None:
                return cached

        label_names = self.definition.labels
        if not label_names:
            raise ValueError(
                f"metric {self.definition.name!r} has no labels; call its methods directly"
            )
        if values and named:
            raise ValueError(
                f"labels of {self.definition.name!r} given both by position and by name; "
                "use one form"
            )
        if named:
            if set(named) != set(label_names):
                raise ValueError(
                    f"label names {sorted(named)!r} of {self.definition.name!r} are invalid; "
                    f"expected exactly {list(label_names)!r}"
                )
            key = tuple(str(named[name]) for name in label_names)
        else:
            if len(values) != len(label_names):
                raise ValueError(
                    f"{len(values)} label values given for {self.definition.name!r}; "
                    f"expected {len(label_names)}: {list(label_names)!r}"
                )
            key = tuple(map(str, values))

        child = self._children.get(key)
        if child is None:
            _check_encodable(self.definition.name, key)
            child = self._children[key] = self._make_child((self.definition.name, key))
        return child

    def _unlabelled(self) -> ChildT:
        if self.definition.labels:
            raise ValueError(
                f"metric {self.definition.name!r} has labels {list(self.definition.labels)!r}; "
                "call labels() first"
            )
        child = self._children.get(())
        if child is None:
            child = self._children[()] = self._make_child((self.definition.name, ()))
        return child

    def _make_child(self, key: SeriesKey) -> ChildT:
        raise NotImplementedError


class Counter(_Family[CounterChild]):
    """A counter family; see :class:`CounterChild`."""

    def _make_child(self, key: SeriesKey) -> CounterChild:
        return CounterChild(self._buffer, key)

    def inc(self, amount: float = 1) -> None:
        """Increment an unlabelled counter; see :meth:`CounterChild.inc`."""
        self._unlabelled().inc(amount)


class Gauge(_Family[GaugeChild]):
    """A gauge family; see :class:`GaugeChild`."""

    def _make_child(self, key: SeriesKey) -> GaugeChild:
        return GaugeChild(self._buffer, key)

    def set(self, value: float) -> None:
        """Set an unlabelled gauge; see :meth:`GaugeChild.set`."""
        self._unlabelled().set(value)

    def inc(self, amount: float = 1) -> None:
        """Increment an unlabelled gauge; see :meth:`GaugeChild.inc`."""
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Decrement an unlabelled gauge; see :meth:`GaugeChild.dec`."""
        self._unlabelled().dec(amount)


class Histogram(_Family[HistogramChild]):
    """A histogram family; see :class:`HistogramChild`."""

    def _make_child(self, key: SeriesKey) -> HistogramChild:
        return HistogramChild(self._buffer, key, self.definition.buckets)

    def observe(self, value: float) -> None:
        """Observe a value of an unlabelled histogram; see :meth:`HistogramChild.observe`."""
        self._unlabelled().observe(value)


class Metrics:
    """Every metric family a proxy records, one attribute per family.

    :param buffer: the buffer that recording calls write to; the flusher swaps it.
    :param extra: further definitions, reachable through :meth:`family`.
    :raises ValueError: when an extra definition reuses a name.
    """

    requests_total: Counter
    request_latency_seconds: Histogram
    backend_state: Gauge
    backend_requests_total: Counter
    backend_info: Gauge
    cache_hits_total: Counter
    cache_misses_total: Counter
    cache_bytes: Gauge
    cache_entries: Gauge
    cache_invalidations_unconfirmed_total: Counter
    metrics_flush_failures_total: Counter
    metrics_pending_series: Gauge

    def __init__(self, buffer: DeltaBuffer, extra: Sequence[MetricDefinition] = ()) -> None:
        self.buffer = buffer
        self.definitions: tuple[MetricDefinition, ...] = (
            *APPLICATION_METRICS,
            *WRITER_METRICS,
            *extra,
        )
        check_unique(self.definitions)
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        for definition in self.definitions:
            family: Counter | Gauge | Histogram
            if definition.type == "counter":
                family = Counter(definition, buffer)
            elif definition.type == "gauge":
                family = Gauge(definition, buffer)
            else:
                family = Histogram(definition, buffer)
            self._families[definition.name] = family

        self.requests_total = self._get("s3proxy_requests_total", Counter)
        self.request_latency_seconds = self._get("s3proxy_request_latency_seconds", Histogram)
        self.backend_state = self._get("s3proxy_backend_state", Gauge)
        self.backend_requests_total = self._get("s3proxy_backend_requests_total", Counter)
        self.backend_info = self._get("s3proxy_backend_info", Gauge)
        self.cache_hits_total = self._get("s3proxy_cache_hits_total", Counter)
        self.cache_misses_total = self._get("s3proxy_cache_misses_total", Counter)
        self.cache_bytes = self._get("s3proxy_cache_bytes", Gauge)
        self.cache_entries = self._get("s3proxy_cache_entries", Gauge)
        self.cache_invalidations_unconfirmed_total = self._get(
            "s3proxy_cache_invalidations_unconfirmed_total", Counter
        )
        self.metrics_flush_failures_total = self._get(
            "s3proxy_metrics_flush_failures_total", Counter
        )
        self.metrics_pending_series = self._get("s3proxy_metrics_pending_series", Gauge)

    def family(self, name: str) -> Counter | Gauge | Histogram:
        """Return the family named ``name``.

        :raises KeyError: when no definition has that name.
        """
        try:
            return self._families[name]
        except KeyError:
            known = sorted(self._families)
            raise KeyError(f"no metric named {name!r}; defined: {known!r}") from None

    def _get(self, name: str, kind: type[ChildFamily]) -> ChildFamily:
        family = self._families[name]
        assert isinstance(family, kind), (name, family)
        return family


ChildFamily = TypeVar("ChildFamily", Counter, Gauge, Histogram)
