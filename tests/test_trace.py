"""Boot traces: the stored format, recording in a real daemon, replay as prefetch below demand reads.

The daemon tests run ``lazyfs mount --foreground`` against the session's moto
S3 server, with the fault-injecting proxy in front of it where a test needs
to see or stall the store requests.
"""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.config import load_config
from lazyfs.control import ControlClient
from lazyfs.errors import ConfigError, ObjectNotFound
from lazyfs.index import Node
from lazyfs.s3store import S3Store
from lazyfs.store import StoreOptions
from lazyfs.trace import (MAX_TRACE_CHUNKS, TraceFormatError, TraceRecorder, decode_trace, encode_trace,
                          trace_key)
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.faultproxy import FaultProxy
from tests.support.sample_image import MTIME_NS, deterministic_bytes, directory, publish_index, put_chunk

FILE_BYTES = 64 << 10
FILE_COUNT = 6
DIGEST = "ab" * 32
ADDRESSES = [hashlib.sha256(bytes([number])).digest() for number in range(5)]


# ---------------------------------------------------------------------------
# The stored format


def resealed(data: bytes) -> bytes:
    """Return trace bytes with a fresh checksum, so a test reaches the checks behind it."""
    body = data[:-32]
    return body + hashlib.sha256(body).digest()


def test_trace_roundtrip_exact_bytes():
    data = encode_trace(DIGEST, ADDRESSES)

    assert data == encode_trace(DIGEST, list(ADDRESSES))
    assert len(data) == 8 + 2 + 2 + 4 + 32 + 5 * 32 + 32
    assert data[:8] == b"LZFSTRC\0"
    assert data[16:48] == bytes.fromhex(DIGEST)
    assert decode_trace(data, DIGEST) == ADDRESSES


def test_trace_empty_roundtrip():
    assert decode_trace(encode_trace(DIGEST, []), DIGEST) == []


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-1], "checksum does not match"),
    (lambda data: data[:20], "truncated"),
    (lambda data: data[:60] + bytes([data[60] ^ 1]) + data[61:], "checksum does not match"),
    (lambda data: resealed(b"LZIX" + data[4:]), "bad magic"),
    (lambda data: resealed(data[:8] + b"\x00\x02" + data[10:]), "format version 2"),
    (lambda data: resealed(data[:-64]), "do not match the length"),
])
def test_trace_damage_rejected(damage, message):
    with pytest.raises(TraceFormatError) as caught:
        decode_trace(damage(encode_trace(DIGEST, ADDRESSES)), DIGEST)

    assert message in str(caught.value)
    assert trace_key(DIGEST) in str(caught.value)


def test_trace_of_other_index_rejected():
    data = encode_trace("cd" * 32, ADDRESSES)

    with pytest.raises(TraceFormatError, match=f"recorded for index {'cd' * 32}"):
        decode_trace(data, DIGEST)


def test_trace_repeated_address_rejected():
    data = encode_trace(DIGEST, ADDRESSES)
    repeated = resealed(data[:48] + ADDRESSES[1] + data[80:])

    with pytest.raises(TraceFormatError, match="lists a chunk address twice"):
        decode_trace(repeated, DIGEST)
    with pytest.raises(ValueError, match="once"):
        encode_trace(DIGEST, [ADDRESSES[0], ADDRESSES[0]])


def test_recorder_first_read_order_bounded():
    recorder = TraceRecorder(max_chunks=3)
    for number in (2, 0, 2, 1, 0, 4, 3):
        recorder.record(ADDRESSES[number])

    assert recorder.addresses == [ADDRESSES[2], ADDRESSES[0], ADDRESSES[1]]
    assert recorder.full


@pytest.mark.parametrize("key, value", [("trace_max_chunks", 0), ("trace_max_chunks", MAX_TRACE_CHUNKS + 1),
                                        ("trace_window_s", 0), ("trace_replay_concurrency", 0)])
def test_trace_config_invalid_values(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, {key: value})


# ---------------------------------------------------------------------------
# A daemon over moto S3


@dataclass
class FilesImage:
    """An image of one-chunk files f0..f5 and a two-chunk file big, published to S3."""

    store: S3Store
    store_url: str
    digest: str
    files: dict[str, bytes]
    # Chunk addresses of each file, in file order.
    chunks: dict[str, list[bytes]]

    def trace(self) -> bytes | None:
        try:
            return self.store.get(trace_key(self.digest))
        except ObjectNotFound:
            return None


def regular_file(pieces: list[tuple[bytes, bytes]]) -> Node:
    extents = [(address, 0, len(data)) for address, data in pieces]
    return Node(mode=stat.S_IFREG | 0o644, mtime_ns=MTIME_NS, size=sum(len(data) for _a, data in pieces),
                extents=extents)


@pytest.fixture
def image(s3_server, s3_bucket) -> FilesImage:
    store = S3Store(s3_bucket, "images", StoreOptions(endpoint_url=s3_server.endpoint_url))
    files, chunks, children, sizes = {}, {}, {}, {}
    for number, name in enumerate([f"f{number}" for number in range(FILE_COUNT)] + ["big"]):
        parts = [deterministic_bytes(100 + number, FILE_BYTES)]
        if name == "big":
            parts.append(deterministic_bytes(200, FILE_BYTES))
        pieces = [(put_chunk(store, data), data) for data in parts]
        sizes.update({address: len(data) for address, data in pieces})
        files[name] = b"".join(parts)
        chunks[name] = [address for address, _data in pieces]
        children[name.encode()] = regular_file(pieces)
    digest = publish_index(store, directory(children), sizes)
    return FilesImage(store, f"s3://{s3_bucket}/images", digest, files, chunks)


def start(image: FilesImage, tmp_path: Path, endpoint_url: str, **fields):
    """Return a running_daemon context over ``image``'s bucket with boot traces on."""
    values = {"trace_record": True, "trace_replay": True, "readahead_chunks": 0,
              "store_max_attempts": 2, "store_read_timeout_s": 10.0, "fetch_timeout_s": 20.0}
    values.update(fields)
    return running_daemon(directory=tmp_path, store_url=image.store_url, s3_endpoint_url=endpoint_url,
                          **values)


def read(daemon: DaemonProcess, image: FilesImage, name: str) -> bytes:
    return (daemon.image(image.digest) / name).read_bytes()


def chunk_gets(proxy: FaultProxy) -> list[str]:
    """Return the chunk addresses (hex) that the store was asked for, in arrival order."""
    paths = [urllib.parse.urlsplit(path).path for method, path, _action in proxy.requests if method == "GET"]
    return [path.rsplit("/", 1)[1] for path in paths if "/chunks/" in path]


def test_trace_recorded_in_first_read_order(image, s3_server, tmp_path):
    with start(image, tmp_path, s3_server.endpoint_url) as daemon:
        for name in ("f3", "f1", "f3", "big", "f5", "f0"):
            assert read(daemon, image, name) == image.files[name]
        assert daemon.status()["traces"][image.digest]["recording_chunks"] == 6

        saved = subprocess.run(
            [sys.executable, "-m", "lazyfs.cli", "trace", "save", image.digest,
             "--socket", str(daemon.control_socket)], capture_output=True, text=True, timeout=60)
        assert saved.returncode == 0, saved.stderr
        assert saved.stdout == f"saved the boot trace of {image.digest} with 6 chunks\n"

        # Reads after the save are not recorded, and a second save writes nothing.
        assert read(daemon, image, "f2") == image.files["f2"]
        again = ControlClient(daemon.control_socket).request({"op": "trace_save", "index": image.digest})
        status = daemon.status()["traces"][image.digest]

    expected = (image.chunks["f3"] + image.chunks["f1"] + image.chunks["big"] + image.chunks["f5"]
                + image.chunks["f0"])
    assert decode_trace(image.trace(), image.digest) == expected
    assert again == {"index": image.digest, "saved": False, "chunks": 0, "state": "saved"}
    assert status["state"] == "saved"
    assert status["saved_chunks"] == 6
    assert status["recording_chunks"] == 0


def test_trace_save_of_unattached_image_fails(image, s3_server, tmp_path):
    with start(image, tmp_path, s3_server.endpoint_url) as daemon:
        saved = subprocess.run(
            [sys.executable, "-m", "lazyfs.cli", "trace", "save", image.digest,
             "--socket", str(daemon.control_socket)], capture_output=True, text=True, timeout=60)

    assert saved.returncode == 5
    assert saved.stdout == ""
    assert saved.stderr == (f"lazyfs trace: image {image.digest} is not attached to the daemon, so nothing "
                            "was recorded: read from the image first, with trace_record = true\n")


def test_full_recording_saved_at_once(image, s3_server, tmp_path):
    with start(image, tmp_path, s3_server.endpoint_url, trace_max_chunks=2) as daemon:
        for name in ("f3", "f1", "f5"):
            assert read(daemon, image, name) == image.files[name]
        ControlClient(daemon.control_socket).request({"op": "sync"})
        status = daemon.status()["traces"][image.digest]

    assert decode_trace(image.trace(), image.digest) == image.chunks["f3"] + image.chunks["f1"]
    assert status["state"] == "saved"
    assert status["saved_chunks"] == 2


def test_existing_trace_kept_by_save(image, s3_server, tmp_path):
    stored = encode_trace(image.digest, image.chunks["f4"])
    image.store.put(trace_key(image.digest), stored)

    with start(image, tmp_path, s3_server.endpoint_url, trace_replay=False) as daemon:
        assert read(daemon, image, "f1") == image.files["f1"]
        ControlClient(daemon.control_socket).request({"op": "sync"})
        response = ControlClient(daemon.control_socket).request({"op": "trace_save", "index": image.digest})
        status = daemon.status()

    assert response["saved"] is False
    assert response["state"] == "present"
    assert image.trace() == stored
    # With replay off the trace is loaded but not replayed: one chunk request, f1's.
    assert status["tiers"]["store"]["requests"] == 1
    assert status["traces"][image.digest]["trace_chunks"] == 1


def test_fresh_daemon_replays_trace_into_lmdb(image, s3_server, tmp_path):
    order = image.chunks["f4"] + image.chunks["big"] + image.chunks["f0"]
    image.store.put(trace_key(image.digest), encode_trace(image.digest, order))
    port = urllib.parse.urlsplit(s3_server.endpoint_url).port

    with FaultProxy("127.0.0.1", port) as proxy, \
            start(image, tmp_path, proxy.endpoint_url, trace_replay_concurrency=1) as daemon:
        client = ControlClient(daemon.control_socket)
        client.image(image.digest)
        client.request({"op": "sync"})
        replayed = daemon.status()

        for name in ("f4", "big", "f0"):
            assert read(daemon, image, name) == image.files[name]
        after_reads = daemon.status()

    assert chunk_gets(proxy) == [address.hex() for address in order]
    trace_status = replayed["traces"][image.digest]
    assert trace_status["state"] == "replayed"
    assert trace_status["replay_fetched"] == 4
    assert trace_status["replay_errors"] == 0
    assert replayed["tiers"]["store"]["requests"] == 4
    assert replayed["tiers"]["store"]["background_requests"] == 4
    assert replayed["tiers"]["disk"]["puts"] == 4
    assert replayed["images"][image.digest]["bytes_read"] == 0
    assert replayed["images"][image.digest]["prefetched_chunks"] == 4
    # Every read after the replay is served from the RAM tier: its only misses are the replay's.
    assert after_reads["tiers"]["store"]["requests"] == 4
    assert after_reads["tiers"]["ram"]["misses"] == 4
    assert after_reads["tiers"]["disk"]["hits"] == 0
    assert after_reads["images"][image.digest]["fetched_chunks"] == 4


def test_prefetch_never_delays_demand_read(image, s3_server, tmp_path):
    stalled = image.chunks["f0"] + image.chunks["f1"]
    image.store.put(trace_key(image.digest), encode_trace(image.digest, stalled))
    port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    proxy = FaultProxy("127.0.0.1", port)
    for address in stalled:
        proxy.script_for_path(f"/chunks/{address.hex()}", ["stall"] * 4)

    # Both demand slots would be held by the stalled prefetches if they shared them.
    with proxy, start(image, tmp_path, proxy.endpoint_url, fetch_concurrency=2, prefetch_concurrency=1,
                      trace_replay_concurrency=2) as daemon:
        ControlClient(daemon.control_socket).image(image.digest)
        # The index, the trace and the two stalled chunks.
        proxy.wait_for_requests(4)

        started = time.monotonic()
        assert read(daemon, image, "f2") == image.files["f2"]
        assert read(daemon, image, "f3") == image.files["f3"]
        elapsed_s = time.monotonic() - started
        status = daemon.status()
        stalls = [path for _method, path, action in proxy.requests if action == "stall"]
        answered = len(proxy.statuses)
        requests = len(proxy.requests)

    assert elapsed_s < 10.0
    assert len(stalls) == 2
    assert answered == requests - 2
    assert status["traces"][image.digest]["state"] == "replaying"
    assert status["tiers"]["store"]["background_requests"] == 2
    assert status["tiers"]["store"]["requests"] == 4
    assert status["images"][image.digest]["fetched_chunks"] == 2


def test_corrupt_trace_ignored_and_replaced(image, s3_server, tmp_path):
    valid = encode_trace(image.digest, image.chunks["f5"])
    image.store.put(trace_key(image.digest), valid[:40] + bytes([valid[40] ^ 0xFF]) + valid[41:])

    with start(image, tmp_path, s3_server.endpoint_url) as daemon:
        assert read(daemon, image, "f1") == image.files["f1"]
        client = ControlClient(daemon.control_socket)
        client.request({"op": "sync"})
        status = daemon.status()
        response = client.request({"op": "trace_save", "index": image.digest})
        log_lines = [line for line in daemon.log_text().splitlines() if "boot trace" in line]

    assert status["traces"][image.digest]["state"] == "recording"
    assert status["tiers"]["store"]["requests"] == 1
    invalid = [line for line in log_lines if "ignoring invalid boot trace" in line]
    assert len(invalid) == 1
    assert "checksum does not match" in invalid[0]
    assert response == {"index": image.digest, "saved": True, "chunks": 1, "state": "saved"}
    assert decode_trace(image.trace(), image.digest) == image.chunks["f1"]


# ---------------------------------------------------------------------------
# The local trace cache beside the disk tier


def trace_gets(proxy: FaultProxy) -> int:
    return sum(1 for method, path, _action in proxy.requests if method == "GET" and "/traces/" in path)


def test_cached_trace_spares_restart_request(image, s3_server, tmp_path):
    order = image.chunks["f2"] + image.chunks["big"]
    stored = encode_trace(image.digest, order)
    image.store.put(trace_key(image.digest), stored)
    port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    cached = tmp_path / "cache" / "traces" / image.digest

    with FaultProxy("127.0.0.1", port) as proxy:
        with start(image, tmp_path, proxy.endpoint_url, trace_record=False) as first:
            ControlClient(first.control_socket).image(image.digest)
            ControlClient(first.control_socket).request({"op": "sync"})
            first_status = first.status()
        first_trace_gets = trace_gets(proxy)
        assert cached.read_bytes() == stored
        assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700

        requests_before = len(proxy.requests)
        with start(image, tmp_path, proxy.endpoint_url, trace_record=False) as restarted:
            ControlClient(restarted.control_socket).image(image.digest)
            ControlClient(restarted.control_socket).request({"op": "sync"})
            restarted_status = restarted.status()
        restart_requests = proxy.requests[requests_before:]

    assert first_trace_gets == 1
    assert first_status["traces"][image.digest]["state"] == "replayed"
    assert len(order) > 2
    assert first_status["tiers"]["store"]["requests"] == len(order)
    # The restart reads the trace and the index from local copies and every
    # replayed chunk from the LMDB tier.
    assert restart_requests == []
    assert restarted_status["store_requests"] == {}
    trace_status = restarted_status["traces"][image.digest]
    assert trace_status["state"] == "replayed"
    assert trace_status["trace_chunks"] == len(order)
    assert trace_status["replay_cached"] == len(order)
    assert restarted_status["tiers"]["disk"]["hits"] == len(order)


def test_saved_trace_cached_with_its_exact_bytes(image, s3_server, tmp_path):
    with start(image, tmp_path, s3_server.endpoint_url) as daemon:
        for name in ("f5", "f0"):
            assert read(daemon, image, name) == image.files[name]
        response = ControlClient(daemon.control_socket).request({"op": "trace_save", "index": image.digest})

    assert response == {"index": image.digest, "saved": True, "chunks": 2, "state": "saved"}
    assert (tmp_path / "cache" / "traces" / image.digest).read_bytes() == image.trace()
    assert decode_trace(image.trace(), image.digest) == image.chunks["f5"] + image.chunks["f0"]


def test_invalid_cached_trace_removed_and_loaded_from_store(image, s3_server, tmp_path):
    stored = encode_trace(image.digest, image.chunks["f1"])
    image.store.put(trace_key(image.digest), stored)
    cache_dir = tmp_path / "cache" / "traces"
    cache_dir.mkdir(parents=True)
    (cache_dir / image.digest).write_bytes(stored[:-1] + bytes([stored[-1] ^ 1]))

    with start(image, tmp_path, s3_server.endpoint_url, trace_record=False) as daemon:
        ControlClient(daemon.control_socket).image(image.digest)
        ControlClient(daemon.control_socket).request({"op": "sync"})
        status = daemon.status()
        log_text = daemon.log_text()

    assert f"cached boot trace {cache_dir / image.digest} is invalid (traces/{image.digest}: checksum " \
           "does not match); removing it and loading it from the store" in log_text
    assert (cache_dir / image.digest).read_bytes() == stored
    assert status["traces"][image.digest]["state"] == "replayed"
    assert status["traces"][image.digest]["trace_chunks"] == 1
    assert status["store_results"]["get"] == {"ok": 3}


def test_missing_trace_not_cached(image, s3_server, tmp_path):
    with start(image, tmp_path, s3_server.endpoint_url, trace_record=False) as daemon:
        ControlClient(daemon.control_socket).image(image.digest)
        ControlClient(daemon.control_socket).request({"op": "sync"})
        status = daemon.status()

    assert status["traces"][image.digest]["state"] == "none"
    assert status["store_results"]["get"] == {"ok": 1, "not_found": 1}
    assert not (tmp_path / "cache" / "traces").exists()
