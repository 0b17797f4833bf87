"""Crafted indexes: valid digests over bodies that lie, loaded in process and through a mount.

Each case starts from the sample image's index and changes one field of its
body. The body goes into a new zstd frame, published under the SHA-256 of the
new bytes, so the digest check passes and only the body's structure is wrong. An index that lies must fail to load with IndexFormatError naming
its digest, which the mount returns as EIO on the lookup of its name.

Frames are written by hand (one frame header, raw blocks), so a case can
declare any content size, whatever the body holds.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from lazyfs.chunk import address_of
from lazyfs.control_client import ControlClient
from lazyfs.errors import ControlError, IndexFormatError
from lazyfs.index import INODE, MAX_BODY_BYTES, Index, Inode
from lazyfs.refs import index_key
from lazyfs.store import FileStore
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.sample_image import SampleImage, publish_sample_image

_PREAMBLE = struct.pack("<4sHH", b"LZIX", 1, 0)
_HEADER = struct.Struct("<7I")
_HEADER_FIELDS = ("inode_count", "dirent_count", "extent_count", "chunk_count", "xattr_count",
                  "strings_bytes", "config_bytes")
_CHUNK_BYTES = 36
_DIRENT = struct.Struct("<III")
_EXTENT = struct.Struct("<QIII")
_EXTENT_FIELDS = ("file_offset", "chunk", "chunk_offset", "length")
_XATTR = struct.Struct("<IIII")
_XATTR_FIELDS = ("name_offset", "name_length", "value_offset", "value_length")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW_BLOCK_MAX = 128 << 10

# Inodes and dirents of the sample image (see tests/support/sample_image.py),
# numbered breadth-first with each directory's entries in name order.
ROOT, BIN, DATA, XATTRS_FILE, TOOL, NESTED, ABSOLUTE_LINK = 0, 1, 2, 6, 7, 9, 14
DIRENT_BIN, DIRENT_DATA, DIRENT_DEV, DIRENT_TOOL, DIRENT_DEEPER = 0, 1, 2, 6, 21
EXTENT_TOOL, EXTENT_SECOND_CHUNK = 1, 4

CALL_TIMEOUT_S = 20.0
# The daemon's RSS was 32 to 41 MiB while it served the sample image beside
# every crafted one, so 400 MiB leaves room for slow machines.
DAEMON_RSS_BYTES = 400 << 20


def _field_offset(fmt: str, fields: tuple[str, ...], name: str) -> tuple[int, str]:
    position = fields.index(name)
    return struct.calcsize("<" + fmt[1:position + 1]), "<" + fmt[position + 1]


def zstd_frame(content: bytes, declared_size: int | None) -> bytes:
    """Build one zstd frame of raw blocks that holds ``content`` and declares ``declared_size``.

    A ``declared_size`` of None leaves the content size out of the frame header.
    """
    if declared_size is None:
        # Frame content size absent, window descriptor 2**27 bytes.
        header = bytes([0x00, (17 - 10) << 3])
    else:
        # Single segment, an 8-byte frame content size.
        header = bytes([0xE0]) + struct.pack("<Q", declared_size)
    blocks = bytearray()
    pieces = [content[offset:offset + _RAW_BLOCK_MAX] for offset in range(0, len(content), _RAW_BLOCK_MAX)]
    pieces = pieces or [b""]
    for number, piece in enumerate(pieces):
        last = 1 if number == len(pieces) - 1 else 0
        blocks += ((len(piece) << 3) | last).to_bytes(3, "little") + piece
    return _ZSTD_MAGIC + header + bytes(blocks)


class Crafted:
    """An index body, decoded from a valid index, with setters for each record's fields."""

    def __init__(self, data: bytes):
        self.body = bytearray(zstandard.ZstdDecompressor().decompress(data[len(_PREAMBLE):]))
        self.declared_size: int | None = None
        self.trailer = b""

    def header(self, name: str) -> int:
        return _HEADER.unpack_from(self.body)[_HEADER_FIELDS.index(name)]

    def set_header(self, name: str, value: int) -> None:
        struct.pack_into("<I", self.body, 4 * _HEADER_FIELDS.index(name), value)

    def _section(self, name: str) -> int:
        sizes = {"config": self.header("config_bytes"),
                 "chunks": self.header("chunk_count") * _CHUNK_BYTES,
                 "inodes": self.header("inode_count") * INODE.size,
                 "dirents": self.header("dirent_count") * _DIRENT.size,
                 "extents": self.header("extent_count") * _EXTENT.size,
                 "xattrs": self.header("xattr_count") * _XATTR.size}
        offset = _HEADER.size
        for section, size in sizes.items():
            if section == name:
                return offset
            offset += size
        return offset

    def set_inode(self, number: int, name: str, value: int) -> None:
        offset, fmt = _field_offset(INODE.format, Inode._fields, name)
        struct.pack_into(fmt, self.body, self._section("inodes") + number * INODE.size + offset, value)

    def inode(self, number: int) -> Inode:
        return Inode._make(INODE.unpack_from(self.body, self._section("inodes") + number * INODE.size))

    def dirent(self, number: int) -> tuple[int, int, int]:
        return _DIRENT.unpack_from(self.body, self._section("dirents") + number * _DIRENT.size)

    def set_dirent(self, number: int, name_offset: int, name_length: int, inode: int) -> None:
        _DIRENT.pack_into(self.body, self._section("dirents") + number * _DIRENT.size,
                          name_offset, name_length, inode)

    def set_dirent_inode(self, number: int, inode: int) -> None:
        name_offset, name_length, _inode = self.dirent(number)
        self.set_dirent(number, name_offset, name_length, inode)

    def set_dirent_name(self, number: int, name: bytes) -> None:
        """Overwrite a dirent's name in place with a name no longer than the old one."""
        name_offset, name_length, inode = self.dirent(number)
        assert len(name) <= name_length
        start = self._section("strings") + name_offset
        self.body[start:start + len(name)] = name
        self.set_dirent(number, name_offset, len(name), inode)

    def set_extent(self, number: int, name: str, value: int) -> None:
        offset, fmt = _field_offset(_EXTENT.format, _EXTENT_FIELDS, name)
        struct.pack_into(fmt, self.body, self._section("extents") + number * _EXTENT.size + offset, value)

    def set_chunk_length(self, number: int, value: int) -> None:
        struct.pack_into("<I", self.body, self._section("chunks") + number * _CHUNK_BYTES + 32, value)

    def set_xattr(self, number: int, name: str, value: int) -> None:
        offset, fmt = _field_offset(_XATTR.format, _XATTR_FIELDS, name)
        struct.pack_into(fmt, self.body, self._section("xattrs") + number * _XATTR.size + offset, value)

    def append_string(self, value: bytes) -> int:
        """Append bytes to the strings section and return their offset in it."""
        offset = self.header("strings_bytes")
        self.body += value
        self.set_header("strings_bytes", offset + len(value))
        return offset

    def encode(self) -> bytes:
        declared = len(self.body) if self.declared_size is None else self.declared_size
        if self.declared_size == -1:
            declared = None
        return _PREAMBLE + zstd_frame(bytes(self.body), declared) + self.trailer


def _swap_dirents(body: Crafted, first: int, second: int) -> None:
    first_entry, second_entry = body.dirent(first), body.dirent(second)
    body.set_dirent(first, *second_entry)
    body.set_dirent(second, *first_entry)


def _symlink_target_megabytes(body: Crafted) -> None:
    target = b"a/" * (1 << 20)
    offset = body.append_string(target)
    body.set_inode(ABSOLUTE_LINK, "first", offset)
    body.set_inode(ABSOLUTE_LINK, "count", len(target))
    body.set_inode(ABSOLUTE_LINK, "size", len(target))


def _symlink_target_past_strings(body: Crafted) -> None:
    body.set_inode(ABSOLUTE_LINK, "first", body.header("strings_bytes") - 2)


def _xattr_value_past_strings(body: Crafted) -> None:
    body.set_xattr(0, "value_offset", body.header("strings_bytes") + 10)


def _config_json_string(body: Crafted) -> None:
    length = body.header("config_bytes")
    body.body[_HEADER.size:_HEADER.size + length] = b'"' + b"a" * (length - 2) + b'"'


def _config_not_json(body: Crafted) -> None:
    body.body[_HEADER.size] = 0xFF


def _duplicate_name(body: Crafted) -> None:
    name_offset, name_length, _inode = body.dirent(DIRENT_BIN)
    body.set_dirent(DIRENT_DATA, name_offset, name_length, DATA)


# Index.__init__ accepts each of these today; each must raise IndexFormatError.
LYING_BODIES: dict[str, Callable[[Crafted], None]] = {
    "dirent_inode_past_inode_table": lambda body: body.set_dirent_inode(DIRENT_BIN, body.header("inode_count")),
    "dirent_inode_2_pow_32_minus_1": lambda body: body.set_dirent_inode(DIRENT_BIN, 2**32 - 1),
    "parent_past_inode_table": lambda body: body.set_inode(BIN, "parent", 500),
    "directory_is_own_parent": lambda body: body.set_inode(DATA, "parent", DATA),
    "directory_entry_is_ancestor": lambda body: body.set_dirent_inode(DIRENT_DEEPER, DATA),
    "directory_entry_is_itself": lambda body: body.set_dirent_inode(DIRENT_DEEPER, NESTED),
    "file_entry_is_root": lambda body: body.set_dirent_inode(DIRENT_TOOL, ROOT),
    "directory_under_two_names": lambda body: body.set_dirent_inode(DIRENT_DEV, BIN),
    "directory_dirents_past_table": lambda body: body.set_inode(ROOT, "count", 1000),
    "directory_first_2_pow_32_minus_1": lambda body: body.set_inode(BIN, "first", 2**32 - 1),
    "names_not_sorted": lambda body: _swap_dirents(body, DIRENT_BIN, DIRENT_DATA),
    "duplicate_name": _duplicate_name,
    "name_with_slash": lambda body: body.set_dirent_name(DIRENT_DATA, b"d/ta"),
    "name_with_nul": lambda body: body.set_dirent_name(DIRENT_DATA, b"d\0ta"),
    "name_empty": lambda body: body.set_dirent_name(DIRENT_BIN, b""),
    "name_dot": lambda body: body.set_dirent_name(DIRENT_BIN, b"."),
    "name_dot_dot": lambda body: body.set_dirent_name(DIRENT_BIN, b".."),
    "name_past_strings": lambda body: body.set_dirent(DIRENT_BIN, body.header("strings_bytes"), 3, BIN),
    "file_extents_past_table": lambda body: body.set_inode(TOOL, "count", 100),
    "extent_chunk_past_table": lambda body: body.set_extent(EXTENT_TOOL, "chunk", 3),
    "extent_overruns_chunk": lambda body: body.set_extent(EXTENT_TOOL, "chunk_offset", 90),
    "extents_leave_gap": lambda body: body.set_extent(EXTENT_SECOND_CHUNK, "file_offset", (1 << 20) + 1),
    "extents_overlap": lambda body: body.set_extent(EXTENT_SECOND_CHUNK, "file_offset", 0),
    "extents_shorter_than_size": lambda body: body.set_inode(TOOL, "size", 21),
    "chunk_length_0": lambda body: body.set_chunk_length(2, 0),
    "chunk_length_4_gib": lambda body: body.set_chunk_length(1, 2**32 - 1),
    "file_size_2_pow_64_minus_1": lambda body: body.set_inode(TOOL, "size", 2**64 - 1),
    "mode_without_file_type": lambda body: body.set_inode(TOOL, "mode", 0o644),
    "mode_of_unknown_type": lambda body: body.set_inode(TOOL, "mode", 0o170644),
    "symlink_target_past_strings": _symlink_target_past_strings,
    "symlink_target_2_mib": _symlink_target_megabytes,
    "xattrs_past_table": lambda body: body.set_inode(XATTRS_FILE, "xattr_count", 50),
    "xattr_value_past_strings": _xattr_value_past_strings,
    "config_not_json": _config_not_json,
    "config_json_string": _config_json_string,
}


def _set_declared_size(body: Crafted, size: int | None) -> None:
    body.declared_size = -1 if size is None else size


# Index.__init__ rejects each of these today.
REJECTED_BODIES: dict[str, Callable[[Crafted], None]] = {
    "inode_count_past_body": lambda body: body.set_header("inode_count", body.header("inode_count") + 1),
    "dirent_count_2_pow_32_minus_1": lambda body: body.set_header("dirent_count", 2**32 - 1),
    "strings_bytes_2_pow_32_minus_1": lambda body: body.set_header("strings_bytes", 2**32 - 1),
    "inode_count_0": lambda body: body.set_header("inode_count", 0),
    "root_not_directory": lambda body: body.set_inode(ROOT, "mode", stat.S_IFREG | 0o644),
    "frame_without_content_size": lambda body: _set_declared_size(body, None),
    "body_expands_past_declared_size": lambda body: _set_declared_size(body, len(body.body) - 100),
    "body_shorter_than_declared_size": lambda body: _set_declared_size(body, len(body.body) + 100),
    "declared_size_past_maximum": lambda body: _set_declared_size(body, MAX_BODY_BYTES + 1),
    "declared_size_2_pow_64_minus_2": lambda body: _set_declared_size(body, 2**64 - 2),
}


def craft(store: FileStore, valid: bytes, change: Callable[[Crafted], None]) -> tuple[str, bytes]:
    """Publish the valid index with one change and return its (digest, bytes)."""
    body = Crafted(valid)
    change(body)
    data = body.encode()
    digest = address_of(data).hex()
    store.put(index_key(digest), data)
    return digest, data


class Published:
    """The module's store: one good sample image and the bytes of its index."""

    def __init__(self, store: FileStore):
        self.store = store
        self.sample: SampleImage = publish_sample_image(store, seed=1)
        self.valid = store.get(index_key(self.sample.digest))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return Published(FileStore(tmp_path_factory.mktemp("store")))


# ---------------------------------------------------------------------------
# In process


def test_crafted_body_unchanged_loads(published: Published):
    digest, data = craft(published.store, published.valid, lambda body: None)
    index = Index(data, digest)

    assert [path for path, _inode in index.walk()] == [path for path, _inode in
                                                       Index(published.valid).walk()]


@pytest.mark.parametrize("case", sorted(REJECTED_BODIES))
def test_index_rejects_bad_body(published: Published, case: str):
    digest, data = craft(published.store, published.valid, REJECTED_BODIES[case])

    with pytest.raises(IndexFormatError) as caught:
        Index(data, digest)

    assert digest in str(caught.value)


@pytest.mark.parametrize("case", sorted(LYING_BODIES))
def test_index_rejects_lying_body(published: Published, case: str):
    digest, data = craft(published.store, published.valid, LYING_BODIES[case])

    with pytest.raises(IndexFormatError) as caught:
        Index(data, digest)

    assert digest in str(caught.value)


def test_index_walk_of_cycle_ends(published: Published):
    digest, data = craft(published.store, published.valid, LYING_BODIES["directory_entry_is_ancestor"])
    try:
        index = Index(data, digest)
    except IndexFormatError:
        return
    paths = []
    for path, _inode in index.walk():
        paths.append(path)
        if len(paths) > 1000:
            break

    assert len(paths) <= 1000, f"walk of a directory cycle yielded {paths[-1][:80]!r} and more"


# ---------------------------------------------------------------------------
# Through a mount


@pytest.fixture(scope="module")
def daemon(published: Published, tmp_path_factory: pytest.TempPathFactory):
    with running_daemon(directory=tmp_path_factory.mktemp("daemon"), store_url=published.store.url) as process:
        yield process


def call_with_timeout(function: Callable, *args):
    """Run a call in a thread and return its result, raise its error, or time out after CALL_TIMEOUT_S."""
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        future = executor.submit(function, *args)
        return future.result(timeout=CALL_TIMEOUT_S)
    finally:
        # A call that hangs in the kernel leaves its thread behind instead of blocking the test.
        executor.shutdown(wait=False)


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def daemon_rss_bytes(daemon: DaemonProcess) -> int:
    for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{daemon.pid}/status")


def assert_daemon_healthy(daemon: DaemonProcess, published: Published) -> None:
    assert daemon.process.poll() is None, daemon.log_text()[-4000:]
    good = daemon.image(published.sample.digest) / "data" / "two_chunks.bin"
    assert call_with_timeout(read_file, good) == published.sample.files[b"data/two_chunks.bin"]
    assert daemon_rss_bytes(daemon) < DAEMON_RSS_BYTES


def explore(root: Path, limit: int = 200) -> list[str]:
    """Call every read-only operation on up to ``limit`` entries below ``root`` and return the errors."""
    errors = []
    pending = [root]
    seen = 0
    while pending and seen < limit:
        path = pending.pop()
        seen += 1
        try:
            info = os.lstat(path)
            os.listxattr(path, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if len(path.parts) - len(root.parts) < 8:
                    pending.extend(path / name for name in os.listdir(path))
            elif stat.S_ISLNK(info.st_mode):
                os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    f.read(1 << 16)
        except OSError as exc:
            errors.append(f"{path.name}: {errno.errorcode.get(exc.errno, exc.errno)}")
    return errors


@pytest.mark.fuse
@pytest.mark.parametrize("case", sorted(REJECTED_BODIES))
def test_mount_rejected_index_eio(daemon: DaemonProcess, published: Published, case: str):
    digest, _data = craft(published.store, published.valid, REJECTED_BODIES[case])
    assert_daemon_healthy(daemon, published)

    for _attempt in range(2):
        with pytest.raises(OSError) as caught:
            call_with_timeout(os.lstat, daemon.image(digest))
        assert caught.value.errno == errno.EIO

    error_lines = [line for line in daemon.log_text().splitlines() if digest in line and "ERROR" in line]
    assert len(error_lines) == 1, error_lines
    assert_daemon_healthy(daemon, published)


@pytest.mark.fuse
def test_mount_survives_lying_indexes(daemon: DaemonProcess, published: Published):
    """Every read-only operation on every lying image returns within the time limit."""
    for case in sorted(LYING_BODIES):
        digest, _data = craft(published.store, published.valid, LYING_BODIES[case])
        call_with_timeout(explore, daemon.image(digest))
        assert_daemon_healthy(daemon, published)


@pytest.mark.fuse
def test_mount_inode_past_table_stays_in_image(daemon: DaemonProcess, published: Published):
    """An entry whose inode lies past its index's table must not show another image's file."""
    def point_past_table(body: Crafted) -> None:
        # The xattrs file of the image whose inode range comes right after this one's.
        body.set_dirent_inode(DIRENT_BIN, body.header("inode_count") + XATTRS_FILE)

    digest, _data = craft(published.store, published.valid, point_past_table)
    bad_root = daemon.image(digest)
    try:
        call_with_timeout(os.lstat, bad_root)
    except OSError as exc:
        assert exc.errno == errno.EIO
        return
    # Attach a second good image right after the bad one.
    other = publish_sample_image(published.store, seed=2)
    other_file = daemon.image(other.digest) / "xattrs"
    assert call_with_timeout(read_file, other_file) == other.files[b"xattrs"]

    try:
        leaked = call_with_timeout(read_file, bad_root / "bin")
    except OSError as exc:
        assert exc.errno == errno.EIO
    else:
        raise AssertionError(f"bin of image {digest} read {leaked!r} from image {other.digest}")


@pytest.mark.fuse
@pytest.mark.parametrize("case", ["config_not_json", "config_json_string"])
def test_control_image_bad_config_error(daemon: DaemonProcess, published: Published, case: str):
    digest, _data = craft(published.store, published.valid, LYING_BODIES[case])

    with pytest.raises(ControlError) as caught:
        ControlClient(daemon.control_socket).image(digest)

    assert "failed the image request" in str(caught.value)
    assert digest in str(caught.value)
    assert_daemon_healthy(daemon, published)


def publish_body_of_maximum_size(store: FileStore, last_byte: int) -> str:
    """Publish an index of a few KiB whose body is MAX_BODY_BYTES of zeros, which no header fits."""
    body = bytearray(MAX_BODY_BYTES)
    body[-1] = last_byte
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=True)
    data = _PREAMBLE + compressor.compress(bytes(body))
    digest = address_of(data).hex()
    store.put(index_key(digest), data)
    return digest


@pytest.mark.fuse
def test_mount_rejected_large_bodies_freed(daemon: DaemonProcess, published: Published):
    """Each rejected body of MAX_BODY_BYTES is freed once its attach has failed."""
    for last_byte in range(1, 4):
        digest = publish_body_of_maximum_size(published.store, last_byte)

        with pytest.raises(OSError) as caught:
            call_with_timeout(os.lstat, daemon.image(digest))

        assert caught.value.errno == errno.EIO
    assert daemon_rss_bytes(daemon) < DAEMON_RSS_BYTES, f"{daemon_rss_bytes(daemon)} bytes"
    assert_daemon_healthy(daemon, published)
