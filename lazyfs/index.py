"""The image index: one flattened image as a compact, deterministic binary object.

Stored object (the index digest is the SHA-256 of these exact bytes)::

    magic   4 bytes  b"LZIX"
    version u16      FORMAT_VERSION
    flags   u16      0
    body    one zstd frame (with content size) holding the body below; bytes
            after it are ignored

Body, all integers little-endian, sections back to back in this order::

    header   7 x u32: inode_count, dirent_count, extent_count, chunk_count,
                      xattr_count, strings_bytes, config_bytes
    config   UTF-8 JSON (sorted keys, no spaces): image config and source digests
    chunks   chunk_count x (sha256 32 bytes, uncompressed length u32)
    inodes   inode_count x 60 bytes, see INODE below
    dirents  dirent_count x (name offset u32, name length u32, inode u32)
    extents  extent_count x (file offset u64, chunk u32, chunk offset u32, length u32)
    xattrs   xattr_count x (name offset u32, name length u32,
                            value offset u32, value length u32)
    strings  names, symlink targets, xattr names and values (raw bytes)

An inode record is (mode, uid, gid, nlink, mtime_ns i64, size u64, rdev u64,
first, count, parent, xattr_first, xattr_count), where ``first``/``count`` are
a directory's dirent range, a regular file's extent range, or a symlink's
target as a strings offset and length. Inode 0 is the image root; a
directory's parent is itself for the root. Inodes are numbered breadth-first
with each directory's entries in byte order of their names, a hardlinked
inode at its first name. A directory's dirents are contiguous and sorted by
name bytes, so a lookup is a binary search. A file's extents are contiguous,
ordered by file offset and cover the file exactly; empty files have none.

The reader keeps the decompressed body and decodes records on demand, so a
loaded index costs about 60 bytes per inode plus its names.
"""

from __future__ import annotations

import hashlib
import json
import operator
import stat
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import zstandard

from .chunk import MAX_CHUNK_BYTES
from .errors import IndexFormatError

MAGIC = b"LZIX"
FORMAT_VERSION = 1
# Linux's PATH_MAX less its NUL: no symlink target can be longer, and the
# indexer rejects a layer with one.
MAX_SYMLINK_TARGET_BYTES = 4095
MAX_FILE_SIZE = (1 << 63) - 1
_FILE_TYPES = frozenset((stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                         stat.S_IFIFO, stat.S_IFSOCK))
# About 60 bytes per inode plus names: room for several million files. A body
# that declares more is rejected before it is decompressed.
MAX_BODY_BYTES = 1 << 28

_PREAMBLE = struct.Struct("<4sHH")
_HEADER = struct.Struct("<7I")
_CHUNK = struct.Struct("<32sI")
INODE = struct.Struct("<IIIIqQQIIIII")
_DIRENT = struct.Struct("<III")
_EXTENT = struct.Struct("<QIII")
_XATTR = struct.Struct("<IIII")


class Inode(NamedTuple):
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime_ns: int
    size: int
    rdev: int
    first: int
    count: int
    parent: int
    xattr_first: int
    xattr_count: int


class Extent(NamedTuple):
    file_offset: int
    chunk: int
    chunk_offset: int
    length: int


# ---------------------------------------------------------------------------
# Writer


@dataclass(eq=False)
class Node:
    """One inode of the tree handed to ``write_index``.

    A hardlinked file is one Node placed under several names. ``extents`` lists
    (chunk address, offset in chunk, length) in file order.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: bytes = b""
    extents: list[tuple[bytes, int, int]] = field(default_factory=list)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, "Node"] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _number_inodes(root: Node) -> tuple[list[Node], dict[int, int], list[int]]:
    """Number inodes breadth-first; return nodes, id(node) -> inode, parents."""
    nodes = [root]
    numbers = {id(root): 0}
    parents = [0]
    queue = deque([root])
    while queue:
        directory = queue.popleft()
        for name in sorted(directory.children):
            child = directory.children[name]
            if id(child) in numbers:
                if child.is_dir:
                    raise ValueError(f"directory {name!r} appears under two names")
                continue
            numbers[id(child)] = len(nodes)
            nodes.append(child)
            parents.append(numbers[id(directory)])
            if child.is_dir:
                queue.append(child)
    return nodes, numbers, parents


def _link_counts(nodes: list[Node], numbers: dict[int, int]) -> list[int]:
    counts = [0] * len(nodes)
    counts[0] = 2
    for node in nodes:
        if not node.is_dir:
            continue
        for child in node.children.values():
            number = numbers[id(child)]
            if child.is_dir:
                counts[number] += 2
                counts[numbers[id(node)]] += 1
            else:
                counts[number] += 1
    return counts


class _Strings:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def add(self, value: bytes) -> tuple[int, int]:
        offset = len(self.buffer)
        self.buffer += value
        return offset, len(value)


def encode_config(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_index(root: Node, config: dict, chunk_sizes: dict[bytes, int], level: int = 9) -> bytes:
    """Serialise a flattened tree into index bytes (deterministic for equal input).

    ``chunk_sizes`` maps every chunk address used by an extent to its
    uncompressed length.
    """
    if not root.is_dir:
        raise ValueError("the index root must be a directory")
    nodes, numbers, parents = _number_inodes(root)
    nlinks = _link_counts(nodes, numbers)
    strings = _Strings()
    chunk_numbers: dict[bytes, int] = {}
    chunks = bytearray()
    inodes = bytearray()
    dirents = bytearray()
    extents = bytearray()
    xattrs = bytearray()
    dirent_count = extent_count = xattr_count = 0

    for number, node in enumerate(nodes):
        first = count = 0
        if node.is_dir:
            first = dirent_count
            for name in sorted(node.children):
                offset, length = strings.add(name)
                dirents += _DIRENT.pack(offset, length, numbers[id(node.children[name])])
                dirent_count += 1
            count = dirent_count - first
        elif stat.S_ISREG(node.mode):
            first = extent_count
            file_offset = 0
            for address, chunk_offset, length in node.extents:
                if length <= 0:
                    raise ValueError("extents must not be empty")
                if address not in chunk_numbers:
                    chunk_numbers[address] = len(chunk_numbers)
                    chunks += _CHUNK.pack(address, chunk_sizes[address])
                extents += _EXTENT.pack(file_offset, chunk_numbers[address], chunk_offset, length)
                file_offset += length
                extent_count += 1
            if file_offset != node.size:
                raise ValueError(f"extents cover {file_offset} bytes of a {node.size}-byte file")
            count = extent_count - first
        elif stat.S_ISLNK(node.mode):
            first, count = strings.add(node.target)

        xattr_first = xattr_count
        for name in sorted(node.xattrs):
            name_offset, name_length = strings.add(name)
            value_offset, value_length = strings.add(node.xattrs[name])
            xattrs += _XATTR.pack(name_offset, name_length, value_offset, value_length)
            xattr_count += 1

        size = 0
        if stat.S_ISLNK(node.mode):
            size = len(node.target)
        elif stat.S_ISREG(node.mode):
            size = node.size
        inodes += INODE.pack(node.mode, node.uid, node.gid, nlinks[number], node.mtime_ns, size,
                             node.rdev, first, count, parents[number], xattr_first,
                             xattr_count - xattr_first)

    config_bytes = encode_config(config)
    body = b"".join((
        _HEADER.pack(len(nodes), dirent_count, extent_count, len(chunk_numbers), xattr_count,
                     len(strings.buffer), len(config_bytes)),
        config_bytes, chunks, inodes, dirents, extents, xattrs, strings.buffer,
    ))
    compressed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0) + compressed


# ---------------------------------------------------------------------------
# Reader


class Index:
    """A loaded index; records are decoded from the body on each call."""

    def __init__(self, data: bytes, digest: str | None = None):
        """Parse index bytes; with ``digest`` (hex), verify them against it first."""
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise IndexFormatError(f"index {digest}: SHA-256 of the bytes does not match the digest")
        self.digest = digest or hashlib.sha256(data).hexdigest()
        if len(data) < _PREAMBLE.size:
            raise IndexFormatError(f"index {self.digest}: truncated ({len(data)} bytes)")
        magic, version, _flags = _PREAMBLE.unpack_from(data)
        if magic != MAGIC:
            raise IndexFormatError(f"index {self.digest}: not a lazyfs index (bad magic)")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"index {self.digest}: format version {version} is not supported (this lazyfs reads {FORMAT_VERSION})")
        try:
            frame = zstandard.get_frame_parameters(data[_PREAMBLE.size:])
            if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN or frame.content_size > MAX_BODY_BYTES:
                raise IndexFormatError(
                    f"index {self.digest}: body declares no size or more than {MAX_BODY_BYTES} bytes")
            body = zstandard.ZstdDecompressor().decompress(
                data[_PREAMBLE.size:], max_output_size=frame.content_size)
        except zstandard.ZstdError as exc:
            raise IndexFormatError(f"index {self.digest}: body does not decompress: {exc}") from None
        self._parse(body)

    def _parse(self, body: bytes) -> None:
        if len(body) < _HEADER.size:
            raise IndexFormatError(f"index {self.digest}: truncated header")
        (self.inode_count, self.dirent_count, self.extent_count, self.chunk_count,
         self.xattr_count, strings_bytes, config_bytes) = _HEADER.unpack_from(body)
        sizes = [config_bytes, self.chunk_count * _CHUNK.size, self.inode_count * INODE.size,
                 self.dirent_count * _DIRENT.size, self.extent_count * _EXTENT.size,
                 self.xattr_count * _XATTR.size, strings_bytes]
        if _HEADER.size + sum(sizes) != len(body) or self.inode_count == 0:
            raise IndexFormatError(f"index {self.digest}: section sizes do not match the body length")
        view = memoryview(body)
        offset = _HEADER.size
        sections = []
        for size in sizes:
            sections.append(view[offset:offset + size])
            offset += size
        (self._config, self._chunks, self._inodes, self._dirents, self._extents,
         self._xattrs, self._strings) = sections
        self._body = body
        if not stat.S_ISDIR(self.inode(0).mode):
            raise IndexFormatError(f"index {self.digest}: root is not a directory")
        try:
            config = json.loads(bytes(self._config))
        except (ValueError, RecursionError) as exc:
            raise IndexFormatError(f"index {self.digest}: the image config is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise IndexFormatError(f"index {self.digest}: the image config is not a JSON object")
        self._config_cache: dict = config
        # Bytes of all regular files, which the check adds up on its way.
        self.file_bytes = _check_records(self, strings_bytes)

    @property
    def config(self) -> dict:
        return self._config_cache

    def inode(self, number: int) -> Inode:
        return Inode._make(INODE.unpack_from(self._inodes, number * INODE.size))

    def inodes(self) -> Iterator[Inode]:
        """Yield every inode record in inode-number order."""
        for fields in INODE.iter_unpack(self._inodes):
            yield Inode._make(fields)

    def chunk(self, number: int) -> tuple[bytes, int]:
        """Return (address, uncompressed length) of a chunk table entry."""
        address, length = _CHUNK.unpack_from(self._chunks, number * _CHUNK.size)
        return address, length

    def _string(self, offset: int, length: int) -> bytes:
        return bytes(self._strings[offset:offset + length])

    def dirent(self, number: int) -> tuple[bytes, int]:
        name_offset, name_length, inode = _DIRENT.unpack_from(self._dirents, number * _DIRENT.size)
        return self._string(name_offset, name_length), inode

    def lookup(self, directory: int, name: bytes) -> int | None:
        """Return the inode of ``name`` in a directory inode, or None."""
        record = self.inode(directory)
        low, high = record.first, record.first + record.count
        while low < high:
            middle = (low + high) // 2
            name_offset, name_length, inode = _DIRENT.unpack_from(self._dirents, middle * _DIRENT.size)
            candidate = self._strings[name_offset:name_offset + name_length]
            if candidate == name:
                return inode
            if bytes(candidate) < name:
                low = middle + 1
            else:
                high = middle
        return None

    def entries(self, directory: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """Yield (position, name, inode) for a directory's entries from ``start`` on."""
        record = self.inode(directory)
        for position in range(start, record.count):
            name, inode = self.dirent(record.first + position)
            yield position, name, inode

    def readlink(self, number: int) -> bytes:
        record = self.inode(number)
        if not stat.S_ISLNK(record.mode):
            raise ValueError(f"inode {number} is not a symlink")
        return self._string(record.first, record.count)

    def xattrs(self, number: int) -> dict[bytes, bytes]:
        record = self.inode(number)
        result = {}
        for position in range(record.xattr_first, record.xattr_first + record.xattr_count):
            name_offset, name_length, value_offset, value_length = _XATTR.unpack_from(
                self._xattrs, position * _XATTR.size)
            result[self._string(name_offset, name_length)] = self._string(value_offset, value_length)
        return result

    def extent(self, number: int) -> Extent:
        return Extent._make(_EXTENT.unpack_from(self._extents, number * _EXTENT.size))

    def extents(self, number: int, offset: int = 0, size: int | None = None) -> list[Extent]:
        """Return the extents of a regular file that overlap [offset, offset + size)."""
        record = self.inode(number)
        if not stat.S_ISREG(record.mode):
            raise ValueError(f"inode {number} is not a regular file")
        end = record.size if size is None else min(record.size, offset + size)
        if offset >= end:
            return []
        low, high = record.first, record.first + record.count
        # Find the last extent that starts at or before ``offset``.
        while high - low > 1:
            middle = (low + high) // 2
            if self.extent(middle).file_offset <= offset:
                low = middle
            else:
                high = middle
        result = []
        position = low
        while position < record.first + record.count:
            extent = self.extent(position)
            if extent.file_offset >= end:
                break
            result.append(extent)
            position += 1
        return result

    def walk(self) -> Iterator[tuple[bytes, int]]:
        """Yield (path, inode) for every entry, root first as b"", depth-first."""
        stack = [(b"", 0)]
        while stack:
            path, number = stack.pop()
            yield path, number
            if stat.S_ISDIR(self.inode(number).mode):
                children = [(path + b"/" + name if path else name, inode)
                            for _position, name, inode in self.entries(number)]
                stack.extend(reversed(children))



def _check_records(index: Index, strings_bytes: int) -> int:
    """Return the bytes of all regular files; raise IndexFormatError unless every record is sound.

    The digest proves only that these are the bytes a ref names, not that
    lazyfs-index wrote them. Anyone who can write to the store could publish
    an index whose records point outside their tables, form a directory
    cycle, or give a file extents that do not cover it. The check runs once
    per load, with the per-record work in C where ``map`` and ``max`` allow,
    so that the daemon never serves such an image.
    """
    def fail(problem: str) -> None:
        raise IndexFormatError(f"index {index.digest}: {problem}")

    if sys.byteorder != "little":
        # TODO: the word views below read the little-endian tables in host order.
        raise IndexFormatError(f"index {index.digest}: checking indexes needs a little-endian host")
    chunk_lengths = [length for _address, length in _CHUNK.iter_unpack(index._chunks)]
    if chunk_lengths and not 0 < min(chunk_lengths) <= max(chunk_lengths) <= MAX_CHUNK_BYTES:
        fail(f"a chunk length is 0 or more than {MAX_CHUNK_BYTES}")
    xattrs = list(_XATTR.iter_unpack(index._xattrs))
    if xattrs and max(max(name_offset + name_length, value_offset + value_length)
                      for name_offset, name_length, value_offset, value_length in xattrs) > strings_bytes:
        fail("an xattr lies outside the strings section")

    # The inode table as 32-bit words, 15 per record, so that each field is a
    # strided view that max() and map() read without building tuples.
    words = index._inodes.cast("I")
    inode_count = len(words) // 15
    modes, sizes_high = words[0::15], words[7::15]
    firsts, counts, parents, xattr_firsts, xattr_counts = (words[field::15] for field in range(10, 15))
    kinds = [mode & 0o170000 for mode in modes]
    if not _FILE_TYPES.issuperset(kinds):
        fail("an inode has no valid file type")
    if max(parents) >= inode_count or max(sizes_high) > MAX_FILE_SIZE >> 32 \
            or max(map(operator.add, xattr_firsts, xattr_counts)) > len(xattrs):
        fail("an inode has a parent, size or xattr range out of range")
    sizes = [low | high << 32 for low, high in zip(words[6::15], sizes_high)]
    directories = [number for number, kind in enumerate(kinds) if kind == stat.S_IFDIR]
    files = [number for number, kind in enumerate(kinds) if kind == stat.S_IFREG]
    _check_directories(index, fail, directories, kinds, firsts, counts, parents, strings_bytes)
    _check_files(index, fail, files, firsts, counts, sizes, chunk_lengths)
    for number in (number for number, kind in enumerate(kinds) if kind == stat.S_IFLNK):
        if firsts[number] + counts[number] > strings_bytes or counts[number] > MAX_SYMLINK_TARGET_BYTES:
            fail(f"symlink inode {number} has a target out of range or over {MAX_SYMLINK_TARGET_BYTES} bytes")
    return sum(map(sizes.__getitem__, files))


def _check_directories(index: Index, fail: Callable[[str], None], directories: list[int], kinds: list[int],
                       firsts: tuple, counts: tuple, parents: tuple, strings_bytes: int) -> None:
    """Check every directory's entries: in range, valid unique sorted names, and a tree without cycles."""
    dirents = list(_DIRENT.iter_unpack(index._dirents))
    strings = bytes(index._strings)
    directory_children: list[int] = []
    for number in directories:
        first, count = firsts[number], counts[number]
        if first + count > len(dirents):
            fail(f"directory inode {number} has entries past the dirent table")
        entries = dirents[first:first + count]
        if not entries:
            continue
        offsets, lengths, children = zip(*entries)
        if max(map(operator.add, offsets, lengths)) > strings_bytes or max(children) >= len(kinds):
            fail(f"directory inode {number} has an entry out of range")
        names = [strings[offset:offset + length] for offset, length, _child in entries]
        if not all(map(operator.lt, names, names[1:])):
            fail(f"directory inode {number} has names out of order or twice")
        joined = b"\x01".join(names)
        if b"" in names or b"." in names or b".." in names or b"/" in joined or b"\0" in joined:
            fail(f"directory inode {number} has an empty name, . or .., or a name with / or NUL")
        for child in [child for child in children if kinds[child] == stat.S_IFDIR]:
            # Inodes are numbered breadth-first, so a child directory comes after
            # its parent: with one parent each, there is no cycle.
            if child <= number or parents[child] != number:
                fail(f"directory inode {child} is not a proper child of inode {number}")
            directory_children.append(child)
    if len(set(directory_children)) != len(directory_children):
        fail("a directory has more than one name")


def _check_files(index: Index, fail: Callable[[str], None], files: list[int], firsts: tuple,
                 counts: tuple, sizes: tuple, chunk_lengths: list[int]) -> None:
    """Check that each regular file's extents cover it exactly, in order, inside their chunks."""
    extents = list(_EXTENT.iter_unpack(index._extents))
    extent_count = len(extents)
    chunk_count = len(chunk_lengths)
    for number in files:
        first, count = firsts[number], counts[number]
        if first + count > extent_count:
            fail(f"file inode {number} has extents past the extent table")
        if count == 1:
            # A file of up to one chunk has one extent: the quick path.
            file_offset, chunk, chunk_offset, length = extents[first]
            if file_offset == 0 and length == sizes[number] and length and chunk < chunk_count \
                    and chunk_offset + length <= chunk_lengths[chunk]:
                continue
        position = 0
        for file_offset, chunk, chunk_offset, length in extents[first:first + count]:
            if file_offset != position or length == 0 or chunk >= len(chunk_lengths) \
                    or chunk_offset + length > chunk_lengths[chunk]:
                fail(f"file inode {number} has an extent that leaves a gap, overlaps or lies outside its chunk")
            position += length
        if position != sizes[number]:
            fail(f"the extents of file inode {number} cover {position} bytes, not its size {sizes[number]}")
