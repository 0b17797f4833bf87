"""The daemon under store and cache faults: never a wrong byte, never a hang.

Every test runs the real daemon over a FUSE mount of the debootstrap test
image, indexed into a moto S3 bucket. Some tests put ``FaultProxy`` between
the daemon and moto to fail, stall or cut store responses. Others corrupt
chunks in the bucket or in the LMDB tier, kill the daemon, or give the disk
tier too little room. Reads are compared with the ``umoci unpack`` tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import lmdb
import pytest

from lazyfs.chunk import unpack
from lazyfs.config import DaemonConfig
from lazyfs.control import ControlClient
from lazyfs.lmdb_tier import checksum
from lazyfs.notebook.overlay import OverlayRoot
from lazyfs.store import StoreOptions
from tests.support.daemon import DaemonProcess, daemon_config, running_daemon
from tests.support.faultproxy import FaultProxy
from tests.support.indexed_image import IndexedImage, index_image, s3_client
from tests.support.net import free_port

pytestmark = [pytest.mark.image, pytest.mark.fuse]

# Store faults of the flaky-store test: errors, throttling and connections
# reset before or in the middle of a response body.
FLAKY_ACTIONS = ("500", "503", "slowdown", "reset", "cut 1000")
FLAKY_RATE = 0.05
FLAKY_SEED = 20240607

# Short timeouts for the stall tests, so a test waits seconds, not minutes.
STALL_FETCH_TIMEOUT_S = 3.0
STALL_READ_TIMEOUT_S = 1.0
# A read may take this long past the fetch timeout: the kernel retries a
# failed readahead as a one-page read, which the failure memory ends at once.
EIO_MARGIN_S = 2.0
# How long a recovered store may take to serve a read again: the failure
# memory of an unavailable store (2 s) plus a retry of a stalled request.
RECOVERY_DEADLINE_S = 20.0

READ_WORKERS = 8
READER_TIMEOUT_S = 15.0

# A reader in its own process that prints "ok" or the errno name of its failure.
READER = """\
import errno, sys
try:
    with open(sys.argv[1], "rb") as f:
        f.read()
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("ok")
"""


@pytest.fixture(scope="module")
def image(s3_server, debootstrap_image, tmp_path_factory) -> IndexedImage:
    layout, tag = debootstrap_image
    bucket = s3_server.create_bucket(f"faults-{uuid.uuid4().hex[:12]}")
    bundle = tmp_path_factory.mktemp("reference") / "bundle"
    return index_image(layout, tag, s3_server.endpoint_url, bucket, bundle)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy("127.0.0.1", int(s3_server.endpoint_url.rsplit(":", 1)[1])) as running:
        yield running


# ---------------------------------------------------------------------------
# Helpers


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def drop_page_cache(path: Path) -> None:
    """Drop the kernel's cached pages of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mismatches(image: IndexedImage, root: Path, paths: list[bytes] | None = None) -> list[str]:
    """Read files under ``root`` in parallel; return one line per file that differs or fails."""
    paths = sorted(image.files) if paths is None else paths

    def check(path: bytes) -> str | None:
        try:
            data = read_file(Path(os.fsdecode(os.path.join(os.fsencode(root), path))))
        except OSError as exc:
            return f"{path!r}: {exc}"
        expected = image.files[path]
        if len(data) != expected.size or hashlib.sha256(data).hexdigest() != expected.sha256:
            return f"{path!r}: {len(data)} bytes that differ from the reference"
        return None

    with ThreadPoolExecutor(READ_WORKERS) as pool:
        return [line for line in pool.map(check, paths) if line is not None]


def mounted(daemon: DaemonProcess, image: IndexedImage, path: bytes) -> Path:
    return daemon.image(image.digest) / os.fsdecode(path)


def largest_files(image: IndexedImage, count: int) -> list[bytes]:
    """Return the ``count`` largest files, which share no chunk with each other."""
    paths = sorted(image.files, key=lambda path: (-image.files[path].size, path))[:count]
    chunks = [set(image.chunks_of(path)) for path in paths]
    assert sum(map(len, chunks)) == len(set().union(*chunks)), "the largest files share chunks"
    return paths


def single_chunk_file(image: IndexedImage) -> bytes:
    """Return a file of at least 64 KiB whose bytes lie in one chunk that no other file uses."""
    users = Counter(address for path in image.files for address in set(image.chunks_of(path)))
    for path in sorted(image.files):
        addresses = image.chunks_of(path)
        if image.files[path].size >= 64 << 10 and len(addresses) == 1 and users[addresses[0]] == 1:
            return path
    raise AssertionError("the test image has no file alone in one chunk")


def sync_fills(daemon: DaemonProcess) -> None:
    ControlClient(daemon.control_socket).request({"op": "sync"})


def read_errno(path: Path) -> int | None:
    try:
        read_file(path)
    except OSError as exc:
        return exc.errno
    return None


def flaky_config(directory: Path, image: IndexedImage, proxy: FaultProxy, **fields) -> DaemonConfig:
    return daemon_config(directory, image.store_url, s3_endpoint_url=proxy.endpoint_url, **fields)


def stall_config(directory: Path, image: IndexedImage, proxy: FaultProxy, **fields) -> DaemonConfig:
    return flaky_config(directory, image, proxy, fetch_timeout_s=STALL_FETCH_TIMEOUT_S,
                        store_read_timeout_s=STALL_READ_TIMEOUT_S, store_connect_timeout_s=1.0,
                        **fields)


def metric(text: str, name: str, **labels: str) -> float:
    """Return one sample of a Prometheus text exposition, 0 when it is absent."""
    expected = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        sample_name, _, label_text = sample.partition("{")
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if sample_name == name and found == expected:
            return float(value)
    return 0.0


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


@contextmanager
def replaced_object(image: IndexedImage, key: str, data: bytes):
    """Replace one object in the bucket for the duration of the block."""
    client = s3_client(image.endpoint_url)
    original = client.get_object(Bucket=image.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=image.bucket, Key=key, Body=data)
    try:
        yield original
    finally:
        client.put_object(Bucket=image.bucket, Key=key, Body=original)
        client.close()


def lmdb_chunks(cache_path: Path) -> tuple[lmdb.Environment, object]:
    env = lmdb.open(str(cache_path / "chunks"), max_dbs=4, subdir=True)
    return env, env.open_db(b"chunks")


def warnings_matching(daemon: DaemonProcess, pattern: str) -> list[str]:
    return [line for line in daemon.log_text().splitlines()
            if " WARNING " in line and re.search(pattern, line)]


# ---------------------------------------------------------------------------
# 1. A flaky store


def test_cold_read_through_flaky_store(image, proxy, tmp_path):
    proxy.random_faults(FLAKY_RATE, FLAKY_ACTIONS, FLAKY_SEED)

    with running_daemon(flaky_config(tmp_path, image, proxy), directory=tmp_path) as daemon:
        assert mismatches(image, daemon.image(image.digest)) == []
        status = daemon.status()
        log_text = daemon.log_text()

    assert "Traceback" not in log_text
    injected = Counter(action for _method, _path, action in proxy.requests if action != "pass")
    assert sorted(injected) == sorted(FLAKY_ACTIONS)
    chunk_count = len({address for path in image.files for address in image.chunks_of(path)})
    assert status["tiers"]["store"]["hits"] == chunk_count
    assert status["tiers"]["store"]["errors"] == 0
    assert status["tiers"]["store"]["timeouts"] == 0
    assert status["tiers"]["store"]["integrity_errors"] == 0
    assert status["images"][image.digest]["read_errors"] == 0


# ---------------------------------------------------------------------------
# 2. A store that stalls or stops responding


def test_default_timeouts_under_a_minute():
    defaults = DaemonConfig()
    store = StoreOptions()

    assert defaults.fetch_timeout_s <= 30.0
    # One attempt must fit the fetch timeout, or a slow store never gets a retry.
    assert defaults.store_connect_timeout_s + defaults.store_read_timeout_s < defaults.fetch_timeout_s
    assert store.connect_timeout_s == defaults.store_connect_timeout_s
    assert store.read_timeout_s == defaults.store_read_timeout_s


@pytest.mark.parametrize("fault", ["stall", "hang 1000", "trickle"])
def test_stalled_store_eio_then_recovers(image, proxy, tmp_path, fault):
    cached_path, cold_path = largest_files(image, 2)
    config = stall_config(tmp_path, image, proxy)

    with running_daemon(config, directory=tmp_path) as daemon:
        cached = mounted(daemon, image, cached_path)
        cold = mounted(daemon, image, cold_path)
        assert mismatches(image, daemon.image(image.digest), [cached_path]) == []
        proxy.random_faults(1.0, [fault], seed=1)

        started = time.monotonic()
        assert read_errno(cold) == errno.EIO
        elapsed = time.monotonic() - started
        assert STALL_FETCH_TIMEOUT_S - 0.5 <= elapsed <= STALL_FETCH_TIMEOUT_S + EIO_MARGIN_S, \
            daemon.log_text()[-4000:]

        reads_before = daemon.status()["images"][image.digest]["reads"]
        drop_page_cache(cached)
        assert mismatches(image, daemon.image(image.digest), [cached_path]) == []
        assert daemon.status()["images"][image.digest]["reads"] > reads_before

        proxy.random_faults(0.0, ["pass"], seed=1)
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while read_errno(cold) == errno.EIO and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mismatches(image, daemon.image(image.digest), [cold_path]) == []
        status = daemon.status()

    assert status["tiers"]["store"]["timeouts"] >= 1


# ---------------------------------------------------------------------------
# 3. Corrupt chunks in the store and in the LMDB tier


@pytest.mark.parametrize("replacement", ["garbage", "another chunk"])
def test_corrupt_store_chunk_eio_not_cached(image, tmp_path, replacement):
    path = single_chunk_file(image)
    address = image.chunks_of(path)[0]
    other = next(a for a in image.chunks_of(largest_files(image, 1)[0]) if a != address)
    client = s3_client(image.endpoint_url)
    other_object = client.get_object(Bucket=image.bucket, Key=image.chunk_key(other))["Body"].read()
    client.close()
    bad = {"garbage": os.urandom(4096), "another chunk": other_object}[replacement]
    metrics_address = f"127.0.0.1:{free_port()}"
    config = daemon_config(tmp_path, image.store_url, s3_endpoint_url=image.endpoint_url,
                           metrics_address=metrics_address, readahead_chunks=0)

    with replaced_object(image, image.chunk_key(address), bad), \
            running_daemon(config, directory=tmp_path) as daemon:
        assert metric(scrape(metrics_address), "lazyfs_verification_failures_total", tier="store") == 0
        for _attempt in range(2):
            assert read_errno(mounted(daemon, image, path)) == errno.EIO
        sync_fills(daemon)
        status = daemon.status()
        exposition = scrape(metrics_address)

    assert status["tiers"]["store"]["integrity_errors"] == 1
    assert status["chain"]["failed_fast"] >= 1
    assert metric(exposition, "lazyfs_verification_failures_total", tier="store") == 1
    assert status["tiers"]["ram"]["puts"] == 0
    assert status["tiers"]["ram"]["entries"] == 0
    assert status["tiers"]["disk"]["puts"] == 0
    env, chunks_db = lmdb_chunks(Path(config.disk_cache_path))
    with env.begin(db=chunks_db) as txn:
        assert txn.get(address) is None
    env.close()


def flip_byte_in_data_file(cache_path: Path, data: bytes) -> None:
    """Flip one byte of ``data`` (an entry's stored object) where LMDB's data file stores it."""
    data_file = cache_path / "chunks" / "data.mdb"
    needle = data[len(data) // 2:len(data) // 2 + 64]
    position = data_file.read_bytes().find(needle)
    assert position >= 0, "the chunk's bytes are not in data.mdb"
    fd = os.open(data_file, os.O_RDWR)
    try:
        (byte,) = os.pread(fd, 1, position)
        os.pwrite(fd, bytes([byte ^ 0xFF]), position)
    finally:
        os.close(fd)


def write_wrong_value(cache_path: Path, address: bytes) -> None:
    """Replace the entry's stored object through LMDB and keep its old checksum."""
    env, chunks_db = lmdb_chunks(cache_path)
    with env.begin(write=True, db=chunks_db) as txn:
        value = txn.get(address)
        txn.put(address, value[:8] + bytes(len(value) - 8))
    env.close()


@pytest.mark.parametrize("damage", ["flipped byte in data.mdb", "wrong value through lmdb"])
def test_corrupt_disk_entry_refetched(image, tmp_path, damage):
    path = single_chunk_file(image)
    address = image.chunks_of(path)[0]
    expected = (image.reference / os.fsdecode(path)).read_bytes()
    metrics_address = f"127.0.0.1:{free_port()}"
    config = daemon_config(tmp_path, image.store_url, s3_endpoint_url=image.endpoint_url,
                           readahead_chunks=0, metrics_address=metrics_address)
    cache_path = Path(config.disk_cache_path)
    with running_daemon(config, directory=tmp_path) as daemon:
        assert read_file(mounted(daemon, image, path)) == expected
        sync_fills(daemon)
        assert daemon.status()["tiers"]["disk"]["puts"] == 1
    env, chunks_db = lmdb_chunks(cache_path)
    with env.begin(db=chunks_db) as txn:
        stored_object = bytes(txn.get(address))[8:]
    env.close()

    if damage == "flipped byte in data.mdb":
        flip_byte_in_data_file(cache_path, stored_object)
    else:
        write_wrong_value(cache_path, address)

    with running_daemon(config, directory=tmp_path) as daemon:
        assert read_file(mounted(daemon, image, path)) == expected
        sync_fills(daemon)
        status = daemon.status()
        exposition = scrape(metrics_address)
        assert "failed its XXH3 check" in daemon.log_text()

    assert status["tiers"]["disk"]["corrupt"] == 1
    assert metric(exposition, "lazyfs_verification_failures_total", tier="disk") == 1
    assert status["tiers"]["store"]["hits"] == 1
    # The refetch and the boot trace lookup of the default trace_replay.
    assert status["store_requests"] == {"get": 2}
    assert status["tiers"]["disk"]["puts"] == 1
    env, chunks_db = lmdb_chunks(cache_path)
    with env.begin(db=chunks_db) as txn:
        value = bytes(txn.get(address))
    env.close()
    # The refetched entry is the store's object again, under a valid checksum.
    assert value[:8] == checksum(address, value[8:])
    assert hashlib.sha256(unpack(value[8:], address)).digest() == address


# ---------------------------------------------------------------------------
# 4. The daemon killed while a process reads


def test_killed_daemon_reader_fails_restart_serves(image, proxy, tmp_path):
    cached_path, cold_path, unread_path = largest_files(image, 3)
    config = flaky_config(tmp_path, image, proxy)

    with running_daemon(config, directory=tmp_path) as crashed, \
            OverlayRoot(crashed.image(image.digest), tmp_path / "container") as container:
        assert mismatches(image, crashed.image(image.digest), [cached_path]) == []
        sync_fills(crashed)
        proxy.random_faults(1.0, ["stall"], seed=1)
        requests_before = len(proxy.requests)
        reader = subprocess.Popen([sys.executable, "-c", READER, mounted(crashed, image, cold_path)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            proxy.wait_for_requests(requests_before + 1)
            crashed.kill()
            output, _ = reader.communicate(timeout=READER_TIMEOUT_S)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert output.strip() in ("ENOTCONN", "EIO")
        with pytest.raises(OSError) as caught:
            os.statvfs(config.mountpoint)
        assert caught.value.errno == errno.ENOTCONN

        proxy.random_faults(0.0, ["pass"], seed=1)
        requests_before = len(proxy.requests)
        with running_daemon(config, directory=tmp_path) as restarted:
            assert "stale mount" in restarted.log_text()
            assert mismatches(image, restarted.image(image.digest), [cached_path]) == []
            sync_fills(restarted)
            status = restarted.status()
            # The one store request is the boot trace lookup of the default
            # trace_replay, and the image has no trace: no chunk was fetched.
            assert status["store_requests"] == {"get": 1}
            assert status["store_results"] == {"get": {"not_found": 1}}
            assert status["tiers"]["store"]["requests"] == 0
            assert status["tiers"]["disk"]["hits"] >= 1
            assert status["tiers"]["disk"]["corrupt"] == 0
            assert [path.rsplit("/", 2)[-2:] for _method, path, _action in proxy.requests[requests_before:]] == [
                ["traces", image.digest]]
            assert mismatches(image, restarted.image(image.digest), [cold_path]) == []
            # A container keeps the dead mount as its lower layer.
            assert read_errno(container.rootfs / os.fsdecode(unread_path)) == errno.ENOTCONN
            assert mismatches(image, restarted.image(image.digest), [unread_path]) == []


# ---------------------------------------------------------------------------
# 5. A full LMDB map and a full disk


def test_full_lmdb_map_evicts_and_serves(image, tmp_path):
    config = daemon_config(tmp_path, image.store_url, s3_endpoint_url=image.endpoint_url,
                           disk_cache_bytes=256 << 20, disk_cache_map_bytes=24 << 20)

    with running_daemon(config, directory=tmp_path) as daemon:
        assert mismatches(image, daemon.image(image.digest)) == []
        sync_fills(daemon)
        disk = daemon.status()["tiers"]["disk"]
        full_warnings = warnings_matching(daemon, r"the LMDB map is full")
        tier_warnings = warnings_matching(daemon, r"lazyfs\.lmdb_tier")
        assert daemon.process.poll() is None

    assert disk["map_full"] >= 2
    assert disk["entries"] >= 1
    assert len(full_warnings) == 1
    assert re.search(r"\(\d+ bytes of chunks in use, budget 268435456 bytes, map size 25165824 bytes, "
                     r"\d+ bytes free on the file system\)", full_warnings[0])
    # At most one line per kind: the full map, a dropped write, an emptied cache.
    assert len(tier_warnings) <= 3
    assert warnings_matching(daemon, r"filling tier") == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs, a fraction of the test image's compressed chunks, mounted for the test."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "lazyfs-test", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_evicts_and_serves(image, tmp_path, small_filesystem):
    config = daemon_config(tmp_path, image.store_url, s3_endpoint_url=image.endpoint_url,
                           disk_cache_path=str(small_filesystem), disk_cache_bytes=1 << 30)

    with running_daemon(config, directory=tmp_path) as daemon:
        assert mismatches(image, daemon.image(image.digest)) == []
        sync_fills(daemon)
        disk = daemon.status()["tiers"]["disk"]
        full_warnings = warnings_matching(daemon, r"the file system is full")
        tier_warnings = warnings_matching(daemon, r"lazyfs\.lmdb_tier")
        assert daemon.process.poll() is None

    assert disk["disk_full"] >= 2
    assert disk["entries"] >= 1
    assert len(full_warnings) == 1
    assert re.search(r"\(\d+ bytes of chunks in use, budget 1073741824 bytes, map size \d+ bytes, "
                     r"\d+ bytes free on the file system\)", full_warnings[0])
    # At most one line per kind: the full disk, a dropped write, an emptied cache.
    assert len(tier_warnings) <= 3
    assert warnings_matching(daemon, r"filling tier") == []
