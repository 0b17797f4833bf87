"""Hostile local cache files: boot trace and index copies, and damaged LMDB tier entries.

A cache on a node's disk can be damaged by a crash, a full or read-only file
system, or an operator. The daemon must never hang or fail a reader because of
it: a bad copy is dropped and the object is loaded from the store again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest
import zstandard

from lazyfs.lmdb_tier import LmdbTier, checksum
from lazyfs.store import FileStore
from lazyfs.trace import MAX_TRACE_BYTES, encode_trace, load_trace, trace_key
from tests.support.daemon import running_daemon
from tests.support.lmdbfiles import put_raw
from tests.support.sample_image import deterministic_bytes, publish_single_file_image

MiB = 1 << 20
DIGEST = "cd" * 32
ADDRESSES = [bytes([number]) * 32 for number in range(3)]
# How long a test waits for a cache read that must not block; a working read takes milliseconds.
HANG_LIMIT_S = 10.0


def trace_store(tmp_path: Path) -> FileStore:
    """Return a file store that contains a valid trace of DIGEST listing ADDRESSES."""
    store = FileStore(tmp_path / "store")
    store.put(trace_key(DIGEST), encode_trace(DIGEST, ADDRESSES))
    return store


def run_bounded(function, *args):
    """Run ``function`` in a thread and return (thread, results) after at most HANG_LIMIT_S.

    ``results`` contains the return value once the thread has finished.
    """
    results = []
    thread = threading.Thread(target=lambda: results.append(function(*args)), daemon=True)
    thread.start()
    thread.join(HANG_LIMIT_S)
    return thread, results


def release_fifo_reader(fifo: Path) -> None:
    """Open ``fifo`` for writing and close it, so a reader blocked on it reads end of file."""
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        # ENXIO means that no reader is waiting, and ENOENT that the FIFO was removed.
        return
    os.close(descriptor)


def read_chars() -> int:
    """Return the bytes this thread has read through read(2) and similar calls."""
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/thread-self/io has no rchar line")


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """Mount a 64 KiB tmpfs for the test and unmount it afterwards."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


# ---------------------------------------------------------------------------
# Cached boot traces


def test_cached_trace_fifo_falls_back_to_store(tmp_path):
    store = trace_store(tmp_path)
    cache_dir = tmp_path / "traces"
    cache_dir.mkdir()
    fifo = cache_dir / DIGEST
    os.mkfifo(fifo)

    thread, results = run_bounded(load_trace, store, DIGEST, cache_dir)
    finished = not thread.is_alive()
    release_fifo_reader(fifo)
    thread.join(HANG_LIMIT_S)

    assert finished, f"load_trace blocked for {HANG_LIMIT_S:g} s opening a FIFO in the trace cache"
    assert results == [ADDRESSES]


def test_cached_trace_oversized_file_not_read_whole(tmp_path):
    store = trace_store(tmp_path)
    cache_dir = tmp_path / "traces"
    cache_dir.mkdir()
    oversized = cache_dir / DIGEST
    with open(oversized, "wb") as file:
        file.write(encode_trace(DIGEST, ADDRESSES))
        file.truncate(64 * MiB)

    before = read_chars()
    addresses = load_trace(store, DIGEST, cache_dir)
    read_bytes = read_chars() - before

    assert addresses == ADDRESSES
    # The store's copy is a few hundred bytes, and no valid trace exceeds MAX_TRACE_BYTES.
    assert read_bytes <= 2 * MAX_TRACE_BYTES, f"read {read_bytes} bytes of a 64 MiB cache file"


def test_invalid_cached_trace_on_read_only_fs(tmp_path, small_tmpfs, caplog):
    store = trace_store(tmp_path)
    cache_dir = small_tmpfs / "traces"
    cache_dir.mkdir()
    (cache_dir / DIGEST).write_bytes(b"not a trace")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)

    with caplog.at_level(logging.WARNING, logger="lazyfs.trace"):
        addresses = load_trace(store, DIGEST, cache_dir)

    assert addresses == ADDRESSES
    assert (cache_dir / DIGEST).read_bytes() == b"not a trace"
    assert any(str(cache_dir / DIGEST) in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------
# Cached indexes


def test_cached_index_fifo_does_not_hang_lookup(tmp_path):
    store = FileStore(tmp_path / "store")
    data = deterministic_bytes(31, 100_000)
    digest, _addresses = publish_single_file_image(store, data)
    index_cache = tmp_path / "cache" / "indexes"
    index_cache.mkdir(parents=True)
    fifo = index_cache / digest
    os.mkfifo(fifo)

    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        thread, results = run_bounded(lambda: (daemon.image(digest) / "file.bin").read_bytes())
        finished = not thread.is_alive()
        release_fifo_reader(fifo)
        thread.join(HANG_LIMIT_S)

    assert finished, f"a lookup of the image blocked for {HANG_LIMIT_S:g} s on a FIFO in the index cache"
    assert results == [data]


# ---------------------------------------------------------------------------
# LMDB tier entries with a valid checksum and the wrong content


def short_raw_object(data: bytes) -> bytes:
    return b"\x00" + data[:-5]


def other_zstd_object(data: bytes) -> bytes:
    compressor = zstandard.ZstdCompressor(write_content_size=True)
    return b"\x01" + compressor.compress(data + b"tail")


@pytest.mark.parametrize("wrong_object", [short_raw_object, other_zstd_object], ids=["raw", "zstd"])
def test_lmdb_entry_of_wrong_length_refetched(tmp_path, wrong_object):
    store = FileStore(tmp_path / "store")
    data = deterministic_bytes(32, 200_000)
    digest, (address,) = publish_single_file_image(store, data)
    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        assert (daemon.image(digest) / "file.bin").read_bytes() == data
    stored = wrong_object(data)
    put_raw(tmp_path / "cache" / "chunks", b"chunks", address, checksum(address, stored) + stored)

    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        try:
            read = (daemon.image(digest) / "file.bin").read_bytes()
        except OSError as exc:
            read = exc.strerror
        status = daemon.status()

    assert read == data
    assert status["tiers"]["disk"]["corrupt"] == 1
    assert status["tiers"]["store"]["requests"] == 1


# ---------------------------------------------------------------------------
# LMDB tier bookkeeping damaged on disk


@pytest.mark.parametrize("key", [b"version", b"used_bytes", b"tick"])
async def test_lmdb_damaged_meta_value_recovered(tmp_path, key):
    path = tmp_path / "lmdb"
    data = deterministic_bytes(33, 50_000)
    address = bytes.fromhex("ee" * 32)
    disk = LmdbTier(path, 64 * MiB)
    await disk.aclose()
    put_raw(path, b"meta", key, b"abc")

    disk = LmdbTier(path, 64 * MiB)
    await disk.put(address, data)
    fetched = await disk.get(address)
    await disk.aclose()

    assert fetched == data
