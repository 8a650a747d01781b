"""Tests for metric definitions and their stored schema."""

from __future__ import annotations

import math

import pytest

from collector.definitions import APPLICATION_METRICS, DEFAULT_BUCKETS, MetricDefinition


def test_default_buckets_match_prometheus_client() -> None:
    """Histograms default to prometheus_client's default buckets."""
    from prometheus_client import Histogram

    assert DEFAULT_BUCKETS == Histogram.DEFAULT_BUCKETS


def test_inf_bucket_appended() -> None:
    """Buckets without +Inf get it appended."""
    definition = MetricDefinition("h_seconds", "histogram", "H.", buckets=(1.0, 2.0))
    assert definition.buckets == (1.0, 2.0, math.inf)


def test_schema_round_trip() -> None:
    """from_schema rebuilds every application definition from schema() and help."""
    for definition in APPLICATION_METRICS:
        schema = definition.schema()
        rebuilt = MetricDefinition.from_schema(definition.name, schema, definition.help)
        assert rebuilt == definition


def test_schema_ignores_help() -> None:
    """Definitions that differ only in help text have the same schema."""
    first = MetricDefinition("a_total", "counter", "One.")
    second = MetricDefinition("a_total", "counter", "Two.")
    assert first.schema() == second.schema()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad-name", "type": "gauge"},
        {"name": "a", "type": "summary"},
        {"name": "a", "type": "counter"},
        {"name": "a", "type": "gauge", "labels": ("proxy",)},
        {"name": "a", "type": "histogram", "labels": ("le",)},
        {"name": "a", "type": "gauge", "labels": ("x", "x")},
        {"name": "a", "type": "gauge", "labels": ("__x",)},
        {"name": "a", "type": "gauge", "buckets": (1.0,)},
        {"name": "a", "type": "histogram", "buckets": (2.0, 1.0)},
        {"name": "a", "type": "histogram", "buckets": (math.nan,)},
        {"name": "a", "type": "gauge", "gauge_mode": "average"},
    ],
    ids=[
        "name",
        "type",
        "counter-suffix",
        "proxy-label",
        "le-label",
        "duplicate-label",
        "reserved-prefix",
        "gauge-buckets",
        "decreasing-buckets",
        "nan-bucket",
        "gauge-mode",
    ],
)
def test_invalid_definition(kwargs: dict[str, object]) -> None:
    """Invalid definitions raise ValueError at construction."""
    with pytest.raises(ValueError):
        MetricDefinition(help="Help.", **kwargs)  # type: ignore[arg-type]


def test_bad_stored_schema() -> None:
    """A stored schema that is not valid JSON raises ValueError naming the family."""
    with pytest.raises(ValueError, match="'a_total'"):
        MetricDefinition.from_schema("a_total", "{not json", "Help.")
