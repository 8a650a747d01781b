"""Metric definitions: the schema that writers register and the exporter renders from.

A definition fixes a family's name, type, label names, histogram buckets and, for gauges,
how the values of several writers are combined. Writers store their definitions in Redis
at start, and a standalone exporter renders every family from those stored definitions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = [
    "APPLICATION_METRICS",
    "DEFAULT_BUCKETS",
    "FLUSH_FAILURES",
    "OVERFLOW",
    "PENDING_SERIES",
    "WRITER_METRICS",
    "GaugeMode",
    "MetricDefinition",
    "MetricType",
]

MetricType = Literal["counter", "gauge", "histogram"]

GaugeMode = Literal["per_writer", "min", "max", "sum", "mostrecent"]
"""How the gauge values of several writers are combined at scrape time.

``per_writer`` exposes one series per live writer, with an extra ``proxy`` label set to the
writer id. The other modes expose one series per label set, computed over live writers.
"""

# The upper bounds of prometheus_client's default histogram buckets, in seconds.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf,
)

WRITER_LABEL = "proxy"

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = get_args(MetricType)
_GAUGE_MODES = get_args(GaugeMode)


@dataclass(frozen=True)
class MetricDefinition:
    """One metric family: its name, type, help text, label names and buckets.

    :param name: the full family name, e.g. ``s3proxy_requests_total``. Counter names end
        in ``_total``.
    :param type: ``counter``, ``gauge`` or ``histogram``.
    :param help: the HELP text shown by the exposition.
    :param labels: label names in their fixed order; label values are always given and
        stored in this order.
    :param buckets: histogram upper bounds in increasing order; ``+Inf`` is appended when
        missing. Empty for counters and gauges. Histograms default to
        :data:`DEFAULT_BUCKETS`.
    :param gauge_mode: for gauges, how the values of several writers are combined.
    :raises ValueError: for an invalid name, label name, type, mode or bucket list.
    """

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = field(default=())
    gauge_mode: GaugeMode = "per_writer"

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(
                f"metric type {self.type!r} of {self.name!r} is invalid; "
                f"use one of {', '.join(_TYPES)}"
            )
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"metric name {self.name!r} is invalid; it must match {_NAME_RE.pattern}"
            )
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter name {self.name!r} is invalid; it must end in '_total'")
        if not self.help:
            raise ValueError(f"metric {self.name!r} has no help text; give a one-line help")
        object.__setattr__(self, "labels", tuple(self.labels))
        self._check_labels()
        self._check_buckets()
        if self.gauge_mode not in _GAUGE_MODES:
            raise ValueError(
                f"gauge mode {self.gauge_mode!r} of {self.name!r} is invalid; "
                f"use one of {', '.join(_GAUGE_MODES)}"
            )

    def _check_labels(self) -> None:
        reserved = {"le"} if self.type == "histogram" else set()
        if self.type == "gauge" and self.gauge_mode == "per_writer":
            reserved.add(WRITER_LABEL)
        for label in self.labels:
            if not isinstance(label, str) or not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(
                    f"label name {label!r} of {self.name!r} is invalid; it must match "
                    f"{_LABEL_RE.pattern} and not start with '__'"
                )
            if label in reserved:
                raise ValueError(
                    f"label name {label!r} of {self.name!r} is reserved for a {self.type} "
                    f"with gauge mode {self.gauge_mode!r}; rename the label"
                )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label names {self.labels!r} of {self.name!r} contain duplicates")

    def _check_buckets(self) -> None:
        if self.type != "histogram":
            if self.buckets:
                raise ValueError(f"{self.type} {self.name!r} cannot have buckets; remove them")
            return
        buckets = tuple(float(bound) for bound in (self.buckets or DEFAULT_BUCKETS))
        if buckets[-1] != math.inf:
            buckets = (*buckets, math.inf)
        if any(math.isnan(bound) for bound in buckets) or any(
            lower >= upper for lower, upper in zip(buckets, buckets[1:], strict=False)
        ):
            raise ValueError(
                f"buckets {self.buckets!r} of {self.name!r} are invalid; "
                "give finite upper bounds in strictly increasing order"
            )
        if len(buckets) < 2:
            raise ValueError(f"histogram {self.name!r} needs at least one finite bucket bound")
        object.__setattr__(self, "buckets", buckets)

    def schema(self) -> str:
        """Return the canonical JSON of everything except the help text.

        Two writers conflict exactly when their schemas differ; the help text may change
        between versions without a conflict.
        """
        return json.dumps(
            {
                "type": self.type,
                "labels": list(self.labels),
                "buckets": [repr(bound) for bound in self.buckets],
                "gauge_mode": self.gauge_mode,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_schema(cls, name: str, schema: str, help: str) -> MetricDefinition:
        """Rebuild a definition from :meth:`schema` output, as stored in Redis.

        :raises ValueError: when ``schema`` is not a valid stored schema.
        """
        try:
            data = json.loads(schema)
            buckets = tuple(float(bound) for bound in data["buckets"])
            return cls(
                name=name,
                type=data["type"],
                help=help or name,
                labels=tuple(data["labels"]),
                buckets=buckets,
                gauge_mode=data["gauge_mode"],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"stored schema {schema!r} of {name!r} is invalid: {err}") from err


def check_unique(definitions: Sequence[MetricDefinition]) -> None:
    """Raise ValueError when two definitions share a name."""
    seen: set[str] = set()
    for definition in definitions:
        if definition.name in seen:
            raise ValueError(f"metric {definition.name!r} is defined twice; keep one definition")
        seen.add(definition.name)


APPLICATION_METRICS: tuple[MetricDefinition, ...] = (
    MetricDefinition(
        "s3proxy_requests_total",
        "counter",
        "Client requests handled, by S3 operation and HTTP status sent to the client.",
        ("operation", "code"),
    ),
    MetricDefinition(
        "s3proxy_request_latency_seconds",
        "histogram",
        "Time from request received to response finished, in seconds.",
        ("operation",),
    ),
    MetricDefinition(
        "s3proxy_backend_state",
        "gauge",
        "Backend health as seen by each proxy: 1 UP, 0.5 PROBING, 0 DOWN.",
        ("backend_id",),
    ),
    MetricDefinition(
        "s3proxy_backend_requests_total",
        "counter",
        "Attempts sent to backends; code is 'error' when no HTTP status came back.",
        ("backend_id", "operation", "code"),
    ),
    MetricDefinition(
        "s3proxy_backend_info",
        "gauge",
        "1 for every backend in each proxy's configuration, with its priority (lower is "
        "preferred).",
        ("backend_id", "priority"),
    ),
    MetricDefinition(
        "s3proxy_cache_hits_total",
        "counter",
        "GET requests answered from the object cache.",
    ),
    MetricDefinition(
        "s3proxy_cache_misses_total",
        "counter",
        "Cacheable GET requests that went to a backend.",
    ),
    MetricDefinition(
        "s3proxy_cache_bytes",
        "gauge",
        "Bytes of object data held in each proxy's cache.",
    ),
    MetricDefinition(
        "s3proxy_cache_entries",
        "gauge",
        "Objects held in each proxy's cache.",
    ),
    MetricDefinition(
        "s3proxy_cache_invalidations_unconfirmed_total",
        "counter",
        "Writes answered before every caching proxy confirmed that it evicted the keys "
        "(publish failed or timed out); another proxy may have served the old object.",
    ),
)

FLUSH_FAILURES = MetricDefinition(
    "s3proxy_metrics_flush_failures_total",
    "counter",
    "Metric batches that a proxy failed to write to Redis; each failed batch is retried.",
)

PENDING_SERIES = MetricDefinition(
    "s3proxy_metrics_pending_series",
    "gauge",
    "Counter and histogram series with deltas that each proxy had not yet written to "
    "the store when it cut its last batch.",
)

OVERFLOW = MetricDefinition(
    "s3proxy_metrics_overflow_total",
    "counter",
    "Recordings of a new series that did not fit under [metrics] max_pending_series and "
    "were added to the family's overflow series, whose label values are all '_overflow'.",
    ("family",),
)

# Families that every writer records about its own flushing, whatever it measures.
WRITER_METRICS: tuple[MetricDefinition, ...] = (FLUSH_FAILURES, PENDING_SERIES, OVERFLOW)
