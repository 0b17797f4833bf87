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

Read-ahead: a read that starts where the previous read of the same inode ended
is sequential. When a sequential reader moves on to a new chunk, background
tasks (trio system tasks) fetch the next chunks of the file. At most
``prefetch_concurrency`` of them fetch at a time, so they never take every
store request slot from demand reads. A demand read of a chunk that a prefetch is
fetching joins that fetch. A failed prefetch is counted and otherwise
ignored, because the demand read of that chunk reports the error.

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
from collections import Counter, OrderedDict
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

# Read-ahead: chunks fetched ahead of a sequential reader, and how many
# prefetches may use store requests at once. Keep the concurrency below the
# store tier's fetch_concurrency, so that demand reads always find a free slot.
DEFAULT_READAHEAD_CHUNKS = 2
DEFAULT_PREFETCH_CONCURRENCY = 4
# Prefetches waiting for a slot beyond this many are dropped.
MAX_WAITING_PREFETCHES = 64
# Files whose read position is tracked; the least recently read is forgotten first.
MAX_READ_STREAMS = 4096


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
                  "chunk_reads": 0, "fetched_chunks": 0, "fetched_bytes": 0, "prefetched_chunks": 0,
                  "read_errors": 0}
        result.update(self.counters)
        return result


class _ReadStream:
    """Read position of one file, for sequential read detection."""

    __slots__ = ("end", "chunk", "chunk_changes", "ahead_end")

    def __init__(self, end: int, chunk: int):
        # File offset after the last read, and the chunk holding its last byte.
        self.end = end
        self.chunk = chunk
        # How many times in a row a sequential read moved on to a new chunk.
        self.chunk_changes = 0
        # File offset up to which chunks were already prefetched.
        self.ahead_end = 0


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
                 index_timeout_s: float = 30.0, clock_ns: Callable[[], int] = time.time_ns,
                 readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS,
                 prefetch_concurrency: int = DEFAULT_PREFETCH_CONCURRENCY):
        if readahead_chunks < 0:
            raise ValueError(f"readahead_chunks must be >= 0, not {readahead_chunks}")
        if prefetch_concurrency < 1:
            raise ValueError(f"prefetch_concurrency must be >= 1, not {prefetch_concurrency}")
        self.store = store
        self.chain = chain
        self.readahead_chunks = readahead_chunks
        self._prefetch_limiter = trio.CapacityLimiter(prefetch_concurrency)
        self._streams: OrderedDict[int, _ReadStream] = OrderedDict()
        self._prefetching: set[bytes] = set()
        self._prefetches_idle = trio.Event()
        self._prefetches_idle.set()
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

    def readahead_stats(self) -> dict[str, int]:
        """Return the read-ahead counters: prefetches started, dropped and failed."""
        result = {"prefetches": 0, "prefetches_dropped": 0, "prefetch_errors": 0}
        result.update({name: value for name, value in self.counters.items() if name in result})
        result["prefetching"] = len(self._prefetching)
        return result

    def index_stats(self) -> dict[str, int]:
        """Return how many indexes came from the store and how many from the local cache."""
        result = {"index_fetches": 0, "index_cache_hits": 0}
        result.update({name: value for name, value in self.counters.items() if name in result})
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
        if self.readahead_chunks:
            self._read_ahead(image, inode, local, offset, end, extents)
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

    # -- read-ahead ----------------------------------------------------------

    def _read_ahead(self, image: Image, inode: int, local: int, offset: int, end: int,
                    extents: list) -> None:
        """Prefetch the chunks after a read that continues the previous read of the file.

        A read is sequential when it starts where the previous read of the same
        inode ended. Each time a sequential read moves on to a new chunk, the
        next chunk is prefetched, and the next ``readahead_chunks`` once the
        reader has moved on twice. Prefetches run in the background, at most
        ``prefetch_concurrency`` at a time.
        """
        # NOTE: the position is tracked per inode, not per open file, so two
        # processes reading one file at different offsets mostly get none.
        last = extents[-1]
        stream = self._streams.pop(inode, None)
        if stream is None or stream.end != offset:
            self._remember_stream(inode, _ReadStream(end, last.chunk))
            return
        self._remember_stream(inode, stream)
        stream.end = end
        if last.chunk == stream.chunk:
            return
        stream.chunk = last.chunk
        stream.chunk_changes += 1
        count = 1 if stream.chunk_changes < 2 else self.readahead_chunks
        position = max(last.file_offset + last.length, stream.ahead_end)
        for extent in self._next_extents(image, local, position, count):
            self._start_prefetch(image, extent.chunk)
            stream.ahead_end = extent.file_offset + extent.length

    def _remember_stream(self, inode: int, stream: _ReadStream) -> None:
        self._streams[inode] = stream
        if len(self._streams) > MAX_READ_STREAMS:
            self._streams.popitem(last=False)

    def _next_extents(self, image: Image, local: int, position: int, count: int) -> list:
        """Return up to ``count`` extents of a file from ``position`` on, one per new chunk."""
        result = []
        size = image.index.inode(local).size
        while len(result) < count and position < size:
            extent = image.index.extents(local, position, 1)[0]
            if extent.chunk not in {chosen.chunk for chosen in result}:
                result.append(extent)
            position = extent.file_offset + extent.length
        return result

    def _start_prefetch(self, image: Image, number: int) -> None:
        address, _length = image.index.chunk(number)
        if address in self._prefetching:
            return
        if self._prefetch_limiter.statistics().tasks_waiting >= MAX_WAITING_PREFETCHES:
            self.counters["prefetches_dropped"] += 1
            return
        self._prefetching.add(address)
        self.counters["prefetches"] += 1
        if self._prefetches_idle.is_set():
            self._prefetches_idle = trio.Event()
        trio.lowlevel.spawn_system_task(self._prefetch, image, number, address,
                                        name="lazyfs prefetch")

    async def _prefetch(self, image: Image, number: int, address: bytes) -> None:
        # A system task: nothing may escape it, or the whole trio run ends.
        try:
            async with self._prefetch_limiter:
                # A prefetch waits for the background fills instead of
                # outrunning them, which would make the chain drop fills.
                await self.chain.wait_for_fill_room()
                fetched = await self.chain.fetch(address)
        except (StoreError, IntegrityError) as exc:
            # The chain remembers definite failures, so the demand read of
            # this chunk fails the same way and reports it.
            self.counters["prefetch_errors"] += 1
            log.debug("prefetching chunk %s of image %s failed: %s", address.hex(), image.digest, exc)
        except Exception:
            # For example a disk tier closed by a shutdown while this ran.
            self.counters["prefetch_errors"] += 1
            log.warning("prefetching chunk %s of image %s failed", address.hex(), image.digest,
                        exc_info=True)
        else:
            if fetched.remote and not fetched.joined:
                image.counters["prefetched_chunks"] += 1
                image.counters["fetched_chunks"] += 1
                image.counters["fetched_bytes"] += len(fetched.data)
        finally:
            self._prefetching.discard(address)
            if not self._prefetching:
                self._prefetches_idle.set()

    async def wait_for_prefetches(self) -> None:
        """Wait until no prefetch is running or waiting."""
        while self._prefetching:
            await self._prefetches_idle.wait()

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
