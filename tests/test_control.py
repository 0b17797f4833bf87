"""The control socket's access rules and ``lazyfs status`` against a real daemon."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs import cli
from lazyfs.control_client import ControlClient
from lazyfs.store import FileStore
from tests.support.daemon import running_daemon
from tests.support.sample_image import publish_sample_image

REPOSITORY = Path(__file__).resolve().parent.parent
NOBODY = 65534
COMMAND_TIMEOUT_S = 60

# Chunk of the sample image's small files, and the two files read from it.
PACKED_CHUNK_BYTES = 99
SMALL_TXT_BYTES = 14
TOOL_BYTES = 20

# Keys that the status response must contain; other parts of the daemon may add more.
STATUS_KEYS = {"mountpoint", "store_url", "pid", "started_at_ns", "images", "indexes", "tiers", "chain",
               "readahead", "store_requests", "store_results", "store_retries", "traces"}
IMAGE_KEYS = {"base_inode", "inodes", "size_bytes", "chunks", "attached_at_ns", "reads", "bytes_read",
              "chunk_reads", "fetched_chunks", "fetched_bytes", "prefetched_chunks", "read_errors"}
RAM_KEYS = {"hits", "misses", "bytes_served", "puts", "evictions", "entries", "used_bytes",
            "capacity_bytes"}
DISK_KEYS = RAM_KEYS | {"corrupt", "map_full", "put_failures", "map_size_bytes"}
STORE_KEYS = {"requests", "bytes", "hits", "misses", "bytes_served", "not_found", "integrity_errors",
              "errors", "timeouts"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    return FileStore(tmp_path_factory.mktemp("store"))


def run_as_nobody(*arguments: str) -> subprocess.CompletedProcess:
    """Run ``python -m lazyfs.cli ARGUMENTS`` as uid and gid 65534, without supplementary groups."""
    return subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", *arguments], cwd="/", user=NOBODY, group=NOBODY,
        extra_groups=[], env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPOSITORY)},
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def run_status(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", "status", *arguments],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


# ---------------------------------------------------------------------------
# Access


@pytest.mark.fuse
def test_socket_owner_only_modes(tmp_path: Path, store: FileStore):
    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        socket_stat = os.lstat(daemon.control_socket)
        directory_stat = os.stat(daemon.control_socket.parent)
    assert stat.S_ISSOCK(socket_stat.st_mode)
    assert stat.S_IMODE(socket_stat.st_mode) == 0o600
    assert socket_stat.st_uid == os.geteuid()
    # daemon_config names a directory that does not exist yet, so the daemon creates it.
    assert stat.S_IMODE(directory_stat.st_mode) == 0o700


@pytest.mark.fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_other_uid_cannot_connect(tmp_path: Path, store: FileStore):
    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        socket_path = str(daemon.control_socket)
        denied_by_directory = run_as_nobody("status", "--socket", socket_path)
        # With a directory that everyone may search, the socket's own mode still rejects them.
        os.chmod(daemon.control_socket.parent, 0o755)
        os.chmod(daemon.control_socket.parent.parent, 0o755)
        denied_by_socket = run_as_nobody("status", "--socket", socket_path)
        assert daemon.status()["pid"] == daemon.pid
    expected = (f"lazyfs status: permission denied on control socket {socket_path}: "
                "run as its owner (root)\n")
    for result in (denied_by_directory, denied_by_socket):
        assert result.returncode == cli.EXIT_NOT_FOUND, result.stderr
        assert result.stderr == expected
        assert result.stdout == ""


# ---------------------------------------------------------------------------
# lazyfs status


@pytest.mark.fuse
def test_status_json_and_text(tmp_path: Path, store: FileStore):
    sample = publish_sample_image(store, seed=5)
    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        root = daemon.image(sample.digest)
        assert (root / "data" / "small.txt").read_bytes() == sample.files[b"data/small.txt"]
        assert (root / "bin" / "tool").read_bytes() == sample.files[b"bin/tool"]
        # Background fills of the disk tier finish before sync returns.
        assert ControlClient(daemon.control_socket).request({"op": "sync"}) == {}
        json_result = run_status("--socket", str(daemon.control_socket), "--json")
        text_result = run_status("--socket", str(daemon.control_socket))

    assert json_result.returncode == 0, json_result.stderr
    status = json.loads(json_result.stdout)
    assert set(status) >= STATUS_KEYS
    assert status["mountpoint"] == str(daemon.mountpoint)
    assert status["store_url"] == store.url
    assert status["pid"] == daemon.pid

    assert list(status["images"]) == [sample.digest]
    image = status["images"][sample.digest]
    assert set(image) >= IMAGE_KEYS
    expected_image = {"inodes": 21, "chunks": 3, "size_bytes": 1_348_675, "reads": 2,
                      "bytes_read": SMALL_TXT_BYTES + TOOL_BYTES, "chunk_reads": 2, "fetched_chunks": 1,
                      "fetched_bytes": PACKED_CHUNK_BYTES, "prefetched_chunks": 0, "read_errors": 0}
    for key, number in expected_image.items():
        assert image[key] == number, key

    tiers = status["tiers"]
    assert list(tiers) == ["ram", "disk", "store"]
    assert set(tiers["ram"]) >= RAM_KEYS
    assert set(tiers["disk"]) >= DISK_KEYS
    assert set(tiers["store"]) >= STORE_KEYS
    assert {key: tiers["ram"][key] for key in ("hits", "misses", "bytes_served", "entries", "used_bytes",
                                               "capacity_bytes", "evictions")} == {
        "hits": 1, "misses": 1, "bytes_served": PACKED_CHUNK_BYTES, "entries": 1,
        "used_bytes": PACKED_CHUNK_BYTES, "capacity_bytes": 256 << 20, "evictions": 0}
    # A disk entry is the store's object, here the raw codec byte and the
    # chunk (too small to compress), plus its 8-byte checksum.
    assert {key: tiers["disk"][key] for key in ("hits", "misses", "entries", "used_bytes", "corrupt")} == {
        "hits": 0, "misses": 1, "entries": 1, "used_bytes": 1 + PACKED_CHUNK_BYTES + 8, "corrupt": 0}
    store_tier = tiers["store"]
    assert {key: store_tier[key] for key in STORE_KEYS - {"bytes"}} == {
        "requests": 1, "hits": 1, "misses": 0, "bytes_served": PACKED_CHUNK_BYTES, "not_found": 0,
        "integrity_errors": 0, "errors": 0, "timeouts": 0}
    assert status["chain"]["in_flight"] == 0
    assert status["chain"]["fill_queue"] == 0
    assert status["readahead"]["prefetching"] == 0
    # The ref, the index, and the boot trace lookup of the default trace_replay:
    # the sample image has no trace.
    assert status["store_requests"] == {"get": 3}
    assert status["store_results"] == {"get": {"ok": 2, "not_found": 1}}
    assert status["store_retries"] == {}

    assert text_result.returncode == 0, text_result.stderr
    assert text_result.stdout == f"""\
mount point   {daemon.mountpoint}
store         {store.url}
pid           {daemon.pid}
images        1
  {sample.digest}
    1.3 MiB in 21 inodes and 3 chunks
    read 34 B in 2 reads, fetched 99 B in 1 chunks, 0 read errors
tier        hits  misses  hit ratio      served  cache or store
  ram          1       1     50.0 %        99 B  99 B of 256.0 MiB, 1 chunks, 0 evicted
  disk         0       1      0.0 %         0 B  108 B of 256.0 MiB, 1 chunks, 0 evicted, 0 corrupt
  store        1       0    100.0 %        99 B  1 requests, {store_tier['bytes']} B received
in flight     0 chunk fetches, 0 prefetches, 0 chunks waiting for the disk tier
store errors  store: 0 not found, 0 failed verification, 0 timed out, 0 other
store client  get 3 (1 not_found, 2 ok); 0 retries
"""


def test_status_without_daemon(tmp_path: Path):
    socket_path = tmp_path / "absent.sock"
    result = run_status("--socket", str(socket_path))
    assert result.returncode == cli.EXIT_NOT_FOUND
    assert result.stderr == (f"lazyfs status: no control socket at {socket_path}: "
                             "is the lazyfs daemon running?\n")
    assert result.stdout == ""
