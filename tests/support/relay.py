"""A TCP relay that integration tests stop and start to take a backend away and bring it back.

``Relay(target_port)`` listens on a loopback port and copies bytes both ways between each client
and a new connection to ``127.0.0.1:target_port``. ``stop()`` closes the listener and resets
every open connection, so clients see connection refused or reset, as with a crashed server.
``start()`` listens again on the same port. ``hold()`` stops copying and accepting but keeps
every connection open, as in a network partition that neither side notices, and ``release()``
ends it.

The relay also records the request line of every HTTP/1.1 request that passes towards the
target. It finds them by pattern in the byte stream, which is exact for the S3 requests of the
tests, but a request body that contains a line like ``PUT /x HTTP/1.1`` would count too.
"""

from __future__ import annotations

import queue
import re
import selectors
import socket
import struct
import threading
from collections.abc import Callable

from tests.support.servers import free_port

_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")
_MAX_CARRY = 16384  # bytes kept between reads to find a request line split across two reads


class Relay:
    """A stoppable TCP relay from ``127.0.0.1:port`` to ``127.0.0.1:target_port``.

    All sockets are served by one background thread; the methods may be called from any
    thread. ``close()`` ends the thread.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.requests: list[tuple[str, str]] = []
        self._requests_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._carry: dict[socket.socket, bytes] = {}
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"relay-{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> Relay:
        """Listen on ``port``; raises ``OSError`` when the port is taken."""
        self._run(self._open_listener)
        return self

    def stop(self) -> None:
        """Close the listener and reset every relayed connection."""
        self._run(self._close_all)

    def hold(self) -> None:
        """Stop copying bytes and accepting connections, but keep every connection open."""
        self._run(self._hold)

    def release(self) -> None:
        """Copy and accept again after :meth:`hold`; held bytes are delivered in order."""
        self._run(self._release)

    def close(self) -> None:
        """Stop and end the background thread."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._wake_write.send(b"x")
        self._thread.join(timeout=10)
        self._wake_write.close()

    def requests_seen(self, method: str | None = None, contains: str = "") -> list[str]:
        """Return the targets of the requests seen, filtered by method and substring."""
        with self._requests_lock:
            return [target for seen_method, target in self.requests
                    if (method is None or seen_method == method) and contains in target]

    # Everything below runs on the relay thread, except _run.

    def _run(self, action: Callable[[], None]) -> None:
        done = threading.Event()
        self._commands.put((action, done))
        self._wake_write.send(b"x")
        if not done.wait(timeout=10):
            raise RuntimeError(f"relay on port {self.port} did not run {action.__name__} in 10 s")

    def _open_listener(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "accept")

    def _close_all(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for sock in list(self._peers):
            self._drop(sock, reset=True)

    def _hold(self) -> None:
        for sock in [*self._peers, self._listener]:
            if sock is not None:
                self._selector.unregister(sock)

    def _release(self) -> None:
        for sock in self._peers:
            self._selector.register(sock, selectors.EVENT_READ, "peer")
        if self._listener is not None:
            self._selector.register(self._listener, selectors.EVENT_READ, "accept")

    def _loop(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=1.0):
                if key.data == "wake":
                    self._run_commands()
                elif key.data == "accept":
                    self._accept()
                elif key.fileobj in self._peers:
                    self._relay(key.fileobj)  # type: ignore[arg-type]
        self._selector.close()
        self._wake_read.close()

    def _run_commands(self) -> None:
        self._wake_read.recv(4096)
        while True:
            try:
                action, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                action()
            finally:
                done.set()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(True)
            sock.settimeout(30)
            self._selector.register(sock, selectors.EVENT_READ, "peer")
        self._peers[client] = upstream
        self._peers[upstream] = client
        self._carry[client] = b""

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            # An orderly close, so the peer still reads everything sent before it.
            self._drop(sock, reset=False)
            return
        if sock in self._carry:
            self._record(sock, data)
        try:
            self._peers[sock].sendall(data)
        except OSError:
            self._drop(sock, reset=True)

    def _record(self, sock: socket.socket, data: bytes) -> None:
        buffer = self._carry[sock] + data
        end = 0
        found = []
        for match in _REQUEST_LINE.finditer(buffer):
            found.append((match.group(1).decode(), match.group(2).decode("latin-1")))
            end = match.end()
        self._carry[sock] = buffer[end:][-_MAX_CARRY:]
        if found:
            with self._requests_lock:
                self.requests.extend(found)

    def _drop(self, sock: socket.socket, reset: bool) -> None:
        peer = self._peers.pop(sock, None)
        for each in (sock, peer):
            if each is None:
                continue
            self._peers.pop(each, None)
            self._carry.pop(each, None)
            try:
                self._selector.unregister(each)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset(each)
            else:
                each.close()


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
