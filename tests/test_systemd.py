"""The systemd unit and the example configuration for /etc/lazyfs/lazyfs.toml."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs.config import FIELDS, DaemonConfig, load_config
from lazyfs.daemon import is_mounted

SYSTEMD_DIRECTORY = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_COMMAND = "/usr/local/bin/lazyfs"
INSTALLED_CONFIG = "/etc/lazyfs/lazyfs.toml"
RECEIVE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is missing")


def unit_settings(text: str) -> dict[str, dict[str, str]]:
    """Return {section: {key: value}} of a unit file; a repeated key keeps its last value."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current[key.strip()] = value.strip()
    return sections


def unit_for_this_environment(tmp_path: Path, text: str) -> Path:
    # verify rejects an ExecStart that does not exist, so the copy runs this
    # environment's lazyfs command instead of the installed one.
    unit = tmp_path / "lazyfs.service"
    unit.write_text(text.replace(INSTALLED_COMMAND, str(Path(sys.executable).parent / "lazyfs")))
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------
# The example configuration


def test_example_config_is_the_defaults():
    assert load_config(SYSTEMD_DIRECTORY / "lazyfs.toml") == DaemonConfig()


def test_example_config_names_every_key():
    text = (SYSTEMD_DIRECTORY / "lazyfs.toml").read_text()
    for key in FIELDS:
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key


def test_example_config_paths_are_unit_directories():
    config = load_config(SYSTEMD_DIRECTORY / "lazyfs.toml")
    service = unit_settings((SYSTEMD_DIRECTORY / "lazyfs.service").read_text())["Service"]
    assert Path("/run", service["RuntimeDirectory"]) in Path(config.mountpoint).parents
    assert Path("/run", service["RuntimeDirectory"]) in Path(config.control_socket).parents
    assert Path(config.disk_cache_path) == Path("/var/cache", service["CacheDirectory"])
    assert config.store_url == f"file:///var/lib/{service['StateDirectory']}/store"


# ---------------------------------------------------------------------------
# The unit


def test_service_unit_settings():
    settings = unit_settings((SYSTEMD_DIRECTORY / "lazyfs.service").read_text())
    service = settings["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "30"
    assert service["ExecStart"] == f"{INSTALLED_COMMAND} mount --foreground --config {INSTALLED_CONFIG}"
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectoryPreserve"] == "restart"
    assert settings["Install"]["WantedBy"] == "multi-user.target"
    assert "modprobe@fuse.service" in settings["Unit"]["After"].split()


@needs_systemd_analyze
def test_service_unit_verifies(tmp_path: Path):
    text = (SYSTEMD_DIRECTORY / "lazyfs.service").read_text()
    assert f"ExecStart={INSTALLED_COMMAND} mount --foreground" in text
    result = verify(unit_for_this_environment(tmp_path, text))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_verify_reports_invalid_setting(tmp_path: Path):
    # The check above relies on verify printing a warning for a bad value.
    text = (SYSTEMD_DIRECTORY / "lazyfs.service").read_text().replace("Type=notify", "Type=notifi")
    result = verify(unit_for_this_environment(tmp_path, text))
    assert "Failed to parse service type, ignoring: notifi" in result.stdout + result.stderr


# ---------------------------------------------------------------------------
# The unit's command line with the example configuration


@pytest.fixture
def service_root() -> Iterator[Path]:
    """A short directory standing in for /run, /var/lib and /var/cache; unmounted and removed after."""
    root = Path(tempfile.mkdtemp(prefix="lzfs-unit-"))
    try:
        yield root
    finally:
        mountpoint = root / "run" / "lazyfs" / "mnt"
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def example_config_under(root: Path) -> Path:
    """Write the example configuration with its /run, /var/lib and /var/cache paths under ``root``."""
    text = (SYSTEMD_DIRECTORY / "lazyfs.toml").read_text()
    for directory in ("/run/lazyfs", "/var/lib/lazyfs", "/var/cache/lazyfs"):
        assert f'"{directory}' in text or f"//{directory}" in text, directory
        text = text.replace(directory, f"{root}{directory}")
    path = root / "lazyfs.toml"
    path.write_text(text)
    return path


def receive(sock: socket.socket) -> str:
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        pytest.fail(f"no notification arrived within {RECEIVE_TIMEOUT_S:g} s")


@pytest.mark.fuse
def test_unit_command_runs_as_notify_service(service_root: Path):
    service = unit_settings((SYSTEMD_DIRECTORY / "lazyfs.service").read_text())["Service"]
    config_path = example_config_under(service_root)
    command = shlex.split(service["ExecStart"])
    command[0] = str(Path(sys.executable).parent / "lazyfs")
    command[command.index(INSTALLED_CONFIG)] = str(config_path)
    mountpoint = service_root / "run" / "lazyfs" / "mnt"
    # What systemd creates before ExecStart: RuntimeDirectory with its mode.
    (service_root / "run" / "lazyfs").mkdir(parents=True, mode=int(service["RuntimeDirectoryMode"], 8))

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_path = service_root / "notify.sock"
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(RECEIVE_TIMEOUT_S)
        # A short watchdog timeout, so the test does not wait WatchdogSec/2.
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
        log_path = service_root / "lazyfs.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env)
        try:
            assert receive(notify_socket) == (f"READY=1\nSTATUS=serving {mountpoint}\n"
                                              f"MAINPID={process.pid}")
            assert is_mounted(mountpoint)
            assert receive(notify_socket) == "WATCHDOG=1"
            process.send_signal(signal.SIGTERM)
            messages = [receive(notify_socket)]
            while messages[-1] == "WATCHDOG=1":
                messages.append(receive(notify_socket))
            assert messages[-1] == "STOPPING=1"
            assert process.wait(timeout=STOP_TIMEOUT_S) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not is_mounted(mountpoint)
    log_text = log_path.read_text()
    assert f"configuration: store_url='file://{service_root}/var/lib/lazyfs/store'" in log_text
    assert f"lazyfs daemon {process.pid} stopped" in log_text
