"""``RedisCollector``: builds Prometheus metric families from a :class:`MetricStore`.

Every scrape reads the store in one pipeline of a fixed list of keys, never ``KEYS`` or
``SCAN``, and renders each family from its stored definition, so a standalone exporter
needs none of the writers' code. Besides the stored families it exposes its own metrics:

``s3proxy_redis_up``
    1 when the store could be read in this scrape, else 0; then no stored family is shown.
``s3proxy_proxies``
    writers whose heartbeat is younger than the gauge TTL.
``s3proxy_proxy_last_seen_timestamp_seconds{proxy}``
    last heartbeat of each writer in the store, in seconds since the epoch.
``s3proxy_collector_malformed_fields{family}``
    fields skipped in this scrape because they could not be decoded.
``s3proxy_scrape_duration_seconds``
    time this scrape spent reading the store and building families.
``s3proxy_scrape_errors_total{cause}``
    failed scrapes, by cause: ``redis`` (store unreachable) or ``timeout``.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from collector.definitions import WRITER_LABEL, MetricDefinition
from collector.store import SEQUENCE_RETENTION, MetricStore, Snapshot, decode_field

__all__ = ["SELF_METRIC_NAMES", "RedisCollector", "default_gauge_ttl"]

REDIS_UP = "s3proxy_redis_up"
PROXIES = "s3proxy_proxies"
PROXY_LAST_SEEN = "s3proxy_proxy_last_seen_timestamp_seconds"
MALFORMED_FIELDS = "s3proxy_collector_malformed_fields"
SCRAPE_DURATION = "s3proxy_scrape_duration_seconds"
SCRAPE_ERRORS = "s3proxy_scrape_errors_total"
SCRAPE_ERROR_CAUSES = ("redis", "timeout")

SELF_METRIC_NAMES = frozenset(
    {REDIS_UP, PROXIES, PROXY_LAST_SEEN, MALFORMED_FIELDS, SCRAPE_DURATION, SCRAPE_ERRORS}
)

# Errors that mean "the store could not be read", as opposed to bugs.
_STORE_ERRORS = (redis.RedisError, OSError)


def default_gauge_ttl(flush_interval: float) -> float:
    """Return the default gauge TTL for a flush interval: max(15, 3 x interval) seconds."""
    return max(15.0, 3.0 * flush_interval)


class _Malformed(Exception):
    """A stored field or value that cannot be decoded."""


class RedisCollector:
    """A prometheus_client collector that reads every family from ``store`` per scrape.

    :param store: the store to read; :meth:`collect` blocks on it, so run scrapes in a
        thread.
    :param clock: the time source for gauge TTL and scrape duration.
    :param definitions: families to read even before their definitions are stored, and
        the families that :meth:`describe` returns. A standalone exporter passes none and
        renders the families listed in the store's metadata.
    :param gauge_ttl: seconds after a writer's last heartbeat when its gauge values are
        dropped and removed from the store; see :func:`default_gauge_ttl`.
        NOTE: heartbeats carry the writer's clock and are compared with ``clock``, so
        hosts whose clocks differ by more than the TTL lose their gauges.
    :param sequence_retention: seconds after which a silent writer's sequence record is
        removed along with a prune.
    :raises ValueError: for a gauge TTL that is not > 0.
    """

    _log = Logger()

    def __init__(
        self,
        store: MetricStore,
        clock: IReactorTime,
        definitions: Sequence[MetricDefinition] = (),
        gauge_ttl: float = 15.0,
        sequence_retention: float = SEQUENCE_RETENTION,
        error_log_interval: float = 60.0,
    ) -> None:
        if not gauge_ttl > 0:
            raise ValueError(f"gauge TTL {gauge_ttl!r} is invalid; give seconds > 0")
        self.store = store
        # zope.interface declares methods without self, which mypy rejects without the
        # mypy-zope plugin.
        self._now: Callable[[], float] = clock.seconds  # type: ignore[misc]
        self.definitions = {definition.name: definition for definition in definitions}
        self.gauge_ttl = gauge_ttl
        self.sequence_retention = sequence_retention
        self.error_log_interval = error_log_interval
        self._lock = threading.Lock()
        self._names = [name for name in self.definitions if name not in SELF_METRIC_NAMES]
        self._errors = dict.fromkeys(SCRAPE_ERROR_CAUSES, 0)
        self._store_failing = False
        self._last_error_log: float | None = None
        self._last_prune_log: float | None = None
        self._unlogged_errors = 0

    def describe(self) -> Iterator[Metric]:
        """Yield empty families for the definitions and the self-metrics; reads no store."""
        for definition in self.definitions.values():
            yield _empty_family(definition)
        yield from self._self_metrics(up=False, snapshot=None, malformed={}, duration=0.0)

    def record_timeout(self) -> None:
        """Count a scrape that timed out; shown as ``s3proxy_scrape_errors_total``."""
        with self._lock:
            self._errors["timeout"] += 1

    def collect(self) -> Iterator[Metric]:
        """Read the store and yield every stored family and the self-metrics.

        Blocks on the store, so it runs in a thread. A scrape is one store read, plus
        a second one when the metadata lists a family that no earlier scrape had read.
        When the store cannot be read, yields only the self-metrics with
        ``s3proxy_redis_up 0`` and logs the error, at most once per ``error_log_interval``.
        """
        started = self._now()
        try:
            snapshot = self._read()
        except _STORE_ERRORS as err:
            self._store_failed(err)
            yield from self._self_metrics(False, None, {}, self._now() - started)
            return
        self._store_recovered()

        malformed: dict[str, int] = dict(snapshot.undecodable)
        families, stale = self._build(snapshot, malformed)
        if stale:
            self._prune(stale)
        yield from families
        yield from self._self_metrics(True, snapshot, malformed, self._now() - started)

    def _read(self) -> Snapshot:
        # One round trip for every family known so far. A family that first appears in
        # the metadata costs a second round trip, once.
        with self._lock:
            names = list(self._names)
        snapshot = self.store.read(names)
        missing = [
            name for name in snapshot.schemas if name not in names and name not in SELF_METRIC_NAMES
        ]
        if missing:
            extra = self.store.read(missing)
            snapshot.families.update(extra.families)
            for name, count in extra.undecodable.items():
                snapshot.undecodable[name] = snapshot.undecodable.get(name, 0) + count
            with self._lock:
                self._names.extend(name for name in missing if name not in self._names)
        return snapshot

    def _build(
        self, snapshot: Snapshot, malformed: dict[str, int]
    ) -> tuple[list[Metric], dict[str, list[tuple[str, str]]]]:
        now = self._now()
        cutoff = now - self.gauge_ttl
        live = {writer for writer, seen in snapshot.heartbeats.items() if seen >= cutoff}
        stale: dict[str, list[tuple[str, str]]] = {
            writer: [] for writer, seen in snapshot.heartbeats.items() if seen < cutoff
        }

        families: list[Metric] = []
        for name in sorted(set(snapshot.schemas) | set(self.definitions)):
            if name in SELF_METRIC_NAMES:
                continue
            definition = self._definition(name, snapshot, malformed)
            if definition is None:
                continue
            fields = snapshot.families.get(name, {})
            if definition.type == "counter":
                families.append(_counter_family(definition, fields, malformed))
            elif definition.type == "histogram":
                families.append(_histogram_family(definition, fields, malformed))
            else:
                families.append(_gauge_family(definition, fields, live, stale, malformed))
        return families, stale

    def _definition(
        self, name: str, snapshot: Snapshot, malformed: dict[str, int]
    ) -> MetricDefinition | None:
        schema = snapshot.schemas.get(name)
        if schema is None:
            return self.definitions.get(name)
        try:
            return MetricDefinition.from_schema(name, schema, snapshot.help.get(name, ""))
        except ValueError as err:
            malformed[name] = malformed.get(name, 0) + 1
            self._log.debug("Skipping stored definition of {name}: {error}", name=name, error=err)
            return None

    def _prune(self, stale: dict[str, list[tuple[str, str]]]) -> None:
        now = self._now()
        try:
            removed = self.store.prune(
                stale, now - self.gauge_ttl, now - self.sequence_retention
            )
        except _STORE_ERRORS as err:
            # A read-only exporter user fails here on every scrape, so log rarely.
            with self._lock:
                due = (
                    self._last_prune_log is None
                    or now - self._last_prune_log >= self.error_log_interval
                )
                if due:
                    self._last_prune_log = now
            if due:
                self._log.warn(
                    "Could not remove stale writers {writers}; their gauges stay hidden but "
                    "stored. Give the exporter's Redis user write access: {error}",
                    writers=sorted(stale),
                    error=f"{type(err).__name__}: {err}",
                )
            return
        if removed:
            self._log.info(
                "Removed {count} writers without heartbeat for {ttl} s and their gauges",
                count=removed,
                ttl=self.gauge_ttl,
            )

    def _store_failed(self, err: BaseException) -> None:
        now = self._now()
        with self._lock:
            self._errors["redis"] += 1
            self._unlogged_errors += 1
            self._store_failing = True
            due = (
                self._last_error_log is None
                or now - self._last_error_log >= self.error_log_interval
            )
            count = self._unlogged_errors
            if due:
                self._last_error_log = now
                self._unlogged_errors = 0
        if due:
            self._log.error(
                "Could not read metrics from the store ({count} failed scrapes since the "
                "last message); serving s3proxy_redis_up 0: {error}",
                count=count,
                error=f"{type(err).__name__}: {err}",
            )

    def _store_recovered(self) -> None:
        with self._lock:
            was_failing, self._store_failing = self._store_failing, False
            self._last_error_log = None
            self._unlogged_errors = 0
        if was_failing:
            self._log.info("Reading metrics from the store works again")

    def _self_metrics(
        self,
        up: bool,
        snapshot: Snapshot | None,
        malformed: dict[str, int],
        duration: float,
    ) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            REDIS_UP, "1 when the metrics store could be read in this scrape, else 0.",
            value=int(up),
        )

        proxies = GaugeMetricFamily(PROXIES, "Proxies whose heartbeat is younger than the TTL.")
        last_seen = GaugeMetricFamily(
            PROXY_LAST_SEEN,
            "Last heartbeat of each proxy, in seconds since the epoch.",
            labels=[WRITER_LABEL],
        )
        if snapshot is not None:
            cutoff = self._now() - self.gauge_ttl
            heartbeats = snapshot.heartbeats
            proxies.add_metric([], sum(1 for seen in heartbeats.values() if seen >= cutoff))
            for writer, seen in sorted(heartbeats.items()):
                last_seen.add_metric([writer], seen)
        yield proxies
        yield last_seen

        skipped = GaugeMetricFamily(
            MALFORMED_FIELDS,
            "Stored fields skipped in this scrape because they could not be decoded.",
            labels=["family"],
        )
        for family, count in sorted(malformed.items()):
            skipped.add_metric([family], count)
        yield skipped

        yield GaugeMetricFamily(
            SCRAPE_DURATION,
            "Time this scrape spent reading the store and building families, in seconds.",
            value=duration,
        )

        errors = CounterMetricFamily(
            SCRAPE_ERRORS, "Scrapes that failed, by cause: redis or timeout.", labels=["cause"]
        )
        with self._lock:
            counts = dict(self._errors)
        for cause in SCRAPE_ERROR_CAUSES:
            errors.add_metric([cause], counts[cause])
        yield errors


def _empty_family(definition: MetricDefinition) -> Metric:
    labels = list(definition.labels)
    if definition.type == "counter":
        return CounterMetricFamily(definition.name, definition.help, labels=labels)
    if definition.type == "histogram":
        return HistogramMetricFamily(definition.name, definition.help, labels=labels)
    if definition.gauge_mode == "per_writer":
        labels.append(WRITER_LABEL)
    return GaugeMetricFamily(definition.name, definition.help, labels=labels)


def _count(malformed: dict[str, int], name: str) -> None:
    malformed[name] = malformed.get(name, 0) + 1


def _labels(definition: MetricDefinition, values: Iterable[Any]) -> list[str]:
    labels = list(values)
    if len(labels) != len(definition.labels) or not all(isinstance(v, str) for v in labels):
        raise _Malformed(labels)
    return labels


# Fields repeat from scrape to scrape, so their JSON is parsed once. The bound covers the
# series count of a large deployment; past it, the least recently used fields are parsed again.
@functools.lru_cache(maxsize=262144)
def _decode_cached(field: str) -> tuple[Any, ...]:
    return tuple(decode_field(field))


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Malformed(text) from None
    if not math.isfinite(value):
        raise _Malformed(text)
    return value


def _counter_family(
    definition: MetricDefinition, fields: dict[str, str], malformed: dict[str, int]
) -> Metric:
    family = CounterMetricFamily(definition.name, definition.help, labels=list(definition.labels))
    for field, text in sorted(fields.items()):
        try:
            labels = _labels(definition, _decode_cached(field))
            value = _number(text)
            if value < 0:
                raise _Malformed(text)
        except (_Malformed, ValueError):
            _count(malformed, definition.name)
            continue
        family.add_metric(labels, value)
    return family


def _histogram_family(
    definition: MetricDefinition, fields: dict[str, str], malformed: dict[str, int]
) -> Metric:
    bucket_count = len(definition.buckets)
    series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    # Group the per-bucket fields by label values. A field that cannot be decoded is
    # skipped; the other fields of its series are still shown.
    for field, text in fields.items():
        try:
            parts = _decode_cached(field)
            if not parts:
                raise _Malformed(field)
            labels = tuple(_labels(definition, parts[:-1]))
            part = parts[-1]
            entry = series.get(labels)
            if entry is None:
                entry = series[labels] = ([0] * bucket_count, [])
            buckets, total = entry
            if part == "sum":
                total.append(_number(text))
            elif part == "count":
                _number(text)
            elif isinstance(part, int) and not isinstance(part, bool) and 0 <= part < bucket_count:
                count = int(text)
                if count < 0:
                    raise _Malformed(text)
                buckets[part] = count
            else:
                raise _Malformed(field)
        except (_Malformed, ValueError):
            _count(malformed, definition.name)

    # Buckets are stored per bucket; the exposition wants cumulative counts, so that
    # the +Inf bucket always equals the count.
    family = HistogramMetricFamily(definition.name, definition.help, labels=list(definition.labels))
    bounds = [floatToGoString(bound) for bound in definition.buckets]
    for labels, (buckets, total) in sorted(series.items()):
        cumulative = []
        running = 0
        for bound, count in zip(bounds, buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(labels), cumulative, sum_value=total[0] if total else 0.0)
    return family


def _gauge_family(
    definition: MetricDefinition,
    fields: dict[str, str],
    live: set[str],
    stale: dict[str, list[tuple[str, str]]],
    malformed: dict[str, int],
) -> Metric:
    mode = definition.gauge_mode
    labels = list(definition.labels)
    if mode == "per_writer":
        labels.append(WRITER_LABEL)
    family = GaugeMetricFamily(definition.name, definition.help, labels=labels)

    # Keep the values of live writers; fields of other writers are removed by a prune.
    values: dict[tuple[str, ...], list[tuple[float, float, str]]] = {}
    for field, text in sorted(fields.items()):
        try:
            parts = _decode_cached(field)
            if not parts or not isinstance(parts[0], str):
                raise _Malformed(field)
            writer = parts[0]
            series = tuple(_labels(definition, parts[1:]))
            value_text, _, stamp_text = text.partition(" ")
            value = _number(value_text)
            stamp = _number(stamp_text)
        except (_Malformed, ValueError):
            _count(malformed, definition.name)
            continue
        if writer not in live:
            stale.setdefault(writer, []).append((definition.name, field))
            continue
        values.setdefault(series, []).append((value, stamp, writer))

    for series, samples in sorted(values.items()):
        if mode == "per_writer":
            for value, _, writer in samples:
                family.add_metric([*series, writer], value)
        elif mode == "sum":
            family.add_metric(list(series), math.fsum(value for value, _, _ in samples))
        elif mode == "min":
            family.add_metric(list(series), min(value for value, _, _ in samples))
        elif mode == "max":
            family.add_metric(list(series), max(value for value, _, _ in samples))
        else:
            family.add_metric(list(series), max(samples, key=lambda sample: sample[1])[0])
    return family
