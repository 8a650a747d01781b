"""Tests for proxy.forward found by driving the proxy with real clients: early-finished bodies."""

from __future__ import annotations

from twisted.web.client import UNKNOWN_LENGTH

from proxy.forward import StreamingBody


class Consumer:
    """An IConsumer that records writes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_body_finished_before_start() -> None:
    """A chunked body that arrived completely before the backend connected is still sent."""
    body = StreamingBody(UNKNOWN_LENGTH, lambda: None, lambda: None)
    body.write(b"hello")
    body.finish()

    consumer = Consumer()
    done = body.startProducing(consumer)

    assert done is not None
    assert done.called
    assert consumer.data == b"hello"


def test_empty_body_finished_before_start() -> None:
    """An empty chunked body finished before the backend connected completes at once."""
    body = StreamingBody(UNKNOWN_LENGTH, lambda: None, lambda: None)
    body.finish()

    done = body.startProducing(Consumer())

    assert done is not None
    assert done.called
