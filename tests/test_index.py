"""The index format: round trip, determinism and rejection of malformed objects."""

from __future__ import annotations

import stat

import pytest
import zstandard

from lazyfs.errors import IndexFormatError
from lazyfs.index import _PREAMBLE, FORMAT_VERSION, MAGIC, MAX_BODY_BYTES, Index, Node, write_index


def _tree() -> Node:
    data = Node(mode=stat.S_IFREG | 0o644, size=5, extents=[(b"a" * 32, 0, 5)])
    return Node(mode=stat.S_IFDIR | 0o755, children={
        b"f": data, b"link": data, b"dir": Node(mode=stat.S_IFDIR | 0o700),
        b"s": Node(mode=stat.S_IFLNK | 0o777, target=b"/abs")})


def test_index_round_trip_is_deterministic():
    first = write_index(_tree(), {"config": {"Cmd": ["sh"]}}, {b"a" * 32: 5})
    second = write_index(_tree(), {"config": {"Cmd": ["sh"]}}, {b"a" * 32: 5})

    assert first == second
    index = Index(first)
    assert index.config == {"config": {"Cmd": ["sh"]}}
    assert [path for path, _inode in index.walk()] == [b"", b"dir", b"f", b"link", b"s"]
    assert index.inode(index.lookup(0, b"f")).nlink == 2
    assert index.lookup(0, b"link") == index.lookup(0, b"f")
    assert index.readlink(index.lookup(0, b"s")) == b"/abs"
    assert index.lookup(0, b"missing") is None


def test_index_rejects_wrong_digest_magic_and_version():
    data = write_index(_tree(), {}, {b"a" * 32: 5})

    with pytest.raises(IndexFormatError, match="does not match the digest"):
        Index(data, "0" * 64)
    with pytest.raises(IndexFormatError, match="bad magic"):
        Index(b"XXXX" + data[4:])
    with pytest.raises(IndexFormatError, match="format version 99"):
        Index(_PREAMBLE.pack(MAGIC, 99, 0) + data[_PREAMBLE.size:])
    with pytest.raises(IndexFormatError, match="truncated"):
        Index(data[:3])


def test_index_oversized_body_rejected_before_decompressing():
    # A small frame of zeros that declares a body over the limit.
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(MAX_BODY_BYTES + 1))
    data = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0) + bomb

    with pytest.raises(IndexFormatError, match="declares no size or more than"):
        Index(data)


def test_index_body_without_size_rejected():
    # A streamed frame does not record its content size.
    stream = zstandard.ZstdCompressor().compressobj()
    body = stream.compress(b"x" * 100) + stream.flush()
    data = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0) + body

    with pytest.raises(IndexFormatError, match="declares no size or more than"):
        Index(data)
