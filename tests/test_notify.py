"""The systemd notification protocol: unit tests on a datagram socket, then a real daemon."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs import notify
from lazyfs.daemon import is_mounted, start_background, unmount
from lazyfs.store import FileStore
from tests.support.daemon import DaemonProcess, cleanup, daemon_config, toml_text
from tests.support.sample_image import publish_sample_image

RECEIVE_TIMEOUT_S = 60.0


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket in a short temporary directory, and its path."""
    directory = tempfile.mkdtemp(prefix="lzfs-notify-")
    path = os.path.join(directory, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECEIVE_TIMEOUT_S)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def receive(sock: socket.socket) -> str:
    """Return the next datagram; fail the test when none arrives before the socket's timeout."""
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        pytest.fail(f"no notification arrived within {sock.gettimeout():g} s")


def pending(sock: socket.socket) -> list[str]:
    """Return the datagrams already queued, without waiting."""
    messages = []
    timeout_s = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(timeout_s)


# ---------------------------------------------------------------------------
# The protocol


def test_ready_message_format(notify_socket):
    sock, path = notify_socket
    assert notify.ready("serving /mnt", {"NOTIFY_SOCKET": path}) is True
    assert receive(sock) == f"READY=1\nSTATUS=serving /mnt\nMAINPID={os.getpid()}"


def test_stopping_and_watchdog_messages(notify_socket):
    sock, path = notify_socket
    assert notify.stopping({"NOTIFY_SOCKET": path}) is True
    assert notify.watchdog({"NOTIFY_SOCKET": path}) is True
    assert receive(sock) == "STOPPING=1"
    assert receive(sock) == "WATCHDOG=1"


def test_abstract_socket_address():
    name = f"lazyfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECEIVE_TIMEOUT_S)
        assert notify.stopping({"NOTIFY_SOCKET": "@" + name}) is True
        assert receive(sock) == "STOPPING=1"


def test_unset_socket_sends_nothing(notify_socket):
    sock, _path = notify_socket
    assert notify.ready("serving", {}) is False
    assert notify.watchdog({"NOTIFY_SOCKET": ""}) is False
    assert pending(sock) == []


def test_missing_socket_logs_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    missing = str(tmp_path / "absent.sock")
    with caplog.at_level(logging.WARNING, logger="lazyfs.notify"):
        assert notify.stopping({"NOTIFY_SOCKET": missing}) is False
    assert len(caplog.records) == 1
    assert missing in caplog.records[0].getMessage()


@pytest.mark.parametrize(("environ", "expected"), [
    ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "30000000"}, 30.0),
    ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "250000", "WATCHDOG_PID": str(os.getpid())}, 0.25),
    ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "250000", "WATCHDOG_PID": "1"}, None),
    ({"NOTIFY_SOCKET": "/run/notify"}, None),
    ({"WATCHDOG_USEC": "30000000"}, None),
    ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "0"}, None),
    ({"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(environ, expected):
    assert notify.watchdog_interval_s(environ) == expected


# ---------------------------------------------------------------------------
# A real daemon under a notify socket


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    store = FileStore(tmp_path_factory.mktemp("store"))
    publish_sample_image(store, seed=1)
    return store


def start_notifying_daemon(directory: Path, store: FileStore, env: dict[str, str]) -> DaemonProcess:
    """Start ``lazyfs mount --foreground`` with ``env`` and without a readiness pipe.

    The test then learns of readiness only from the notify socket.
    """
    config = daemon_config(directory, store.url)
    config_path = directory / "lazyfs.toml"
    config_path.write_text(toml_text(config))
    log_path = directory / "lazyfs.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.cli", "mount", "--foreground", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, **env})
    return DaemonProcess(config, process, log_path, config_path)


@pytest.fixture
def start_daemon(tmp_path: Path, store: FileStore, notify_socket):
    """Return a function that starts a daemon with NOTIFY_SOCKET plus extra variables.

    It returns the daemon and the notify socket; the daemon is stopped after the test.
    """
    sock, path = notify_socket
    daemons = []

    def start(**extra_env: str) -> tuple[DaemonProcess, socket.socket]:
        daemon = start_notifying_daemon(tmp_path, store, {"NOTIFY_SOCKET": path, **extra_env})
        daemons.append(daemon)
        return daemon, sock

    yield start
    for daemon in daemons:
        cleanup(daemon, daemon.config)


@pytest.mark.fuse
def test_daemon_ready_after_mount_serves(start_daemon):
    daemon, sock = start_daemon()
    message = receive(sock)
    assert message == f"READY=1\nSTATUS=serving {daemon.mountpoint}\nMAINPID={daemon.pid}"
    assert is_mounted(daemon.mountpoint)
    assert os.stat(daemon.mountpoint).st_dev != os.stat(daemon.mountpoint.parent).st_dev
    assert os.listdir(daemon.mountpoint / "images") == []


@pytest.mark.fuse
def test_daemon_stopping_on_sigterm(start_daemon):
    daemon, sock = start_daemon()
    assert receive(sock).startswith("READY=1\n")
    daemon.process.send_signal(signal.SIGTERM)
    assert receive(sock) == "STOPPING=1"
    assert daemon.wait() == 0
    assert pending(sock) == []
    assert not is_mounted(daemon.mountpoint)


@pytest.mark.fuse
def test_daemon_stopping_on_unmount(start_daemon):
    daemon, sock = start_daemon()
    assert receive(sock).startswith("READY=1\n")
    subprocess.run(["fusermount3", "-u", str(daemon.mountpoint)], check=True)
    assert receive(sock) == "STOPPING=1"
    assert daemon.wait() == 0
    assert pending(sock) == []


@pytest.mark.fuse
def test_daemon_sends_watchdog(start_daemon):
    daemon, sock = start_daemon(WATCHDOG_USEC="200000")
    assert receive(sock).startswith("READY=1\n")
    assert receive(sock) == "WATCHDOG=1"
    assert receive(sock) == "WATCHDOG=1"
    assert "sending systemd watchdog keep-alives every 0.1 s" in daemon.log_text()


@pytest.mark.fuse
def test_daemon_watchdog_for_other_pid(start_daemon):
    daemon, sock = start_daemon(WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    assert receive(sock).startswith("READY=1\n")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    # Everything the daemon sent is queued once it has exited.
    assert pending(sock) == ["STOPPING=1"]


@pytest.mark.fuse
def test_background_daemon_sends_nothing(tmp_path: Path, store: FileStore, notify_socket,
                                         monkeypatch: pytest.MonkeyPatch):
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    config = daemon_config(tmp_path, store.url)
    pid = None
    try:
        pid = start_background(config, log_path=tmp_path / "lazyfs.log")
        pidfd = os.pidfd_open(pid)
        try:
            unmount(config.mountpoint)
            readable, _, _ = select.select([pidfd], [], [], RECEIVE_TIMEOUT_S)
        finally:
            os.close(pidfd)
        assert readable == [pidfd], "the background daemon did not exit after the unmount"
    finally:
        if pid is not None and is_mounted(config.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", config.mountpoint], check=False)
        cleanup(None, config)
    assert pending(sock) == []
