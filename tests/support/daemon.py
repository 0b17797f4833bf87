"""Run ``lazyfs mount --foreground`` as a subprocess, the way an operator would.

``running_daemon`` writes the configuration to a TOML file, starts the daemon
with ``--ready-fd`` and returns once the daemon reports that the mount serves.
On exit it stops the daemon if it still runs and lazily unmounts whatever is
left at the mount point, so a failing test never leaves a mount behind. A
mount that was already there when the block started is left alone.

Control sockets live in a short directory under /tmp, because a Unix socket
path has at most 107 bytes and pytest's tmp_path names can be longer.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.config import DaemonConfig, to_dict
from lazyfs.control import ControlClient
from lazyfs.daemon import is_mounted

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def daemon_config(directory: Path, store_url: str, **fields: Any) -> DaemonConfig:
    """Return a configuration with every path under ``directory``, plus ``fields``.

    The control socket goes to a new short directory under /tmp unless
    ``fields`` sets it; ``cleanup`` removes that directory.
    """
    if "control_socket" not in fields:
        socket_directory = Path(tempfile.mkdtemp(prefix="lzfs-"))
        fields["control_socket"] = str(socket_directory / "control" / "lazyfs.sock")
    values = {
        "store_url": store_url,
        "mountpoint": str(directory / "mnt"),
        "disk_cache_path": str(directory / "cache"),
        "disk_cache_bytes": 256 << 20,
        "ram_cache_bytes": 256 << 20,
        "fetch_timeout_s": 20.0,
        "log_level": "debug",
    }
    values.update(fields)
    return DaemonConfig(**values)


def toml_text(config: DaemonConfig) -> str:
    """Return the configuration as a TOML document (None values are left out)."""
    lines = []
    for key, value in to_dict(config).items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float):
            text = "inf" if math.isinf(value) else repr(value)
        elif isinstance(value, int):
            text = str(value)
        else:
            # A JSON string with ASCII escapes is a valid TOML basic string.
            text = json.dumps(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@dataclass
class DaemonProcess:
    """A running ``lazyfs mount --foreground`` and its configuration."""

    config: DaemonConfig
    process: subprocess.Popen
    log_path: Path
    config_path: Path
    exit_codes: list[int] = field(default_factory=list)

    @property
    def mountpoint(self) -> Path:
        return Path(self.config.mountpoint)

    @property
    def control_socket(self) -> Path:
        return Path(self.config.control_socket)

    @property
    def pid(self) -> int:
        return self.process.pid

    def image(self, digest: str) -> Path:
        """Return the path of an image's root directory under the mount."""
        return self.mountpoint / "images" / digest

    def status(self) -> dict[str, Any]:
        return ControlClient(self.control_socket).status()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send SIGTERM and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int:
        """Send SIGKILL, as a crash would; the mount stays behind, dead."""
        if self.process.poll() is None:
            self.process.kill()
        return self.wait(STOP_TIMEOUT_S)

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the daemon to exit and return its exit status."""
        code = self.process.wait(timeout=timeout_s)
        self.exit_codes.append(code)
        return code


def start_daemon(config: DaemonConfig, directory: Path) -> DaemonProcess:
    """Start the daemon and return once it is ready; raise RuntimeError with its log otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"lazyfs-{time.monotonic_ns()}.toml"
    config_path.write_text(toml_text(config))
    log_path = config_path.with_suffix(".log")
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.cli", "mount", "--foreground",
                 "--config", str(config_path), "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,))
        os.close(write_fd)
        write_fd = -1
        daemon = DaemonProcess(config, process, log_path, config_path)
        _wait_ready(daemon, read_fd)
        return daemon
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _wait_ready(daemon: DaemonProcess, read_fd: int) -> None:
    # poll, unlike select, takes descriptors above 1023 too.
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    readable = poller.poll(READY_TIMEOUT_S * 1000)
    message = os.read(read_fd, 64) if readable else None
    if message == b"ready\n":
        return
    if daemon.process.poll() is None:
        daemon.process.kill()
    code = daemon.process.wait()
    reason = "timed out" if message is None else f"exited with status {code}"
    raise RuntimeError(f"lazyfs daemon {reason} before it was ready; its log:\n{daemon.log_text()}")


def cleanup(daemon: DaemonProcess | None, config: DaemonConfig, detach: bool = True) -> None:
    """Stop the daemon if it runs; with ``detach``, lazily unmount anything left at the mount point.

    The control socket's directory is removed too when ``daemon_config`` made it.
    """
    try:
        if daemon is not None and daemon.process.poll() is None:
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                daemon.kill()
    finally:
        if detach and is_mounted(config.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", config.mountpoint], check=False)
        socket_directory = Path(config.control_socket).parent.parent
        if socket_directory.name.startswith("lzfs-"):
            shutil.rmtree(socket_directory, ignore_errors=True)


@contextmanager
def running_daemon(config: DaemonConfig | None = None, *, directory: Path | None = None,
                   store_url: str | None = None, **fields: Any) -> Iterator[DaemonProcess]:
    """Run a daemon for the duration of the block; see the module docstring.

    Either pass a full ``config`` (its files go to ``directory`` or a new
    temporary directory), or ``directory`` and ``store_url`` plus any fields.
    """
    temporary = None
    if directory is None:
        temporary = directory = Path(tempfile.mkdtemp(prefix="lazyfs-daemon-"))
    if config is None:
        if store_url is None:
            raise ValueError("running_daemon needs a config or a store_url")
        config = daemon_config(directory, store_url, **fields)
    # A mount that was there before belongs to someone else and stays.
    mounted_before = is_mounted(config.mountpoint)
    daemon = None
    try:
        daemon = start_daemon(config, directory)
        yield daemon
    finally:
        cleanup(daemon, config, detach=not mounted_before)
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
