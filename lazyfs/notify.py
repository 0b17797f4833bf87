"""The systemd service notification protocol (sd_notify), without a systemd library.

A service started with ``Type=notify`` finds a datagram socket in
``$NOTIFY_SOCKET``: a file system path, or an abstract socket name when it
starts with "@". Each message is one datagram of newline-separated
``NAME=value`` assignments (systemd.exec(5) and sd_notify(3) describe them):

- ``READY=1`` once the service works, with ``STATUS=`` text and ``MAINPID=``;
- ``STOPPING=1`` when shutdown begins;
- ``WATCHDOG=1`` at least once per ``$WATCHDOG_USEC`` microseconds when the
  unit sets ``WatchdogSec=``. ``$WATCHDOG_PID``, when set, names the process
  that must send it, and any other process leaves the watchdog alone.

Without ``$NOTIFY_SOCKET`` every function here does nothing, so a daemon
started outside systemd behaves as before. A send that fails with OSError is
logged, not raised, because the service works whether or not systemd
receives the message.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


def _socket_address(environ: Mapping[str, str]) -> str | bytes | None:
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        # An abstract socket name starts with a NUL byte in sockaddr_un.
        return b"\0" + os.fsencode(path[1:])
    return path


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``; return whether it was sent.

    Returns False without sending when the variable is unset or empty, and
    after logging a warning when the send fails.
    """
    environ = os.environ if environ is None else environ
    address = _socket_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sending %r to the service manager at %s failed: %s",
                    message.replace("\n", " "), environ["NOTIFY_SOCKET"], exc)
        return False
    return True


def ready(status: str, environ: Mapping[str, str] | None = None) -> bool:
    """Tell the service manager that the service works, with a one-line status text."""
    return notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}", environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """Tell the service manager that shutdown has begun."""
    return notify("STOPPING=1", environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """Send one watchdog keep-alive message."""
    return notify("WATCHDOG=1", environ)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Return the watchdog timeout in seconds, or None when this process has no watchdog.

    Returns None when ``$NOTIFY_SOCKET`` or ``$WATCHDOG_USEC`` is unset, when
    ``$WATCHDOG_PID`` names another process, or when ``$WATCHDOG_USEC`` is not
    a positive integer (logged as a warning).
    """
    environ = os.environ if environ is None else environ
    if _socket_address(environ) is None:
        return None
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text and pid_text != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: it must be a positive integer of microseconds",
                    usec_text)
        return None
    return usec / 1_000_000
