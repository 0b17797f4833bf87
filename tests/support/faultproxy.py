"""An HTTP proxy on loopback that injects faults in front of a real server.

Each request takes the next action of a script. Once the script is used up,
a request takes ``pass``, or with ``random_faults(rate, actions, seed)`` a
fault drawn from ``actions`` with probability ``rate``. The draws come from a
``random.Random(seed)``, so a seed always gives the same sequence of actions,
whichever requests they land on. The actions:

- ``pass``:  forward the request to the upstream server and relay its response;
- ``503`` (or any 3-digit status): answer with that status and an S3 error body;
- ``429 Retry-After: 1`` (a status, then one header line): the same, with that header;
- ``slowdown``: answer 503 with the S3 ``SlowDown`` error code;
- ``reset``: close the connection without a response;
- ``stall``: read the request and never answer (until the proxy stops);
- ``cut N``: forward, send the headers and the first N bytes of the body, then
  reset the connection;
- ``hang N``: forward, send the headers and the first N bytes of the body, then
  send nothing more and keep the connection open (until the proxy stops);
- ``trickle``: forward, then send the body one byte a second (until the
  client disconnects or the proxy stops);
- ``unauthorized``: forward without the request's Authorization header;
- ``ignore-range``: forward without the request's Range header;
- ``wrong-range``: forward without the Range header and relay the whole body
  as a 206 whose Content-Range starts at byte 0.

``script_for_path(fragment, actions)`` gives the requests whose path contains
``fragment`` a script of their own, used before the main one while it lasts.

``requests`` records (method, path, action) for every request received,
``request_headers`` the headers of each, and ``statuses`` the status line
code sent for each request that got one. ``wait_for_requests(count)`` blocks
until that many requests have arrived.
"""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import socketserver
import sys
import threading
from collections import deque
from collections.abc import Iterable

from .net import LOOPBACK

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # A client that closes a connection with unread data makes the kernel
        # send a reset. That is normal here, and the base class would print a
        # traceback to sys.stderr, which a test may be capturing at the time.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class FaultProxy:
    """A context manager: the proxy listens on ``endpoint_url`` while the block runs."""

    def __init__(self, upstream_host: str, upstream_port: int, script: Iterable[str] = ()):
        self.upstream = (upstream_host, upstream_port)
        self._script = deque(script)
        self._path_scripts: list[tuple[str, deque]] = []
        self._lock = threading.Lock()
        self._arrivals = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._random: random.Random | None = None
        self._fault_rate = 0.0
        self._fault_actions: tuple[str, ...] = ()
        self.requests: list[tuple[str, str, str]] = []
        self.request_headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        self._server = _Server((LOOPBACK, 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def script(self, actions: Iterable[str]) -> None:
        """Replace the remaining script."""
        with self._lock:
            self._script = deque(actions)

    def script_for_path(self, fragment: str, actions: Iterable[str]) -> None:
        """Give requests whose path contains ``fragment`` a script of their own."""
        with self._lock:
            self._path_scripts.append((fragment, deque(actions)))

    def random_faults(self, rate: float, actions: Iterable[str], seed: int) -> None:
        """After the script, give each request one of ``actions`` with probability ``rate``."""
        actions = tuple(actions)
        if not 0 <= rate <= 1 or not actions:
            raise ValueError(f"random faults need a rate from 0 to 1 and actions, not {rate!r}, {actions!r}")
        with self._lock:
            self._random = random.Random(seed)
            self._fault_rate = rate
            self._fault_actions = actions

    def wait_for_requests(self, count: int, timeout_s: float = 30.0) -> None:
        """Block until ``count`` requests have arrived; raise TimeoutError after ``timeout_s``."""
        with self._arrivals:
            if not self._arrivals.wait_for(lambda: len(self.requests) >= count, timeout_s):
                raise TimeoutError(f"only {len(self.requests)} of {count} requests reached the proxy "
                                   f"within {timeout_s:g} s")

    def _next_action(self, method: str, path: str, headers: dict[str, str]) -> str:
        with self._lock:
            path_script = next((actions for fragment, actions in self._path_scripts
                                if fragment in path and actions), None)
            if path_script is not None:
                action = path_script.popleft()
            elif self._script:
                action = self._script.popleft()
            elif self._random is not None and self._random.random() < self._fault_rate:
                action = self._random.choice(self._fault_actions)
            else:
                action = "pass"
            self.requests.append((method, path, action))
            self.request_headers.append(headers)
            self._arrivals.notify_all()
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

            def send_response(self, code, message=None):
                with proxy._lock:
                    proxy.statuses.append(code)
                super().send_response(code, message)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = proxy._next_action(self.command, self.path, dict(self.headers.items()))
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
                status, _, header = action.partition(" ")
                if status.isdigit():
                    name, _, value = header.partition(":")
                    extra = {name.strip(): value.strip()} if header else {}
                    self._error(int(status), "InternalError" if status.startswith("5") else "Error", extra)
                    return
                if status == "cut":
                    self._forward(body, cut_after=int(header))
                    return
                if status == "hang":
                    self._forward(body, hang_after=int(header))
                    return
                if action in ("unauthorized", "ignore-range", "wrong-range"):
                    dropped = {"unauthorized": "authorization"}.get(action, "range")
                    self._forward(body, drop_header=dropped, whole_as_partial=action == "wrong-range")
                    return
                self._forward(body, trickle=action == "trickle")

            def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
                payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                           f"<Message>injected by the test proxy</Message></Error>").encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes, cut_after: int | None = None, hang_after: int | None = None,
                         trickle: bool = False,
                         drop_header: str | None = None, whole_as_partial: bool = False) -> None:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {name: value for name, value in self.headers.items()
                               if name.lower() not in _HOP_BY_HOP and name.lower() != drop_header}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                finally:
                    connection.close()
                status = response.status
                if whole_as_partial and status == 200:
                    status = 206
                self.send_response(status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() not in ("content-length", "content-range"):
                        self.send_header(name, value)
                    elif name.lower() == "content-range" and not whole_as_partial:
                        self.send_header(name, value)
                if whole_as_partial:
                    self.send_header("Content-Range", f"bytes 0-{len(payload) - 1}/{len(payload)}")
                self.send_header("Content-Length", str(len(payload) if self.command != "HEAD"
                                                        else response.getheader("Content-Length", "0")))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if cut_after is not None:
                    self.wfile.write(payload[:cut_after])
                    self.wfile.flush()
                    self._reset()
                elif hang_after is not None:
                    self.wfile.write(payload[:hang_after])
                    self.wfile.flush()
                    proxy._stop.wait()
                    self.close_connection = True
                elif trickle:
                    self._trickle(payload)
                else:
                    self.wfile.write(payload)

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.close_connection = True
                self.connection.close()

            def _trickle(self, payload: bytes) -> None:
                self.close_connection = True
                for position in range(len(payload)):
                    try:
                        self.wfile.write(payload[position:position + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    if proxy._stop.wait(1.0):
                        return

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler
