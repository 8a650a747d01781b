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


def assert_primary(client: Any, port: int) -> None:
    """Fail when the Redis at ``port`` runs as a replica, e.g. from a rewritten redis.conf."""
    role = client.info("replication")["role"]
    assert role == "master", (
        f"redis-server on port {port} runs as {role!r}; check that redis.conf has no "
        "'replicaof' line written by CONFIG REWRITE"
    )


def sample_value(registry: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Return the value of sample ``name`` with exactly ``labels``, or None when absent."""
    for sample_labels, value in samples(registry, name):
        if sample_labels == (labels or {}):
            return value
    return None
