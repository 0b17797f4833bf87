"""Loopback ports for test servers: pick a free one, wait until one accepts."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A test server exited or did not become ready before its deadline."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks the port and the socket is closed again, so another
    process could take it before the caller binds it. The caller's readiness
    wait catches that case as a start failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(
    host: str,
    port: int,
    deadline_s: float,
    proc: subprocess.Popen | None = None,
    stderr_path: Path | None = None,
) -> None:
    """Block until ``host:port`` accepts a TCP connection.

    Polls with a short, growing backoff. Raises ServerStartError when ``proc``
    exits first or when ``deadline_s`` seconds pass. The message includes the
    tail of the process's stderr, read from its pipe or from ``stderr_path``.
    """
    deadline = time.monotonic() + deadline_s
    delay_s = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"process {proc.args!r} exited with code {proc.returncode} before "
                f"{host}:{port} accepted connections{stderr_tail(proc, stderr_path)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise ServerStartError(
                f"{host}:{port} did not accept connections within {deadline_s} s "
                f"(last error: {last_error}){stderr_tail(proc, stderr_path)}"
            )
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.2)


def stderr_tail(
    proc: subprocess.Popen | None, stderr_path: Path | None = None, max_lines: int = 20
) -> str:
    """Return the last lines of a server's stderr, formatted for an error message.

    Reads ``stderr_path`` when given. Otherwise reads ``proc``'s stderr pipe,
    but only once the process has exited, because reading it earlier would block.
    """
    if stderr_path is not None:
        data = stderr_path.read_bytes() if stderr_path.exists() else b""
    elif proc is not None and proc.stderr is not None and proc.poll() is not None:
        data = proc.stderr.read()
    else:
        return ""
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    lines = data.splitlines()[-max_lines:]
    if not lines:
        return ""
    return "\nstderr:\n" + "\n".join(lines)
