"""The per-process delta buffer between recording calls and the flusher.

Recording calls add to plain dicts keyed by ``(family name, label values)``, so the cost
of a call is one dict update. The flusher swaps the dicts out with :meth:`DeltaBuffer.swap`
and ships their contents as one :class:`Batch`.

The buffer has no lock: recording calls and :meth:`DeltaBuffer.swap` must all run on the
reactor thread.

While the store cannot be reached, the buffer keeps merging deltas, so its size grows with
the number of distinct series, never with the number of recordings. ``max_series`` caps it:
once the buffer contains that many counter and histogram series, a delta of a series that is
not in the buffer yet is added to its family's overflow series instead, whose label values
are all :data:`OVERFLOW_LABEL`, and ``s3proxy_metrics_overflow_total{family}`` counts the
recording. So every delta still reaches the family's total, and only the breakdown by
labels of those deltas is lost. A family without labels has nothing to merge, so its
one series is always admitted. Gauges are not capped: they hold one current value per
series, which does not grow while the store is down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "OVERFLOW_FAMILY",
    "OVERFLOW_LABEL",
    "Batch",
    "DeltaBuffer",
    "HistogramDelta",
    "SeriesKey",
]

OVERFLOW_LABEL = "_overflow"
"""The value of every label of a family's overflow series."""

OVERFLOW_FAMILY = "s3proxy_metrics_overflow_total"
"""The counter of recordings merged into overflow series, labelled by family."""

SeriesKey = tuple[str, tuple[str, ...]]
"""A series: the family name and its label values in definition order."""


class HistogramDelta:
    """Observations of one histogram series since the last swap.

    :ivar buckets: observation counts per bucket index (not cumulative); the last index is
        the ``+Inf`` bucket.
    :ivar sum: the sum of the observed values.
    """

    __slots__ = ("buckets", "sum")

    def __init__(self, bucket_count: int) -> None:
        self.buckets = [0] * bucket_count
        self.sum = 0.0

    @property
    def count(self) -> int:
        """The number of observations."""
        return sum(self.buckets)


@dataclass(frozen=True)
class Batch:
    """The deltas of one flush, applied to the store at most once.

    :ivar writer: the writer id, ``host:pid:boot id``.
    :ivar sequence: increases by one per batch of this writer; the store applies a batch
        only when its sequence is greater than the last one it applied for ``writer``.
    :ivar created: when the batch was cut from the buffer, in seconds since the epoch of
        the writer's clock.
    :ivar counters: counter increments per series.
    :ivar histograms: bucket counts and sums per series.
    :ivar gauges: the current value of every gauge series of this writer.
    :ivar gauge_times: when each gauge was last set, in seconds of the writer's clock;
        a gauge without an entry was set at ``created`` as far as the store knows.
    :ivar retire: when true the store removes this writer's gauges and heartbeat after
        applying the deltas; set on the last batch of a clean stop.
    """

    writer: str
    sequence: int
    created: float
    counters: dict[SeriesKey, float] = field(default_factory=dict)
    histograms: dict[SeriesKey, HistogramDelta] = field(default_factory=dict)
    gauges: dict[SeriesKey, float] = field(default_factory=dict)
    gauge_times: dict[SeriesKey, float] = field(default_factory=dict)
    retire: bool = False

    def series_count(self) -> int:
        """Return the number of series in this batch."""
        return len(self.counters) + len(self.histograms) + len(self.gauges)


class DeltaBuffer:
    """Counter and histogram deltas since the last swap, and the current gauge values.

    :ivar counters: counter increments per series.
    :ivar histograms: histogram observations per series.
    :ivar gauges: the current value of each gauge series. Unlike the deltas, gauges are
        kept across swaps, so every batch carries the full gauge state.
    :ivar gauge_times: when each gauge was last set, recorded only with a ``clock``.
    :param clock: returns the time in seconds, e.g. ``reactor.seconds``; gauges of the
        ``mostrecent`` mode compare these times across writers. Without a clock a gauge
        counts as set when its batch was cut.
    :param max_series: the most counter and histogram series the buffer takes before new
        series go to overflow series; None for no cap. Overflow series and the overflow
        counter may exceed it by at most two series per family.
    :raises ValueError: for a ``max_series`` below 1.
    """

    __slots__ = ("counters", "histograms", "gauges", "gauge_times", "clock", "max_series")

    def __init__(
        self, clock: Callable[[], float] | None = None, max_series: int | None = None
    ) -> None:
        if max_series is not None and max_series < 1:
            raise ValueError(
                f"max_series {max_series!r} is invalid; give an integer >= 1 or None"
            )
        self.counters: dict[SeriesKey, float] = {}
        self.histograms: dict[SeriesKey, HistogramDelta] = {}
        self.gauges: dict[SeriesKey, float] = {}
        self.gauge_times: dict[SeriesKey, float] = {}
        self.clock = clock
        self.max_series = max_series

    def admit(self, key: SeriesKey) -> SeriesKey:
        """Return where a delta of ``key``, a series not in the buffer yet, goes.

        That is ``key`` itself while the buffer is under ``max_series``, and otherwise the
        family's overflow series; each overflow also counts one recording in
        :data:`OVERFLOW_FAMILY`. Recording calls call this on their first delta of a
        series since the last swap.
        """
        if (
            self.max_series is None
            or len(self.counters) + len(self.histograms) < self.max_series
            or not key[1]
        ):
            return key
        name, labels = key
        overflow_key = (OVERFLOW_FAMILY, (name,))
        self.counters[overflow_key] = self.counters.get(overflow_key, 0.0) + 1
        return name, (OVERFLOW_LABEL,) * len(labels)

    def swap(self, writer: str, sequence: int, created: float, retire: bool = False) -> Batch:
        """Move the deltas into a new :class:`Batch` and start fresh ones.

        The batch gets a copy of the gauge values; the buffer keeps them.
        """
        batch = Batch(
            writer=writer,
            sequence=sequence,
            created=created,
            counters=self.counters,
            histograms=self.histograms,
            gauges=dict(self.gauges),
            gauge_times=dict(self.gauge_times),
            retire=retire,
        )
        self.counters = {}
        self.histograms = {}
        return batch

    def series_count(self) -> int:
        """Return the number of series with deltas or gauge values."""
        return len(self.counters) + len(self.histograms) + len(self.gauges)

    def delta_count(self) -> int:
        """Return the number of counter and histogram series with deltas."""
        return len(self.counters) + len(self.histograms)
