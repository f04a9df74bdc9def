"""A TCP proxy that puts faults between cronguard and Redis.

It listens on a free loopback port and forwards every connection to one
upstream address.  Its mode can change at any moment and applies at once to
the connections already open as well as to new ones:

``pass``
    forward both ways.
``delay``
    forward both ways, each chunk ``delay_ms`` late (order kept).
``reset``
    abort every open connection with a TCP reset, and each new one as soon
    as it is accepted.
``blackhole``
    accept and read, forward nothing: the peer sees a server that never
    answers, the way a partition or a dead NAT entry looks.

Threads, not asyncio: each direction of each connection is one small thread
blocked in ``recv``, which keeps the proxy independent of whatever loop the
test or the benchmark runs.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType

MODES = ("pass", "delay", "reset", "blackhole")
_CHUNK = 65536


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (SO_LINGER 0) instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream``, with faults on demand."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.delay_ms = 0
        self.accepted = 0
        self._listener = socket.create_server((host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name="faultproxy-accept")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def set(self, mode: str, delay_ms: int = 0) -> None:
        """Switch to ``mode``; ``reset`` also aborts every open connection."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.delay_ms = delay_ms
        self.mode = mode
        if mode == "reset":
            with self._lock:
                pairs, self._pairs = self._pairs, []
            for client, server in pairs:
                _abort(client)
                _abort(server)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            _abort(client)
            _abort(server)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "reset":
                _abort(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _abort(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target),
                                 daemon=True, name="faultproxy-pump").start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        """Copy ``source`` to ``target`` under the current mode until either ends."""
        while True:
            try:
                data = source.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            if self.mode == "blackhole":
                continue  # swallowed: the peer waits for an answer that never comes
            if self.mode == "delay" and self.delay_ms:
                time.sleep(self.delay_ms / 1000)
            if self.mode in ("blackhole", "reset"):
                continue
            try:
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
