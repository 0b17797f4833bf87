"""The main job end to end on the debootstrap-built image, with real components.

The image is pushed with skopeo to a docker-registry on loopback, indexed from
there into a moto S3 server, mounted by the daemon over FUSE and run with
``lazyfs-run`` under runc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.control import ControlClient
from lazyfs.notebook.container import Runc, reap_stale_containers
from tests.support import images, trees
from tests.support.containers import searchable_directory
from tests.support.daemon import running_daemon
from tests.support.s3server import MotoServer

pytestmark = [pytest.mark.image, pytest.mark.fuse, pytest.mark.runc]

REPOSITORY = "lazyfs/bookworm-python3"

PROGRAM = (
    "import json, sqlite3, decimal, email.parser, xml.dom.minidom, http.client, os\n"
    "doc = xml.dom.minidom.parseString('<a><b>x</b></a>')\n"
    "db = sqlite3.connect(':memory:')\n"
    "value = db.execute('select 6 * 7').fetchone()[0]\n"
    "print(json.dumps({'sum': str(decimal.Decimal('0.1') + decimal.Decimal('0.2')),"
    " 'tag': doc.documentElement.firstChild.tagName, 'sql': value,"
    " 'uid': os.getuid(), 'cwd': os.getcwd()}, sort_keys=True))\n"
)
EXPECTED_OUTPUT = '{"cwd": "/", "sql": 42, "sum": "0.3", "tag": "b", "uid": 0}\n'


def index_from_registry(registry, layout: Path, tag: str, store_url: str, endpoint_url: str) -> dict:
    """Push the image to the registry and index it from there; return the --json result."""
    registry.push(layout, tag, REPOSITORY, "python3")
    result = subprocess.run(
        [sys.executable, "-m", "lazyfs.indexer.cli", "--store", store_url, "--endpoint-url", endpoint_url,
         "--plain-http", "--json", f"docker://{registry.host}/{REPOSITORY}:python3"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def s3_image(registry, s3_server, debootstrap_image):
    """The test image indexed from the registry into a fresh S3 bucket."""
    layout, tag = debootstrap_image
    bucket = s3_server.create_bucket("end-to-end")
    store_url = f"s3://{bucket}/images"
    result = index_from_registry(registry, layout, tag, store_url, s3_server.endpoint_url)
    return store_url, s3_server.endpoint_url, result


@pytest.fixture
def tmp_path():
    """A temporary directory that a container's root (host uid 100000 by default) can search.

    lazyfs-run starts containers in a user namespace, and pytest's own
    temporary directories are private to host root.
    """
    with searchable_directory(prefix="lazyfs-end-to-end-") as path:
        yield path


def run_command(daemon, tmp_path: Path, image: str, *command: str, extra: tuple[str, ...] = ()):
    """Run ``lazyfs-run`` against a running daemon; return the process and its stats."""
    stats_path = tmp_path / f"stats-{len(list(tmp_path.glob('stats-*')))}.json"
    state_dir = tmp_path / "containers"
    process = subprocess.run(
        [sys.executable, "-m", "lazyfs.notebook.run", "--control-socket", str(daemon.control_socket),
         "--state-dir", str(state_dir), "--stats-json", str(stats_path), *extra, image, "--", *command],
        capture_output=True, text=True, timeout=300)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    return process, stats


def overlay_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(path))]


def test_mount_matches_umoci_unpack(s3_image, debootstrap_image, tmp_path):
    store_url, endpoint_url, result = s3_image
    layout, tag = debootstrap_image
    reference = images.umoci_unpack(layout, tag, tmp_path / "bundle")

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        mounted = daemon.image(result["index_digest"])
        expected = trees.snapshot(reference)
        actual = trees.snapshot(mounted)
        # umoci gives the root directory the time of the unpack, not the image's.
        differences = trees.diff(expected, actual, compare_mtime=False)
        assert not differences, "\n".join(differences)
        mtime_differences = [
            path for path, entry in expected.items()
            if path != trees.ROOT and entry.type != "symlink" and entry.mtime_ns != actual[path].mtime_ns]
        assert mtime_differences == []

        expected_groups = trees.hardlink_groups(reference)
        assert expected_groups, "the test image should contain hardlinks"
        assert trees.hardlink_groups(mounted) == expected_groups
        for group in expected_groups:
            for path in group:
                assert os.lstat(os.path.join(os.fsencode(mounted), path)).st_nlink == len(group)


def test_run_python_from_lazy_image(s3_image, tmp_path):
    store_url, endpoint_url, result = s3_image

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        process, stats = run_command(daemon, tmp_path, f"{result['names'][0]}", "python3", "-c", PROGRAM)

        assert process.returncode == 0, process.stderr
        assert process.stdout == EXPECTED_OUTPUT
        image = stats["image"]
        assert image["index"] == result["index_digest"]
        assert image["size_bytes"] == result["file_bytes"]
        fetched = stats["fetched"]["store"]
        assert fetched["requests"] > 0
        # The store sends compressed chunks; the workload needs a small part of them.
        assert fetched["bytes"] < 0.15 * image["size_bytes"]
        assert stats["fetched"]["store"]["bytes_served"] < 0.30 * image["size_bytes"]
        assert list((tmp_path / "containers").iterdir()) == []
        assert overlay_mounts_under(tmp_path / "containers") == []


def test_run_passes_exit_code_env_and_workdir(s3_image, tmp_path):
    store_url, endpoint_url, result = s3_image
    script = ("import os, sys; open('/written', 'w').write('x');"
              "print(os.getcwd(), os.environ['GREETING'], os.environ['PATH']); sys.exit(7)")

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        process, stats = run_command(daemon, tmp_path, result["index_digest"], "python3", "-c", script,
                                     extra=("-e", "GREETING=hello", "-w", "/tmp"))

        assert process.returncode == 7, process.stderr
        assert process.stdout == "/tmp hello /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        assert stats["exit_code"] == 7
        # The write went to the container's upper directory, which is gone.
        assert not (daemon.image(result["index_digest"]) / "written").exists()
        assert list((tmp_path / "containers").iterdir()) == []


def test_run_unknown_image_is_setup_error(s3_image, tmp_path):
    store_url, endpoint_url, _result = s3_image

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        process, stats = run_command(daemon, tmp_path, "no/such-image:tag", "true")

    assert process.returncode == 125
    assert stats is None
    assert process.stderr.startswith("lazyfs-run: error: ")
    assert "no/such-image:tag" in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1


def test_cold_then_warm_after_restart(registry, debootstrap_image, tmp_path):
    layout, tag = debootstrap_image
    with MotoServer() as server:
        bucket = server.create_bucket("cold-warm")
        store_url = f"s3://{bucket}/images"
        result = index_from_registry(registry, layout, tag, store_url, server.endpoint_url)
        fields = {"store_url": store_url, "s3_endpoint_url": server.endpoint_url,
                  "store_max_attempts": 1, "fetch_timeout_s": 10.0}

        # The cold daemon records the boot trace, which lazyfs-run saves when its command exits.
        with running_daemon(directory=tmp_path / "cold", trace_record=True, **fields) as daemon:
            cold, cold_stats = run_command(daemon, tmp_path, result["index_digest"], "python3", "-c", PROGRAM)
            cold_status = daemon.status()
        disk_cache = Path(daemon.config.disk_cache_path)

        assert cold.returncode == 0, cold.stderr
        assert cold.stdout == EXPECTED_OUTPUT
        assert cold_stats["fetched"]["store"]["requests"] > 0
        assert cold_status["store_requests"]["get"] > 0
        cold_trace = cold_status["traces"][result["index_digest"]]
        assert cold_trace["state"] == "saved"
        assert cold_trace["saved_chunks"] > 0

        # With the store gone, any request would fail: the warm run must not
        # make one, and its trace replay reads the trace from the local copy.
        server.stop()
        with running_daemon(directory=tmp_path / "warm", disk_cache_path=str(disk_cache),
                            **fields) as daemon:
            warm, warm_stats = run_command(daemon, tmp_path, result["index_digest"], "python3", "-c", PROGRAM)
            # Waits for the trace replay to end.
            assert ControlClient(daemon.control_socket).request({"op": "sync"}) == {}
            warm_status = daemon.status()

        assert warm.returncode == 0, warm.stderr
        assert warm.stdout == EXPECTED_OUTPUT
        assert warm_status["store_requests"] == {}
        assert warm_status["traces"][result["index_digest"]]["state"] == "replayed"
        assert warm_status["traces"][result["index_digest"]]["trace_chunks"] == cold_trace["saved_chunks"]
        assert warm_stats["fetched"]["store"]["requests"] == 0
        assert warm_stats["fetched"]["disk"]["hits"] > 0
        assert warm_stats["fetched"]["disk"]["bytes_served"] == cold_stats["fetched"]["store"]["bytes_served"]


def _start_run(daemon, tmp_path: Path, image: str, *command: str) -> subprocess.Popen:
    """Start ``lazyfs-run`` whose command prints "started" and then sleeps as the container's PID 1."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lazyfs.notebook.run", "--control-socket", str(daemon.control_socket),
         "--state-dir", str(tmp_path / "containers"), image, "sh", "-c", "echo started; exec sleep 300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "started\n"
    return process


def _runc_containers() -> list[str]:
    result = subprocess.run(["runc", "--root", "/run/lazyfs/runc", "list", "-q"],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_run_second_signal_kills_container(s3_image, tmp_path):
    store_url, endpoint_url, result = s3_image

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        process = _start_run(daemon, tmp_path, result["index_digest"])
        try:
            # PID 1 has no SIGTERM handler, so the kernel drops the first one.
            process.send_signal(signal.SIGTERM)
            assert process.stderr.readline() == (
                "lazyfs-run: forwarded SIGTERM to the container; send another signal to kill it\n")
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
                # A killed lazyfs-run leaves its container; remove it so the mount can go.
                reap_stale_containers(tmp_path / "containers", Runc())

        assert code == 128 + signal.SIGKILL
        assert process.stderr.read() == "lazyfs-run: second signal: killing the container\n"
        process.stdout.close()
        process.stderr.close()
        assert list((tmp_path / "containers").iterdir()) == []
        assert overlay_mounts_under(tmp_path / "containers") == []


def test_run_reaps_container_of_killed_run(s3_image, tmp_path):
    store_url, endpoint_url, result = s3_image

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        killed = _start_run(daemon, tmp_path, result["index_digest"])
        killed.kill()
        killed.wait()
        killed.stdout.close()
        killed.stderr.close()
        [left] = list((tmp_path / "containers").iterdir())
        assert left.name in _runc_containers()
        assert overlay_mounts_under(tmp_path / "containers") == [str(left / "rootfs")]

        process, _stats = run_command(daemon, tmp_path, result["index_digest"], "true")

        assert process.returncode == 0, process.stderr
        assert list((tmp_path / "containers").iterdir()) == []
        assert overlay_mounts_under(tmp_path / "containers") == []
        assert left.name not in _runc_containers()


def test_run_command_without_separator(s3_image, tmp_path):
    store_url, endpoint_url, result = s3_image

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        process = subprocess.run(
            [sys.executable, "-m", "lazyfs.notebook.run", "--control-socket", str(daemon.control_socket),
             "--state-dir", str(tmp_path / "containers"), result["index_digest"], "ls", "-d", "/usr"],
            capture_output=True, text=True, timeout=120)

    assert process.returncode == 0, process.stderr
    assert process.stdout == "/usr\n"


@pytest.mark.parametrize("arguments, message", [
    (("-e", "NOEQUALS"), "invalid -e 'NOEQUALS': expected NAME=VALUE"),
    (("-e", "=x"), "invalid -e '=x': expected NAME=VALUE"),
    (("-w", "relative"), "invalid -w 'relative': the working directory must be an absolute path"),
])
def test_run_rejects_bad_arguments(arguments, message):
    process = subprocess.run([sys.executable, "-m", "lazyfs.notebook.run", *arguments, "image", "true"],
                             capture_output=True, text=True, timeout=60)

    assert process.returncode == 2
    assert process.stderr.endswith(f"lazyfs-run: error: {message}\n")


def test_run_without_image_names_only_image():
    process = subprocess.run([sys.executable, "-m", "lazyfs.notebook.run"], capture_output=True, text=True,
                             timeout=60)

    assert process.returncode == 2
    assert process.stderr.endswith(
        "lazyfs-run: error: the following argument is required: image (the command is optional)\n")


@pytest.mark.parametrize("command, code, message", [
    ("nosuchcmd", 127, 'exec: "nosuchcmd": executable file not found in $PATH'),
    ("/etc/passwd", 126, 'exec: "/etc/passwd": permission denied'),
])
def test_run_command_not_startable(s3_image, tmp_path, command, code, message):
    store_url, endpoint_url, result = s3_image

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        s3_endpoint_url=endpoint_url) as daemon:
        process, stats = run_command(daemon, tmp_path, result["index_digest"], command)

    assert process.returncode == code
    assert stats is None
    assert process.stderr.endswith(f"lazyfs-run: error: the container did not start: {message}\n")
    assert list((tmp_path / "containers").iterdir()) == []
