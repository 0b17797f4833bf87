"""Small images written straight into a store, for tree, tier and mount tests.

``publish_sample_image`` builds one index with every kind of entry the daemon
must show. It has nested directories, a file of exactly two chunks, small files
packed into one shared chunk, an empty file and a chain of three hardlinks. It
also has absolute, dangling and self-referencing symlinks, a character device,
a FIFO, extended attributes and names that are not UTF-8. ``SampleImage``
records what a reader must see, so tests compare exact bytes and attributes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from lazyfs.chunk import address_of, encode
from lazyfs.index import Node, write_index
from lazyfs.refs import chunk_key, index_key
from lazyfs.store import Store

MTIME_NS = 1_700_000_000_123_456_789
FIRST_CHUNK_BYTES = 1 << 20
SECOND_CHUNK_BYTES = 300_000
UID = 1000
GID = 100

HARDLINK_DATA = b"one inode, three names\n"
SMALL_DATA = b"hello, lazyfs\n"
TOOL_DATA = b"#!/bin/sh\necho tool\n"
LATIN1_DATA = b"latin-1 name\n"
INVALID_UTF8_DATA = b"\xff\xfe name\n"
XATTR_DATA = b"file with attributes\n"
XATTRS = {b"user.comment": b"sample value", b"user.binary": bytes(range(16))}
DEVICE_RDEV = os.makedev(1, 3)

ABSOLUTE_TARGET = b"/etc/passwd"
DANGLING_TARGET = b"no/such/target"
SELF_TARGET = b"self"


def deterministic_bytes(seed: int, size: int) -> bytes:
    """Return ``size`` bytes that do not compress, the same for the same seed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += address_of(seed.to_bytes(8, "big") + counter.to_bytes(8, "big"))
        counter += 1
    return bytes(out[:size])


def put_chunk(store: Store, data: bytes) -> bytes:
    """Store one chunk object and return its address."""
    address = address_of(data)
    store.put(chunk_key(address), encode(data))
    return address


def publish_index(store: Store, root: Node, chunk_sizes: dict[bytes, int],
                  config: dict | None = None) -> str:
    """Write an index to the store and return its digest (hex)."""
    data = write_index(root, config or {"cmd": ["/bin/sh"]}, chunk_sizes)
    digest = address_of(data).hex()
    store.put(index_key(digest), data)
    return digest


def directory(children: dict[bytes, Node], mode: int = 0o755) -> Node:
    return Node(mode=stat.S_IFDIR | mode, mtime_ns=MTIME_NS, children=children)


@dataclass
class SampleImage:
    """A published sample image and what reading it must return."""

    digest: str
    # Regular file contents by path relative to the image root.
    files: dict[bytes, bytes]
    # Symlink targets by path.
    symlinks: dict[bytes, bytes]
    # Chunk addresses by name: "first" and "second" back two_chunks.bin, "packed" the small files.
    chunks: dict[str, bytes]
    directories: list[bytes] = field(default_factory=list)


def publish_sample_image(store: Store, seed: int = 1) -> SampleImage:
    """Publish the sample image described in the module docstring."""
    first = deterministic_bytes(seed, FIRST_CHUNK_BYTES)
    second = deterministic_bytes(seed + 1000, SECOND_CHUNK_BYTES)
    small_files = [SMALL_DATA, HARDLINK_DATA, TOOL_DATA, LATIN1_DATA, INVALID_UTF8_DATA, XATTR_DATA]
    packed = b"".join(small_files)
    addresses = {"first": put_chunk(store, first), "second": put_chunk(store, second),
                 "packed": put_chunk(store, packed)}
    chunk_sizes = {addresses["first"]: len(first), addresses["second"]: len(second),
                   addresses["packed"]: len(packed)}

    offsets = {}
    position = 0
    for data in small_files:
        offsets[data] = position
        position += len(data)

    def packed_file(data: bytes, mode: int = 0o644, **extra) -> Node:
        return Node(mode=stat.S_IFREG | mode, uid=UID, gid=GID, mtime_ns=MTIME_NS, size=len(data),
                    extents=[(addresses["packed"], offsets[data], len(data))], **extra)

    two_chunks = Node(mode=stat.S_IFREG | 0o644, uid=UID, gid=GID, mtime_ns=MTIME_NS,
                      size=len(first) + len(second),
                      extents=[(addresses["first"], 0, len(first)), (addresses["second"], 0, len(second))])
    hardlinked = packed_file(HARDLINK_DATA)
    root = directory({
        b"bin": directory({b"tool": packed_file(TOOL_DATA, 0o755)}),
        b"data": directory({
            b"two_chunks.bin": two_chunks,
            b"empty": Node(mode=stat.S_IFREG | 0o600, uid=UID, gid=GID, mtime_ns=MTIME_NS),
            b"small.txt": packed_file(SMALL_DATA),
            b"nested": directory({b"deeper": directory({}, mode=0o700)}),
        }),
        b"links": directory({
            b"hard1": hardlinked,
            b"hard2": hardlinked,
            b"hard3": hardlinked,
            b"absolute": _symlink(ABSOLUTE_TARGET),
            b"dangling": _symlink(DANGLING_TARGET),
            b"self": _symlink(SELF_TARGET),
        }),
        b"dev": directory({
            b"null": Node(mode=stat.S_IFCHR | 0o666, mtime_ns=MTIME_NS, rdev=DEVICE_RDEV),
            b"fifo": Node(mode=stat.S_IFIFO | 0o644, mtime_ns=MTIME_NS),
        }),
        b"names": directory({
            b"caf\xe9": packed_file(LATIN1_DATA),
            b"\xff\xfe": packed_file(INVALID_UTF8_DATA),
        }),
        b"xattrs": packed_file(XATTR_DATA, xattrs=dict(XATTRS)),
    })
    digest = publish_index(store, root, chunk_sizes)
    files = {
        b"bin/tool": TOOL_DATA,
        b"data/two_chunks.bin": first + second,
        b"data/empty": b"",
        b"data/small.txt": SMALL_DATA,
        b"links/hard1": HARDLINK_DATA,
        b"links/hard2": HARDLINK_DATA,
        b"links/hard3": HARDLINK_DATA,
        b"names/caf\xe9": LATIN1_DATA,
        b"names/\xff\xfe": INVALID_UTF8_DATA,
        b"xattrs": XATTR_DATA,
    }
    symlinks = {b"links/absolute": ABSOLUTE_TARGET, b"links/dangling": DANGLING_TARGET,
                b"links/self": SELF_TARGET}
    directories = [b"", b"bin", b"data", b"data/nested", b"data/nested/deeper", b"dev", b"links",
                   b"names"]
    return SampleImage(digest, files, symlinks, addresses, directories)


def _symlink(target: bytes) -> Node:
    return Node(mode=stat.S_IFLNK | 0o777, mtime_ns=MTIME_NS, target=target)


def publish_single_file_image(store: Store, data: bytes, chunk_bytes: int = 1 << 20,
                              name: bytes = b"file.bin", store_chunks: bool = True) -> tuple[str, list[bytes]]:
    """Publish an image with one file cut into ``chunk_bytes`` pieces; return (digest, addresses).

    With ``store_chunks=False`` the chunks are left out of the store, so reads
    of the file must fail.
    """
    extents = []
    chunk_sizes = {}
    addresses = []
    for offset in range(0, len(data), chunk_bytes):
        piece = data[offset:offset + chunk_bytes]
        address = address_of(piece)
        if store_chunks:
            store.put(chunk_key(address), encode(piece))
        extents.append((address, 0, len(piece)))
        chunk_sizes[address] = len(piece)
        addresses.append(address)
    node = Node(mode=stat.S_IFREG | 0o644, mtime_ns=MTIME_NS, size=len(data), extents=extents)
    return publish_index(store, directory({name: node}), chunk_sizes), addresses
