"""Helpers for collector tests: a synchronous thread runner and sample lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, maybeDeferred


def run_now(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run ``function`` on the calling thread, standing in for a thread pool."""
    return maybeDeferred(function, *args)


def samples(registry: Any, name: str) -> list[tuple[dict[str, str], float]]:
    """Return every sample named ``name`` in the text exposition of ``registry``."""
    text = generate_latest(registry).decode("utf-8")
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), float(sample.value)))
    return found


def sample_value(registry: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Return the value of sample ``name`` with exactly ``labels``, or None when absent."""
    for sample_labels, value in samples(registry, name):
        if sample_labels == (labels or {}):
            return value
    return None
