"""A TCP proxy on loopback that adds network latency in front of a real server.

This kernel has no netem queueing discipline, so latency is added in user
space: every byte a side sends reaches the other side ``one_way_delay_s``
later, in order, for requests and responses alike. A request-response
exchange therefore takes at least ``2 * one_way_delay_s`` more than it would
without the proxy, which is a round-trip time of that much. Bandwidth is not
limited.

Each connection gets two forwarding pipes, one per direction. In each pipe a
reader thread stamps what it receives with its delivery time, and a writer
thread sends it once that time has come.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

from .net import LOOPBACK

_READ_BYTES = 1 << 16


class LatencyProxy:
    """A context manager: ``127.0.0.1:port`` forwards to ``upstream`` with added latency."""

    def __init__(self, upstream_host: str, upstream_port: int, round_trip_s: float):
        self.upstream = (upstream_host, upstream_port)
        self.one_way_delay_s = round_trip_s / 2
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        # Notified whenever a finished connection's sockets are closed.
        self._released = threading.Condition(self._lock)
        self.connections = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_for_open_sockets(self, count: int, timeout_s: float) -> bool:
        """Wait until at most ``count`` sockets are open; return False if that took over ``timeout_s``."""
        with self._released:
            return self._released.wait_for(lambda: len(self._sockets) <= count, timeout_s)

    def __enter__(self) -> "LatencyProxy":
        threading.Thread(target=self._accept, name="latency-proxy-accept", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            # Both sockets close once both directions have ended, so a
            # long-lived proxy does not pile up finished connections.
            directions_left = [2]
            self._pipe(client, upstream, (client, upstream), directions_left)
            self._pipe(upstream, client, (client, upstream), directions_left)

    def _pipe(self, source: socket.socket, target: socket.socket, pair: tuple[socket.socket, socket.socket],
              directions_left: list[int]) -> None:
        pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
        threading.Thread(target=self._read, args=(source, pending), daemon=True).start()
        threading.Thread(target=self._write_then_release, args=(target, pending, pair, directions_left),
                         daemon=True).start()

    def _write_then_release(self, target: socket.socket, pending: queue.Queue,
                            pair: tuple[socket.socket, socket.socket], directions_left: list[int]) -> None:
        self._write(target, pending)
        with self._lock:
            directions_left[0] -= 1
            if directions_left[0] or self._closed.is_set():
                return
            for sock in pair:
                self._sockets.remove(sock)
                _close(sock)
            self._released.notify_all()

    def _read(self, source: socket.socket, pending: queue.Queue) -> None:
        while True:
            try:
                data = source.recv(_READ_BYTES)
            except OSError:
                data = b""
            pending.put((time.monotonic() + self.one_way_delay_s, data))
            if not data:
                return

    def _write(self, target: socket.socket, pending: queue.Queue) -> None:
        while True:
            deliver_at, data = pending.get()
            # The proxy's whole purpose is this wait: it is the emulated link delay.
            delay = deliver_at - time.monotonic()
            if delay > 0 and self._closed.wait(delay):
                return
            if not data:
                # The sender closed its side: pass the end of stream on.
                try:
                    target.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                target.sendall(data)
            except OSError:
                return


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
