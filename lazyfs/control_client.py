"""Blocking client of the daemon's control socket (protocol in ``lazyfs.control``).

It imports neither trio nor pyfuse3, so command-line tools and the runtime
start fast.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from pathlib import Path
from typing import Any

from .errors import ControlError

DEFAULT_CLIENT_TIMEOUT_S = 10.0


class ControlClient:
    """Blocking client of a daemon's control socket, for command-line tools and the runtime."""

    def __init__(self, path: str | Path, timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S):
        self.path = Path(path)
        self.timeout_s = timeout_s

    def status(self) -> dict[str, Any]:
        """Return the daemon's status (see the module docstring); raise ControlError."""
        return self.request({"op": "status"})

    def resolve(self, reference: str) -> str:
        """Return the index digest of an image name, manifest digest or index digest."""
        return self.request({"op": "resolve", "reference": reference})["index"]

    def image(self, index_digest: str, shift: str | None = None) -> dict[str, Any]:
        """Attach an image and return its config, source digests, file count, size and path.

        With ``shift`` ("<uid base>:<gid base>:<count>") the path is that of
        the view whose owners are shifted into that host id range.
        """
        request = {"op": "image", "index": index_digest}
        if shift is not None:
            request["shift"] = shift
        return self.request(request)

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its response; raise ControlError on any failure."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            self._connect(sock)
            sock.settimeout(self.timeout_s)
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
                line = self._receive_line(sock)
            except TimeoutError:
                raise ControlError(
                    f"the daemon at {self.path} did not respond within {self.timeout_s:g} s") from None
            except OSError as exc:
                raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        try:
            response = json.loads(line)
        except ValueError:
            raise ControlError(f"the daemon at {self.path} sent invalid JSON: {line[:200]!r}") from None
        if not isinstance(response, dict):
            raise ControlError(f"the daemon at {self.path} sent a non-object response")
        if "error" in response:
            raise ControlError(f"the daemon at {self.path} failed the {request.get('op')} request: "
                               f"{response['error']}")
        return response

    def _connect(self, sock: socket.socket) -> None:
        # A socket with a Python timeout is non-blocking, and its connect fails
        # at once with EAGAIN while the daemon's listen backlog is full. A
        # blocking connect waits for room, for at most SO_SNDTIMEO.
        seconds, fraction = divmod(self.timeout_s, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(seconds), int(fraction * 1_000_000)))
        try:
            sock.connect(str(self.path))
        except BlockingIOError:
            raise ControlError(f"the daemon at {self.path} did not accept the connection within "
                               f"{self.timeout_s:g} s: its control socket's backlog is full") from None
        except FileNotFoundError:
            raise ControlError(f"no control socket at {self.path}: is the lazyfs daemon running?") from None
        except ConnectionRefusedError:
            raise ControlError(
                f"nothing listens on control socket {self.path}: the daemon has exited") from None
        except PermissionError:
            raise ControlError(
                f"permission denied on control socket {self.path}: run as its owner (root)") from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise ControlError(f"{self.path} is not a socket") from None
            raise ControlError(f"cannot connect to control socket {self.path}: {exc.strerror}") from None

    def _receive_line(self, sock: socket.socket) -> bytes:
        buffer = bytearray()
        while b"\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise ControlError(f"the daemon at {self.path} closed the connection without a response")
            buffer += data
            if len(buffer) > 64 << 20:
                raise ControlError(f"the daemon at {self.path} sent a response over 64 MiB")
        return bytes(buffer[:buffer.index(b"\n")])
