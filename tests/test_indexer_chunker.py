"""Chunking: windowed content-defined cuts, packed small files, extents that cover files exactly."""

from __future__ import annotations

import io
import random
import stat

import pytest
from fastcdc.fastcdc_cy import fastcdc_cy

from lazyfs.chunk import address_of
from lazyfs.index import Node
from lazyfs.indexer.chunker import Chunker, ChunkingParams
from lazyfs.indexer.errors import ImageError
from lazyfs.store import open_store
from tests.support import oci
from tests.support.oci import Layer, file

MIN, AVG, MAX = 256 << 10, 1 << 20, 4 << 20


class TrickleStream(io.RawIOBase):
    """Returns at most ``piece`` bytes per read, like a slow network stream."""

    def __init__(self, data: bytes, piece: int):
        super().__init__()
        self._data = memoryview(data)
        self._piece = piece

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = min(self._piece, len(self._data) if size < 0 else size)
        data, self._data = bytes(self._data[:count]), self._data[count:]
        return data


def chunk_file(data: bytes, params: ChunkingParams = ChunkingParams(), piece: int | None = None):
    emitted = []
    chunker = Chunker(lambda address, chunk: emitted.append((address, chunk)), params)
    node = Node(mode=stat.S_IFREG | 0o644, size=len(data))
    stream = TrickleStream(data, piece) if piece else io.BytesIO(data)
    chunker.add_file(node, stream, "test file")
    chunker.finish()
    return node, emitted


@pytest.mark.parametrize("window, piece", [(16 << 20, None), (8 << 20, None), (8 << 20, 100_000)],
                         ids=["default-window", "smallest-window", "short-reads"])
def test_windowed_cuts_equal_whole_file_cuts(window, piece):
    data = random.Random(1).randbytes(40 << 20)
    expected = [(address_of(data[c.offset:c.offset + c.length]), c.length)
                for c in fastcdc_cy(data, MIN, AVG, MAX)]

    node, emitted = chunk_file(data, ChunkingParams(window_bytes=window), piece)

    assert [(address, len(chunk)) for address, chunk in emitted] == expected
    assert node.extents == [(address, 0, length) for address, length in expected]
    assert b"".join(chunk for _address, chunk in emitted) == data


def test_cuts_of_compressible_data_hit_max_size():
    data = bytes(9 << 20)

    node, emitted = chunk_file(data)

    assert [len(chunk) for _address, chunk in emitted] == [MAX, MAX, 1 << 20]
    assert node.extents[0][0] == node.extents[1][0]
    assert sum(length for _address, _offset, length in node.extents) == len(data)


def test_small_files_share_packs_without_straddling():
    emitted = []
    chunker = Chunker(lambda address, chunk: emitted.append((address, chunk)))
    files = [random.Random(i).randbytes(100_000 + i) for i in range(12)]
    nodes = []
    for data in files:
        node = Node(mode=stat.S_IFREG | 0o644, size=len(data))
        chunker.add_file(node, io.BytesIO(data), "f")
        nodes.append(node)
    chunker.finish()

    # Ten files fill 1,000,045 bytes; the eleventh would pass 1 MiB and opens a new pack.
    assert [len(chunk) for _address, chunk in emitted] == [sum(map(len, files[:10])),
                                                           sum(map(len, files[10:]))]
    packs = dict(emitted)
    offset = 0
    for index, (node, data) in enumerate(zip(nodes, files)):
        assert len(node.extents) == 1
        address, chunk_offset, length = node.extents[0]
        assert length == len(data)
        assert packs[address][chunk_offset:chunk_offset + length] == data
        if index == 10:
            offset = 0
        assert chunk_offset == offset
        offset += length


def test_file_at_threshold_gets_own_chunk():
    small = b"s" * 1000
    large = random.Random(2).randbytes(256 << 10)
    emitted = []
    chunker = Chunker(lambda address, chunk: emitted.append((address, chunk)))
    small_node = Node(mode=stat.S_IFREG, size=len(small))
    large_node = Node(mode=stat.S_IFREG, size=len(large))
    chunker.add_file(small_node, io.BytesIO(small), "small")
    chunker.add_file(large_node, io.BytesIO(large), "large")
    chunker.finish()

    assert [chunk for _address, chunk in emitted] == [large, small]
    assert large_node.extents == [(address_of(large), 0, len(large))]
    assert small_node.extents == [(address_of(small), 0, len(small))]


def test_empty_file_has_no_extents_and_no_chunk():
    node, emitted = chunk_file(b"")

    assert node.extents == []
    assert emitted == []


def test_short_file_data_is_an_error():
    chunker = Chunker(lambda address, chunk: None)
    node = Node(mode=stat.S_IFREG, size=10)

    with pytest.raises(ImageError, match="test file: file data ends after 4 of 10 bytes"):
        chunker.add_file(node, io.BytesIO(b"1234"), "test file")


def test_params_reject_a_window_without_room():
    with pytest.raises(ValueError, match="window_bytes"):
        ChunkingParams(window_bytes=6 << 20)


# -- through the pipeline -----------------------------------------------------


def index_files(tmp_path, entries):
    store_url = (tmp_path / "store").as_uri()
    image = oci.write_image(tmp_path / "layout", [Layer(entries, compression="none")])
    run = oci.run_indexer("--store", store_url, image.source)
    assert run.code == 0, run.stderr
    return oci.TreeView(open_store(store_url), image.manifest_digest)


def test_zero_size_file_in_index_has_no_extents(tmp_path):
    tree = index_files(tmp_path, [file("empty", b""), file("x", b"x")])

    record = tree.inode(b"empty")
    assert record.size == 0
    assert record.count == 0
    assert tree.extents(b"empty") == []
    assert tree.read(b"empty") == b""


def test_file_of_exactly_two_chunks(tmp_path):
    source = random.Random(7).randbytes(6 << 20)
    first, second = list(fastcdc_cy(source, MIN, AVG, MAX))[:2]
    data = source[:first.length + second.length]

    tree = index_files(tmp_path, [file("two", data)])

    extents = tree.extents(b"two")
    assert [(e.file_offset, e.chunk_offset, e.length) for e in extents] == [
        (0, 0, first.length), (first.length, 0, second.length)]
    assert tree.index.chunk_count == 2
    assert [tree.index.chunk(e.chunk) for e in extents] == [
        (address_of(data[:first.length]), first.length),
        (address_of(data[first.length:]), second.length)]
    assert tree.read(b"two") == data


def test_index_has_no_empty_chunk(tmp_path):
    entries = [file(f"f{i}", bytes([i]) * i * 1000) for i in range(50)]
    entries.append(file("large", random.Random(3).randbytes(3 << 20)))

    tree = index_files(tmp_path, entries)

    lengths = [tree.index.chunk(n)[1] for n in range(tree.index.chunk_count)]
    assert all(length > 0 for length in lengths)
    for i in range(50):
        assert tree.read(f"f{i}".encode()) == bytes([i]) * i * 1000
