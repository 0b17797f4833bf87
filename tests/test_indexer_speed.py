"""Indexer speed features: layer records, parallel layer reading, progress output."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lazyfs.indexer.chunker import ChunkingParams
from lazyfs.indexer.layercache import record_key
from lazyfs.indexer.oci_layout import OciLayoutSource
from lazyfs.indexer.pipeline import IndexOptions, IndexResult, index_image
from lazyfs.refs import index_key
from lazyfs.store import FileStore, open_store
from tests.support import oci
from tests.support.oci import Layer, directory, file, symlink

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


BASE = [directory("etc"), file("etc/hostname", b"base\n"), file("etc/gone", b"removed later\n"),
        directory("opt/data"), file("opt/data/a", b"a" * 1000), file("opt/data/b", b"b" * 2000),
        symlink("etc/link", "hostname"), file("bin/big", _random(1, 900_000), mode=0o755)]
UPPER = [oci.whiteout("etc/gone"), oci.opaque("opt/data"), file("opt/data/c", b"c\n"),
         file("etc/new", b"new\n"), file("bin/big2", _random(2, 600_000))]
MIDDLE = [file(f"lib/small{number}", _random(10 + number, 3000)) for number in range(40)]
TOP = [file("lib/small3", b"replaced\n"), oci.whiteout("lib/small7"), file("usr/large", _random(3, 1_500_000))]


class CountingSource(OciLayoutSource):
    """An OCI layout source that counts how often each blob is opened."""

    def __init__(self, image: oci.Image):
        super().__init__(image.layout, image.tag, None)
        self.opened: Counter[str] = Counter()

    def open_blob(self, descriptor):
        self.opened[descriptor.digest] += 1
        return super().open_blob(descriptor)


class CountingStore(FileStore):
    """A file store that records the keys it writes."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.written: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        self.written.append(key)
        super().put(key, data)


def _index(image: oci.Image, store: FileStore, **options) -> tuple[IndexResult, CountingSource]:
    source = CountingSource(image)
    try:
        return index_image(source, store, IndexOptions(**options)), source
    finally:
        source.close()


def test_rerun_reads_no_layer_blob(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE), Layer(UPPER)])
    store = CountingStore(tmp_path / "store")

    first, first_source = _index(image, store)
    first_written = list(store.written)
    store.written.clear()
    second, second_source = _index(image, store)

    for digest in image.layer_digests:
        assert first_source.opened[digest] == 1
        assert second_source.opened[digest] == 0
    assert sum(1 for key in first_written if key.startswith("layers/")) == 2
    assert store.written == []
    assert second.index_digest == first.index_digest
    assert second.chunks_new == 0
    assert second.bytes_stored == 0
    assert second.chunks_reused == first.chunks_new
    assert second.refs == []


def test_record_reused_under_whiteouts(tmp_path):
    # The base layer's record comes from indexing an image that has only that
    # layer; the upper layer then removes part of it.
    base_only = oci.write_image(tmp_path / "base", [Layer(BASE)])
    both = oci.write_image(tmp_path / "both", [Layer(BASE), Layer(UPPER)])
    store = CountingStore(tmp_path / "store")
    _index(base_only, store)

    result, source = _index(both, store)
    fresh, _ = _index(both, CountingStore(tmp_path / "fresh"))

    assert source.opened[both.layer_digests[0]] == 0
    assert source.opened[both.layer_digests[1]] == 1
    assert result.index_digest == fresh.index_digest
    assert (store.root / index_key(result.index_digest)).read_bytes() == \
        (tmp_path / "fresh" / index_key(fresh.index_digest)).read_bytes()
    tree = oci.TreeView(open_store(store.url), "latest")
    assert b"etc/gone" not in tree.paths()
    assert sorted(tree.listdir(b"opt/data")) == [b"c"]
    assert tree.read(b"bin/big") == _random(1, 900_000)
    assert tree.read(b"etc/hostname") == b"base\n"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_parallel_equals_serial(tmp_path, compression):
    layers = [Layer(entries, compression=compression) for entries in (BASE, MIDDLE, UPPER, TOP)]
    image = oci.write_image(tmp_path / "layout", layers)
    serial_store = FileStore(tmp_path / "serial")
    parallel_store = FileStore(tmp_path / "parallel")

    serial, _ = _index(image, serial_store, layer_workers=1, layer_records=False)
    parallel, _ = _index(image, parallel_store, layer_workers=4, layer_records=False)

    assert parallel.index_digest == serial.index_digest
    assert (parallel_store.root / index_key(parallel.index_digest)).read_bytes() == \
        (serial_store.root / index_key(serial.index_digest)).read_bytes()
    assert parallel_store.list("chunks/") == serial_store.list("chunks/")
    assert parallel_store.list("layers/") == serial_store.list("layers/")
    assert parallel.chunks_new == serial.chunks_new
    assert parallel.entries == serial.entries == sum(len(entries) for entries in (BASE, MIDDLE, UPPER, TOP))


def test_records_only_change_speed(tmp_path):
    layers = [Layer(BASE), Layer(MIDDLE), Layer(TOP)]
    image = oci.write_image(tmp_path / "layout", layers)
    store = FileStore(tmp_path / "store")

    first, _ = _index(image, store)
    second, source = _index(image, store)
    without, _ = _index(image, FileStore(tmp_path / "plain"), layer_records=False)

    assert sum(source.opened[digest] for digest in image.layer_digests) == 0
    assert first.index_digest == second.index_digest == without.index_digest
    assert second.entries == first.entries


def test_invalid_record_is_ignored(tmp_path, caplog):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE), Layer(UPPER)])
    store = FileStore(tmp_path / "store")
    first, _ = _index(image, store)
    key = record_key(image.diff_ids[1], ChunkingParams())
    store.put(key, b"not a record")

    second, source = _index(image, store)

    assert source.opened[image.layer_digests[0]] == 0
    assert source.opened[image.layer_digests[1]] == 1
    assert second.index_digest == first.index_digest
    assert any(f"ignoring {key} and reading the layer again" in record.getMessage()
               for record in caplog.records)
    # The rewritten record is used by the next run.
    _third, third_source = _index(image, store)
    assert sum(third_source.opened[digest] for digest in image.layer_digests) == 0


def test_other_chunk_sizes_use_other_records(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE)])
    store = FileStore(tmp_path / "store")
    _index(image, store)
    other = ChunkingParams(large_file_bytes=64 << 10, min_chunk_bytes=64 << 10, avg_chunk_bytes=256 << 10,
                           max_chunk_bytes=1 << 20, pack_bytes=256 << 10, window_bytes=4 << 20)

    _result, source = _index(image, store, chunking=other)

    assert source.opened[image.layer_digests[0]] == 1
    assert store.exists(record_key(image.diff_ids[0], other))
    assert store.exists(record_key(image.diff_ids[0], ChunkingParams()))


def _run_cli(args: list[str], stderr) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazyfs.indexer.cli", *args], cwd=REPOSITORY_ROOT,
                          stdout=subprocess.PIPE, stderr=stderr, timeout=120)


def test_progress_lines_on_pipe(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE), Layer(UPPER)])

    run = _run_cli(["--store", (tmp_path / "store").as_uri(), "--json", "--progress-interval", "0",
                    image.source], subprocess.PIPE)

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["layers"] == 2
    stderr = run.stderr.decode()
    assert "\r" not in stderr
    lines = stderr.splitlines()
    assert lines
    assert all(line.startswith("lazyfs-index: ") and "% of layer data read" in line for line in lines)
    assert "100% of layer data read" in lines[-1]
    assert "2 of 2 layers done" in lines[-1]


def test_quiet_writes_no_progress(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE), Layer(UPPER)])

    run = _run_cli(["--store", (tmp_path / "store").as_uri(), "--json", "--quiet", "--progress-interval",
                    "0", image.source], subprocess.PIPE)

    assert run.returncode == 0
    assert run.stderr == b""
    assert json.loads(run.stdout)["layers"] == 2


def test_default_interval_keeps_short_run_silent(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE)])

    run = _run_cli(["--store", (tmp_path / "store").as_uri(), image.source], subprocess.PIPE)

    assert run.returncode == 0
    assert run.stderr == b""


def test_progress_bar_on_terminal(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE), Layer(UPPER)])
    controller, terminal = os.openpty()
    try:
        run = _run_cli(["--store", (tmp_path / "store").as_uri(), "--json", image.source], terminal)
        os.close(terminal)
        terminal = -1
        output = _read_all(controller)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)

    assert run.returncode == 0
    assert json.loads(run.stdout)["layers"] == 2
    text = output.decode()
    assert text.startswith("\r[")
    assert text.endswith("\n")
    final = text.rstrip().rsplit("\r", 1)[-1]
    assert final.startswith("[" + "#" * 30 + "] 100% ")
    assert "2/2 layers" in final
    assert "lazyfs-index: " not in text


def test_progress_bar_ends_before_error(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(BASE), Layer(UPPER)])
    path = image.blob_path(image.layer_digests[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    oci.replace_blob(image.layout, image.layer_digests[1], bytes(data))
    controller, terminal = os.openpty()
    try:
        run = _run_cli(["--store", (tmp_path / "store").as_uri(), image.source], terminal)
        os.close(terminal)
        terminal = -1
        output = _read_all(controller)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)

    assert run.returncode == 3
    # The terminal turns each "\n" into "\r\n".
    lines = output.decode().replace("\r\n", "\n").split("\n")
    assert len(lines) == 3
    assert lines[0].startswith("\r[")
    assert lines[1].startswith(f"lazyfs-index: error: {image.source}: layer 2 of 2 ")
    assert lines[2] == ""


def _read_all(controller: int) -> bytes:
    pieces = []
    while True:
        try:
            piece = os.read(controller, 65536)
        except OSError:  # EIO: the terminal side is closed and everything was read
            break
        if not piece:
            break
        pieces.append(piece)
    return b"".join(pieces)
