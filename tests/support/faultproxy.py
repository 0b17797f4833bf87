"""An HTTP proxy on loopback that injects faults in front of a real server.

Each request takes the next action of a script (then ``pass`` once the
script is used up):

- ``pass``:  forward the request to the upstream server and relay its response;
- ``503`` (or any 3-digit status): answer with that status and an S3 error body;
- ``slowdown``: answer 503 with the S3 ``SlowDown`` error code;
- ``reset``: close the connection without a response;
- ``stall``: read the request and never answer (until the proxy stops).

``requests`` records (method, path, action) for every request received.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import threading
from collections import deque
from collections.abc import Iterable

from .net import LOOPBACK

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    """A context manager: the proxy listens on ``endpoint_url`` while the block runs."""

    def __init__(self, upstream_host: str, upstream_port: int, script: Iterable[str] = ()):
        self.upstream = (upstream_host, upstream_port)
        self._script = deque(script)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[tuple[str, str, str]] = []
        self._server = _Server((LOOPBACK, 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def script(self, actions: Iterable[str]) -> None:
        """Replace the remaining script."""
        with self._lock:
            self._script = deque(actions)

    def _next_action(self, method: str, path: str) -> str:
        with self._lock:
            action = self._script.popleft() if self._script else "pass"
            self.requests.append((method, path, action))
            return action

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - the base class names it so
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = proxy._next_action(self.command, self.path)
                if action == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "stall":
                    proxy._stop.wait()
                    self.close_connection = True
                    return
                if action == "slowdown":
                    self._error(503, "SlowDown")
                    return
                if action.isdigit():
                    self._error(int(action), "InternalError" if action.startswith("5") else "Error")
                    return
                self._forward(body)

            def _error(self, status: int, code: str) -> None:
                payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                           f"<Message>injected by the test proxy</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {name: value for name, value in self.headers.items()
                               if name.lower() not in _HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload) if self.command != "HEAD"
                                                        else response.getheader("Content-Length", "0")))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler
