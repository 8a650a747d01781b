"""Tests for s3proxy_backend_info, set by the backend manager at start."""

from __future__ import annotations

from collector.buffer import DeltaBuffer
from collector.metrics import Metrics
from proxy.backends import BackendManager
from tests.support.backends import backend, make_manager


def test_info_per_backend() -> None:
    """Each configured backend gets backend_info 1 with its priority as a label."""
    h = make_manager([backend("a", priority=0), backend("b", priority=10)])
    assert h.metrics.backend_info.values == {("a", "0"): 1.0, ("b", "10"): 1.0}


def test_info_real_metrics() -> None:
    """With collector's Metrics the series carry backend_id and priority."""
    buffer = DeltaBuffer()
    h = make_manager(start=False)
    manager = BackendManager(
        [backend("a", priority=1), backend("b", priority=2)], h.manager.health, "failover",
        Metrics(buffer), h.clock, h.probe,
    )
    manager.startService()
    assert buffer.gauges[("s3proxy_backend_info", ("a", "1"))] == 1.0
    assert buffer.gauges[("s3proxy_backend_info", ("b", "2"))] == 1.0
    manager.stopService()
