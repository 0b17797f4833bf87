"""The mounted namespace: inode numbers, attributes, lookups and reads.

Plain code without pyfuse3, so tests and tools can use it without a mount;
``lazyfs.fuse_ops`` adapts it to FUSE. Layout under the mount point::

    /                      inode 1 (ROOT_INODE)
    /images/               inode 2 (IMAGES_INODE), lists the attached images
    /images/<digest>/      an image's root directory, <digest> = index digest in hex

An image is attached on the first lookup of its name: its index is read from
``index_cache_dir/<digest>`` if present, else from ``indexes/<digest>`` in the
store (and then kept in ``index_cache_dir``), and verified against the digest
either way. A name that
is not 64 lowercase hex digits is ENOENT without any store request, and so is
a digest whose index is not in the store. Concurrent lookups of one image load
it once.

Inode numbers: each attached image gets the next free range of its index's
inode count, starting at 3, and global inode = range base + index inode. Ranges
are never reused while the tree exists, so inode numbers are stable for the
life of the mount, hardlinks share one number (the index gives them one inode)
and readdir reports the same numbers as getattr.

Errors: a request that fails for a definite reason raises FilesystemError with
its errno. A read that cannot get a chunk raises ChunkReadError. A failed index
load raises the store's StoreError or IndexFormatError.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import re
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import trio

from .errors import (ChunkReadError, FilesystemError, IndexFormatError, IntegrityError, ObjectNotFound,
                     StoreError, StoreUnavailable)
from .index import Index, Inode
from .refs import index_key
from .store import Store
from .tiers import TierChain

log = logging.getLogger(__name__)

ROOT_INODE = 1
IMAGES_INODE = 2
FIRST_IMAGE_INODE = 3
IMAGES_NAME = b"images"

# Preferred I/O size reported in st_blksize: programs like cat size their
# buffers by it, and larger buffers mean fewer FUSE requests.
BLOCK_SIZE = 128 << 10
# Unit of the block counts statfs reports.
STATFS_BLOCK_SIZE = 4096
NAME_MAX = 255

_DIGEST_NAME = re.compile(rb"[0-9a-f]{64}")


@dataclass(frozen=True)
class Attributes:
    """Attributes of one inode as stat(2) reports them; atime and ctime equal mtime."""

    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_blocks: int
    st_blksize: int
    st_rdev: int
    st_mtime_ns: int


@dataclass(frozen=True)
class FsStats:
    """File system totals as statfs(2) reports them, sizes in blocks of ``block_size`` bytes."""

    block_size: int
    blocks: int
    files: int
    name_max: int


@dataclass(eq=False)
class Image:
    """One attached image: its index and its range of global inode numbers."""

    digest: str
    index: Index
    base: int
    size_bytes: int
    attached_at_ns: int
    counters: Counter = field(default_factory=Counter)

    @cached_property
    def file_count(self) -> int:
        """Number of regular-file inodes (a hardlinked file counts once)."""
        return sum(1 for record in self.index.inodes() if stat.S_ISREG(record.mode))

    @property
    def end(self) -> int:
        """First global inode number after this image's range."""
        return self.base + self.index.inode_count

    def status(self) -> dict[str, int]:
        result = {"base_inode": self.base, "inodes": self.index.inode_count,
                  "size_bytes": self.size_bytes, "chunks": self.index.chunk_count,
                  "attached_at_ns": self.attached_at_ns, "reads": 0, "bytes_read": 0,
                  "chunk_reads": 0, "fetched_chunks": 0, "fetched_bytes": 0, "read_errors": 0}
        result.update(self.counters)
        return result


class _Load:
    """One index load in progress; concurrent lookups of the same digest wait on it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.image: Image | None = None
        self.error: Exception | None = None


def _not_found(message: str) -> FilesystemError:
    return FilesystemError(errno.ENOENT, message)


class Tree:
    """The namespace of one mount: root, images/ and every attached image."""

    def __init__(self, store: Store, chain: TierChain, *, index_cache_dir: str | Path | None = None,
                 index_timeout_s: float = 30.0, clock_ns: Callable[[], int] = time.time_ns):
        self.store = store
        self.chain = chain
        self.index_cache_dir = Path(index_cache_dir) if index_cache_dir is not None else None
        self.index_timeout_s = index_timeout_s
        self.counters: Counter[str] = Counter()
        self._clock_ns = clock_ns
        self.mounted_at_ns = clock_ns()
        self._images_changed_ns = self.mounted_at_ns
        self._images: list[Image] = []
        self._bases: list[int] = []
        self._by_digest: dict[str, Image] = {}
        self._loads: dict[str, _Load] = {}
        self._next_base = FIRST_IMAGE_INODE

    # -- images ------------------------------------------------------------

    @property
    def images(self) -> list[Image]:
        """Attached images, in attach order."""
        return list(self._images)

    async def attach(self, digest: str) -> Image:
        """Return the attached image of an index digest, loading it on first use."""
        while True:
            image = self._by_digest.get(digest)
            if image is not None:
                return image
            load = self._loads.get(digest)
            if load is None:
                break
            await load.done.wait()
            if load.error is not None:
                raise load.error
        load = _Load()
        self._loads[digest] = load
        try:
            load.image = await self._load(digest)
            return load.image
        except Exception as exc:
            load.error = exc
            raise
        finally:
            # A cancelled load leaves neither image nor error; its waiters retry.
            del self._loads[digest]
            load.done.set()

    async def _load(self, digest: str) -> Image:
        index, size_bytes = await self._load_index(digest)
        image = Image(digest, index, self._next_base, size_bytes, self._clock_ns())
        self._next_base = image.end
        self._images.append(image)
        self._bases.append(image.base)
        self._by_digest[digest] = image
        self._images_changed_ns = image.attached_at_ns
        log.info("attached image %s: %d inodes from %d, %d bytes of files",
                 digest, index.inode_count, image.base, size_bytes)
        return image

    async def _load_index(self, digest: str) -> tuple[Index, int]:
        if self.index_cache_dir is not None:
            cached = await trio.to_thread.run_sync(self._read_cached_index, digest)
            if cached is not None:
                self.counters["index_cache_hits"] += 1
                return cached
        key = index_key(digest)
        log.info("fetching index %s from %s", digest, self.store.url)
        self.counters["index_fetches"] += 1
        try:
            with trio.fail_after(self.index_timeout_s):
                data = await trio.to_thread.run_sync(self.store.get, key, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise StoreUnavailable(
                f"fetching {key} from {self.store.url} timed out after {self.index_timeout_s:g} s"
            ) from None
        except ObjectNotFound:
            raise _not_found(f"no index {digest} in {self.store.url}") from None
        parsed = await trio.to_thread.run_sync(_parse_index, data, digest)
        if self.index_cache_dir is not None:
            await trio.to_thread.run_sync(self._write_cached_index, digest, data)
        return parsed

    def _read_cached_index(self, digest: str) -> tuple[Index, int] | None:
        path = self.index_cache_dir / digest
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read cached index %s: %s; fetching it again", path, exc.strerror)
            return None
        try:
            return _parse_index(data, digest)
        except IndexFormatError as exc:
            log.warning("cached index %s is invalid (%s); removing it and fetching it again", path, exc)
            path.unlink(missing_ok=True)
            return None

    def _write_cached_index(self, digest: str, data: bytes) -> None:
        # Written to a temporary name and renamed, so a reader sees all of it or nothing.
        # NOTE: cached indexes are never evicted; they are small next to the
        # chunks, but a node that attaches many images accumulates them.
        path = self.index_cache_dir / digest
        temporary = path.with_name(f".{digest}.{os.getpid()}.tmp")
        try:
            self.index_cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            log.warning("cannot cache index %s at %s: %s", digest, path, exc.strerror)

    def _locate(self, inode: int) -> tuple[Image, int]:
        """Return (image, index inode) of a global inode number; raise ENOENT."""
        position = bisect.bisect_right(self._bases, inode) - 1
        if position >= 0:
            image = self._images[position]
            if inode < image.end:
                return image, inode - image.base
        raise _not_found(f"no inode {inode}")

    def is_image_inode(self, inode: int) -> bool:
        """Return whether an inode belongs to an image (immutable) rather than to root or images/."""
        return inode >= FIRST_IMAGE_INODE

    # -- lookup and attributes --------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> int:
        """Return the inode of ``name`` in directory ``parent``; raise ENOENT or ENOTDIR."""
        if parent == ROOT_INODE:
            if name in (b".", b".."):
                return ROOT_INODE
            if name == IMAGES_NAME:
                return IMAGES_INODE
            raise _not_found(f"no {name!r} in the mount root")
        if parent == IMAGES_INODE:
            if name == b".":
                return IMAGES_INODE
            if name == b"..":
                return ROOT_INODE
            if not _DIGEST_NAME.fullmatch(name):
                raise _not_found(f"{name!r} is not an index digest (64 lowercase hex digits)")
            return (await self.attach(name.decode())).base
        image, local = self._locate(parent)
        record = image.index.inode(local)
        if not stat.S_ISDIR(record.mode):
            raise FilesystemError(errno.ENOTDIR, f"inode {parent} is not a directory")
        if name == b".":
            return parent
        if name == b"..":
            return IMAGES_INODE if local == 0 else image.base + record.parent
        child = image.index.lookup(local, name)
        if child is None:
            raise _not_found(f"no {name!r} in inode {parent} of image {image.digest}")
        return image.base + child

    def getattr(self, inode: int) -> Attributes:
        """Return the attributes of an inode; raise ENOENT for an unknown one."""
        if inode == ROOT_INODE:
            return self._directory_attributes(ROOT_INODE, 3, self.mounted_at_ns)
        if inode == IMAGES_INODE:
            return self._directory_attributes(IMAGES_INODE, 2 + len(self._images),
                                              self._images_changed_ns)
        image, local = self._locate(inode)
        return _attributes(inode, image.index.inode(local))

    def _directory_attributes(self, inode: int, nlink: int, mtime_ns: int) -> Attributes:
        return Attributes(st_ino=inode, st_mode=stat.S_IFDIR | 0o755, st_nlink=nlink, st_uid=0,
                          st_gid=0, st_size=0, st_blocks=0, st_blksize=BLOCK_SIZE, st_rdev=0,
                          st_mtime_ns=mtime_ns)

    def entries(self, inode: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """Yield (next offset, name, inode) for a directory's entries from offset ``start``.

        Offsets are positions in a fixed order, so a listing resumed at a
        returned offset neither repeats nor skips entries. "." and ".." are not
        listed.
        """
        if inode == ROOT_INODE:
            names = [(IMAGES_NAME, IMAGES_INODE)]
        elif inode == IMAGES_INODE:
            names = [(image.digest.encode(), image.base) for image in self._images]
        else:
            image, local = self._locate(inode)
            if not stat.S_ISDIR(image.index.inode(local).mode):
                raise FilesystemError(errno.ENOTDIR, f"inode {inode} is not a directory")
            for position, name, child in image.index.entries(local, start):
                yield position + 1, name, image.base + child
            return
        for position in range(start, len(names)):
            name, child = names[position]
            yield position + 1, name, child

    def check_directory(self, inode: int) -> None:
        """Raise ENOENT or ENOTDIR unless the inode is a directory."""
        if not stat.S_ISDIR(self.getattr(inode).st_mode):
            raise FilesystemError(errno.ENOTDIR, f"inode {inode} is not a directory")

    def readlink(self, inode: int) -> bytes:
        """Return a symlink's target bytes; raise EINVAL for other inodes."""
        if self.is_image_inode(inode):
            image, local = self._locate(inode)
            if stat.S_ISLNK(image.index.inode(local).mode):
                return image.index.readlink(local)
        else:
            self.getattr(inode)
        raise FilesystemError(errno.EINVAL, f"inode {inode} is not a symbolic link")

    def listxattr(self, inode: int) -> list[bytes]:
        """Return the names of an inode's extended attributes, sorted."""
        if not self.is_image_inode(inode):
            self.getattr(inode)
            return []
        image, local = self._locate(inode)
        return sorted(image.index.xattrs(local))

    def getxattr(self, inode: int, name: bytes) -> bytes:
        """Return one extended attribute's value; raise ENODATA if the inode has none of that name."""
        value = None
        if self.is_image_inode(inode):
            image, local = self._locate(inode)
            value = image.index.xattrs(local).get(name)
        else:
            self.getattr(inode)
        if value is None:
            raise FilesystemError(errno.ENODATA, f"inode {inode} has no extended attribute {name!r}")
        return value

    def statfs(self) -> FsStats:
        """Return file system totals: the attached images' file bytes and inode counts."""
        total_bytes = sum(image.size_bytes for image in self._images)
        inodes = 2 + sum(image.index.inode_count for image in self._images)
        blocks = -(-total_bytes // STATFS_BLOCK_SIZE)
        return FsStats(block_size=STATFS_BLOCK_SIZE, blocks=blocks, files=inodes, name_max=NAME_MAX)

    def status(self) -> dict[str, dict[str, int]]:
        """Return per-image counters keyed by digest, for the control socket."""
        return {image.digest: image.status() for image in self._images}

    def index_stats(self) -> dict[str, int]:
        """Return how many indexes came from the store and how many from the local cache."""
        result = {"index_fetches": 0, "index_cache_hits": 0}
        result.update(self.counters)
        return result

    # -- reads -------------------------------------------------------------

    def check_regular_file(self, inode: int) -> None:
        """Raise unless the inode is a regular file: ENOENT, EISDIR or EINVAL."""
        mode = self.getattr(inode).st_mode
        if stat.S_ISDIR(mode):
            raise FilesystemError(errno.EISDIR, f"inode {inode} is a directory")
        if not stat.S_ISREG(mode):
            raise FilesystemError(errno.EINVAL, f"inode {inode} is not a regular file")

    async def read(self, inode: int, offset: int, size: int) -> bytes:
        """Return ``size`` bytes of a regular file from ``offset``, fewer only at end of file.

        The chunks behind the range are fetched through the tier chain, several
        at once. Raises ChunkReadError when one cannot be fetched or verified.
        """
        self.check_regular_file(inode)
        if offset < 0 or size < 0:
            raise FilesystemError(errno.EINVAL, f"invalid read range: offset {offset}, size {size}")
        image, local = self._locate(inode)
        record = image.index.inode(local)
        end = min(record.size, offset + size)
        if offset >= end:
            return b""
        extents = image.index.extents(local, offset, size)
        chunks = await self._fetch_chunks(image, sorted({extent.chunk for extent in extents}))
        pieces = []
        for extent in extents:
            start = max(offset, extent.file_offset)
            stop = min(end, extent.file_offset + extent.length)
            low = extent.chunk_offset + start - extent.file_offset
            pieces.append(memoryview(chunks[extent.chunk])[low:low + stop - start])
        data = b"".join(pieces)
        if len(data) != end - offset:
            # Only an index whose extents have gaps or overrun their chunks gets here.
            raise IndexFormatError(f"index {image.digest}: the extents of inode {local} do not cover "
                                   f"bytes {offset} to {end}")
        image.counters["reads"] += 1
        image.counters["bytes_read"] += len(data)
        return data

    async def _fetch_chunks(self, image: Image, numbers: list[int]) -> dict[int, bytes]:
        if len(numbers) == 1:
            return {numbers[0]: await self._fetch_chunk(image, numbers[0])}
        results: dict[int, bytes] = {}
        errors: list[ChunkReadError] = []

        async def fetch_one(number: int) -> None:
            try:
                results[number] = await self._fetch_chunk(image, number)
            except ChunkReadError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for number in numbers:
                nursery.start_soon(fetch_one, number)
        if errors:
            raise errors[0]
        return results

    async def _fetch_chunk(self, image: Image, number: int) -> bytes:
        address, length = image.index.chunk(number)
        try:
            fetched = await self.chain.fetch(address)
            if len(fetched.data) != length:
                raise IntegrityError(
                    f"chunk {address.hex()} is {len(fetched.data)} bytes, but the index records {length}")
        except (StoreError, IntegrityError) as exc:
            image.counters["read_errors"] += 1
            raise ChunkReadError(image.digest, address, exc) from exc
        image.counters["chunk_reads"] += 1
        if fetched.remote and not fetched.joined:
            image.counters["fetched_chunks"] += 1
            image.counters["fetched_bytes"] += length
        return fetched.data


def _parse_index(data: bytes, digest: str) -> tuple[Index, int]:
    """Parse and verify an index; return it with the total bytes of its regular files."""
    index = Index(data, digest)
    size_bytes = sum(record.size for record in index.inodes() if stat.S_ISREG(record.mode))
    return index, size_bytes


def _attributes(inode: int, record: Inode) -> Attributes:
    size = record.size
    blocks = -(-size // 512) if stat.S_ISREG(record.mode) else 0
    return Attributes(st_ino=inode, st_mode=record.mode, st_nlink=record.nlink, st_uid=record.uid,
                      st_gid=record.gid, st_size=size, st_blocks=blocks, st_blksize=BLOCK_SIZE,
                      st_rdev=record.rdev, st_mtime_ns=record.mtime_ns)
