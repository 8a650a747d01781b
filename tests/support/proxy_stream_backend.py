"""
A loopback S3 stand-in for streaming tests: it drops upload bodies and streams large downloads.

Run as C{python -m tests.support.proxy_stream_backend PORT SIZE}. Every PUT gets 200
after its body was read and dropped, C{GET /bucket/big} streams SIZE bytes with backpressure,
and any other GET gets a short XML body (health checks land there). It never checks
signatures, so it only serves tests of memory use, not of signing.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

_CHUNK = b"z" * 65536


@implementer(IPushProducer)
class _Generator:
    """Writes C{size} bytes to a request while its connection accepts them."""

    def __init__(self, request: Any, size: int, reactor: Any) -> None:
        self.request = request
        self.left = size
        self.paused = False
        self.reactor = reactor
        request.registerProducer(self, True)
        reactor.callLater(0, self.pump)

    def pump(self) -> None:
        while not self.paused and self.left > 0:
            chunk = _CHUNK[: self.left]
            self.request.write(chunk)
            self.left -= len(chunk)
        if self.left <= 0 and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.left = 0


class _DroppingRequest(server.Request):
    """A request that counts its body instead of storing it."""

    def gotLength(self, length: int | None) -> None:
        import io

        self.content = io.BytesIO()
        self.received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)


class _Root(Resource):
    isLeaf = True

    def __init__(self, size: int, reactor: Any) -> None:
        super().__init__()
        self.size = size
        self.reactor = reactor

    def render_PUT(self, request: Any) -> bytes:
        return b""

    def render_GET(self, request: Any) -> Any:
        if request.path != b"/bucket/big":
            return b"<ListAllMyBucketsResult/>"
        request.setHeader(b"content-length", str(self.size).encode("ascii"))
        _Generator(request, self.size, self.reactor)
        return server.NOT_DONE_YET


def main(argv: list[str]) -> None:
    port, size = int(argv[1]), int(argv[2])
    site = server.Site(_Root(size, global_reactor))
    site.requestFactory = _DroppingRequest
    global_reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    global_reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
