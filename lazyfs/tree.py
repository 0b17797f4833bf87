"""The mounted namespace: inode numbers, attributes, lookups and reads.

Plain code without pyfuse3, so tests and tools can use it without a mount;
``lazyfs.fuse_ops`` adapts it to FUSE. Layout under the mount point::

    /                      inode 1 (ROOT_INODE)
    /images/               inode 2 (IMAGES_INODE), lists the attached images
    /images/<digest>/      an image's root directory, <digest> = index digest in hex
    /shifted/              inode 3 (SHIFTED_INODE), lists the id ranges in use
    /shifted/<uid base>:<gid base>:<count>/<digest>/
                           the same image with shifted owners, for example
                           shifted/100000:100000:65536/<digest>/

Shifted views: a container in a user namespace sees its ids 0..count-1 as
host ids base..base+count-1, and libfuse 3.14 cannot negotiate idmapped
mounts, so the tree shifts owners itself, with ``lazyfs.idshift.IdShift``
doing every translation. The range name is canonical (decimal without leading
zeros, count at least 1, base + count - 1 at most 2**32 - 2); any other name
under shifted/ is ENOENT. A range directory exists from its first lookup, and
at most MAX_ID_SHIFTS of them.

A shifted view shares its image's index, the chunk tiers and the read-ahead
state with the plain view, but it has its own inode range, so the kernel never
mixes up attributes it cached for the two views.

An image is attached on the first lookup of its name: its index is read from
``index_cache_dir/<digest>`` if present, else from ``indexes/<digest>`` in the
store (and then kept in ``index_cache_dir``), and verified against the digest
either way. A name that
is not 64 lowercase hex digits is ENOENT without any store request, and so is
a digest whose index is not in the store. Concurrent lookups of one image load
it once.

Inode numbers: each view of an image (the plain one when the image attaches,
each shifted one on its first lookup) gets the next free range of its index's
inode count, starting at 4, and global inode = range base + index inode. A
range directory under shifted/ takes the next single number. Ranges are never
reused while the tree exists, so inode numbers are stable for the life of the
mount, hardlinks share one number within a view (the index gives them one
inode) and readdir reports the same numbers as getattr.

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
import re
import stat
import time
import traceback
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import trio

from .cachefiles import load_cache_file, write_cache_file
from .errors import (ChunkReadError, FilesystemError, IndexFormatError, IntegrityError, ObjectNotFound,
                     StoreError, StoreUnavailable)
from .idshift import IdShift
from .index import MAX_BODY_BYTES, Index, Inode
from .logutil import image_context
from .refs import index_key
from .store import Store
from .tiers import ChunkFetch, TierChain

log = logging.getLogger(__name__)

ROOT_INODE = 1
IMAGES_INODE = 2
SHIFTED_INODE = 3
FIRST_IMAGE_INODE = 4
IMAGES_NAME = b"images"
SHIFTED_NAME = b"shifted"

# Range directories under shifted/; each takes an inode number and memory, so
# names looked up in a loop must not grow the tree without bound.
MAX_ID_SHIFTS = 1024

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
# A cached index file longer than this cannot be valid: its body is at most
# MAX_BODY_BYTES, and zstd adds little even to bytes it cannot compress.
MAX_CACHED_INDEX_BYTES = MAX_BODY_BYTES + (1 << 20)


class Attributes(NamedTuple):
    """Attributes of one inode as stat(2) reports them; atime and ctime equal mtime.

    A named tuple, because every lookup, getattr and readdir entry builds one.
    """

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

    def count_prefetch(self, fetched: ChunkFetch) -> None:
        """Count a chunk that a prefetch (read-ahead or trace replay) fetched from a store."""
        if fetched.remote and not fetched.joined:
            self.counters["prefetched_chunks"] += 1
            self.counters["fetched_chunks"] += 1
            self.counters["fetched_bytes"] += len(fetched.data)


@dataclass(eq=False)
class View:
    """One inode range that shows an image: the plain view (``shift`` None) or a shifted one."""

    image: Image
    shift: IdShift | None
    base: int
    # First global inode number after this view's range; set from the index.
    end: int = field(init=False)

    def __post_init__(self) -> None:
        self.end = self.base + self.image.index.inode_count

    @property
    def path(self) -> str:
        """The view's root directory relative to the mount point."""
        if self.shift is None:
            return f"{IMAGES_NAME.decode()}/{self.image.digest}"
        return f"{SHIFTED_NAME.decode()}/{self.shift.name}/{self.image.digest}"


@dataclass(eq=False)
class _ShiftDirectory:
    """``shifted/<range>/``: the shifted views of one id range, in attach order."""

    shift: IdShift
    inode: int
    changed_ns: int
    views: dict[str, View] = field(default_factory=dict)


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


# How long a failed index load is remembered. Lookups of a missing or broken
# image in a loop then make one store request in that time, not one each, and
# an image published after a failed lookup shows up at most this much later.
INDEX_FAILURE_MEMORY_S = 2.0
# Failed loads remembered at once, at most: a lookup of random digests must not grow memory.
MAX_FAILED_LOADS = 1024


def _not_found(message: str) -> FilesystemError:
    return FilesystemError(errno.ENOENT, message)


class Tree:
    """The namespace of one mount: root, images/ and every attached image."""

    def __init__(self, store: Store, chain: TierChain, *, index_cache_dir: str | Path | None = None,
                 index_timeout_s: float = 30.0, clock_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic,
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
        self._monotonic = monotonic
        # Index digest -> (monotonic time until which it is remembered, the load's error).
        self._failed_loads: dict[str, tuple[float, Exception]] = {}
        self.mounted_at_ns = clock_ns()
        self._images_changed_ns = self.mounted_at_ns
        self._images: list[Image] = []
        self._by_digest: dict[str, Image] = {}
        self._plain_views: dict[str, View] = {}
        # Inode ranges in allocation order: views and range directories.
        self._bases: list[int] = []
        self._allocations: list[View | _ShiftDirectory] = []
        self._shift_directories: dict[IdShift, _ShiftDirectory] = {}
        self._shifted_changed_ns = self.mounted_at_ns
        self._loads: dict[str, _Load] = {}
        self._next_base = FIRST_IMAGE_INODE
        # Hooks of the boot traces (lazyfs.prefetch): called on each attach,
        # and with the chunk numbers of each read, in order, before the fetch.
        self.on_attach: Callable[[Image], None] | None = None
        self.on_chunks_read: Callable[[Image, list[int]], None] | None = None

    # -- images ------------------------------------------------------------

    @property
    def images(self) -> list[Image]:
        """Attached images, in attach order."""
        return list(self._images)

    async def attach(self, digest: str) -> Image:
        """Return the attached image of an index digest, loading it on first use.

        A load that failed less than INDEX_FAILURE_MEMORY_S ago raises its error again.
        """
        failure = self._failed_loads.get(digest)
        if failure is not None:
            remembered_until, error = failure
            if self._monotonic() < remembered_until:
                # A fresh traceback each time, so the remembered error does not grow one.
                raise error.with_traceback(None)
            del self._failed_loads[digest]
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
            self._remember_failure(digest, exc)
            raise
        finally:
            # A cancelled load leaves neither image nor error; its waiters retry.
            del self._loads[digest]
            load.done.set()

    def _remember_failure(self, digest: str, error: Exception) -> None:
        """Keep a failed load's error for INDEX_FAILURE_MEMORY_S, without the frames it came from."""
        # The finished frames of a failed load may hold its index body, up to MAX_BODY_BYTES.
        chained: BaseException | None = error
        seen: set[int] = set()
        while chained is not None and id(chained) not in seen:
            seen.add(id(chained))
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__cause__ or chained.__context__
        now = self._monotonic()
        if len(self._failed_loads) >= MAX_FAILED_LOADS:
            for expired in [key for key, (until, _error) in self._failed_loads.items() if until <= now]:
                del self._failed_loads[expired]
            while len(self._failed_loads) >= MAX_FAILED_LOADS:
                del self._failed_loads[next(iter(self._failed_loads))]
        self._failed_loads[digest] = (now + INDEX_FAILURE_MEMORY_S, error)

    async def _load(self, digest: str) -> Image:
        index, size_bytes = await self._load_index(digest)
        image = Image(digest, index, self._next_base, size_bytes, self._clock_ns())
        self._plain_views[digest] = View(image, None, image.base)
        self._allocate(self._plain_views[digest], index.inode_count)
        self._images.append(image)
        self._by_digest[digest] = image
        self._images_changed_ns = image.attached_at_ns
        log.info("attached image %s: %d inodes from %d, %d bytes of files",
                 digest, index.inode_count, image.base, size_bytes)
        if self.on_attach is not None:
            self.on_attach(image)
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
        return load_cache_file(self.index_cache_dir, digest, MAX_CACHED_INDEX_BYTES,
                               lambda data: _parse_index(data, digest), IndexFormatError, log,
                               "cached index", "fetching it again")

    def _write_cached_index(self, digest: str, data: bytes) -> None:
        # NOTE: cached indexes are never evicted; they are small next to the
        # chunks, but a node that attaches many images accumulates them.
        try:
            write_cache_file(self.index_cache_dir, digest, data)
        except OSError as exc:
            log.warning("cannot cache index %s at %s: %s", digest, self.index_cache_dir / digest, exc.strerror)

    async def attach_view(self, digest: str, shift: IdShift | None = None) -> View:
        """Return the plain view of an image, or its view shifted by ``shift``, attaching both on first use."""
        image = await self.attach(digest)
        if shift is None:
            return self._plain_views[digest]
        directory = self._shift_directory(shift)
        view = directory.views.get(digest)
        if view is None:
            view = View(image, shift, self._next_base)
            self._allocate(view, image.index.inode_count)
            directory.views[digest] = view
            directory.changed_ns = self._clock_ns()
            log.info("attached image %s shifted by %s: %d inodes from %d",
                     digest, shift.name, image.index.inode_count, view.base)
        return view

    def _shift_directory(self, shift: IdShift) -> _ShiftDirectory:
        directory = self._shift_directories.get(shift)
        if directory is None:
            if len(self._shift_directories) >= MAX_ID_SHIFTS:
                raise FilesystemError(errno.ENOSPC, f"cannot add id range {shift.name}: the mount already "
                                                    f"has the maximum of {MAX_ID_SHIFTS} id ranges")
            directory = _ShiftDirectory(shift, self._next_base, self._clock_ns())
            self._allocate(directory, 1)
            self._shift_directories[shift] = directory
            self._shifted_changed_ns = directory.changed_ns
        return directory

    def _allocate(self, allocation: View | _ShiftDirectory, count: int) -> None:
        """Give ``allocation`` the next ``count`` inode numbers, which must start at its base."""
        self._bases.append(self._next_base)
        self._allocations.append(allocation)
        self._next_base += count

    def _allocation(self, inode: int) -> View | _ShiftDirectory | None:
        position = bisect.bisect_right(self._bases, inode) - 1
        if position < 0:
            return None
        allocation = self._allocations[position]
        if isinstance(allocation, _ShiftDirectory):
            return allocation if inode == allocation.inode else None
        return allocation if inode < allocation.end else None

    def _locate(self, inode: int) -> tuple[View, int]:
        """Return (view, index inode) of a global inode number in an image; raise ENOENT."""
        allocation = self._allocation(inode)
        if isinstance(allocation, View):
            return allocation, inode - allocation.base
        raise _not_found(f"no image inode {inode}")

    def is_image_inode(self, inode: int) -> bool:
        """Return whether an inode belongs to an image view (immutable) rather than to a directory above one."""
        return isinstance(self._allocation(inode), View)

    # -- lookup and attributes --------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> int:
        """Return the inode of ``name`` in directory ``parent``; raise ENOENT or ENOTDIR."""
        if parent == ROOT_INODE:
            if name in (b".", b".."):
                return ROOT_INODE
            if name == IMAGES_NAME:
                return IMAGES_INODE
            if name == SHIFTED_NAME:
                return SHIFTED_INODE
            raise _not_found(f"no {name!r} in the mount root")
        if parent == IMAGES_INODE:
            if name in (b".", b".."):
                return IMAGES_INODE if name == b"." else ROOT_INODE
            return (await self.attach_view(_digest_name(name))).base
        if parent == SHIFTED_INODE:
            if name in (b".", b".."):
                return SHIFTED_INODE if name == b"." else ROOT_INODE
            shift = IdShift.from_name(name)
            if shift is None:
                raise _not_found(f"{name!r} is not an id range (<uid base>:<gid base>:<count>, in decimal)")
            return self._shift_directory(shift).inode
        allocation = self._allocation(parent)
        if isinstance(allocation, _ShiftDirectory):
            if name in (b".", b".."):
                return parent if name == b"." else SHIFTED_INODE
            return (await self.attach_view(_digest_name(name), allocation.shift)).base
        view, local = self._locate(parent)
        record = view.image.index.inode(local)
        if not stat.S_ISDIR(record.mode):
            raise FilesystemError(errno.ENOTDIR, f"inode {parent} is not a directory")
        if name == b".":
            return parent
        if name == b"..":
            return self._view_parent(view) if local == 0 else view.base + record.parent
        child = view.image.index.lookup(local, name)
        if child is None:
            raise _not_found(f"no {name!r} in inode {parent} of image {view.image.digest}")
        return view.base + child

    def _view_parent(self, view: View) -> int:
        """Return the inode of the directory that lists a view: images/ or its range directory."""
        if view.shift is None:
            return IMAGES_INODE
        return self._shift_directories[view.shift].inode

    def getattr(self, inode: int) -> Attributes:
        """Return the attributes of an inode; raise ENOENT for an unknown one."""
        if inode == ROOT_INODE:
            return self._directory_attributes(ROOT_INODE, 4, self.mounted_at_ns)
        if inode == IMAGES_INODE:
            return self._directory_attributes(IMAGES_INODE, 2 + len(self._images),
                                              self._images_changed_ns)
        if inode == SHIFTED_INODE:
            return self._directory_attributes(SHIFTED_INODE, 2 + len(self._shift_directories),
                                              self._shifted_changed_ns)
        allocation = self._allocation(inode)
        if isinstance(allocation, View):
            return _attributes(inode, allocation.image.index.inode(inode - allocation.base), allocation.shift)
        if isinstance(allocation, _ShiftDirectory):
            return self._directory_attributes(inode, 2 + len(allocation.views), allocation.changed_ns)
        raise _not_found(f"no image inode {inode}")

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
        allocation = self._allocation(inode)
        if inode == ROOT_INODE:
            names = [(IMAGES_NAME, IMAGES_INODE), (SHIFTED_NAME, SHIFTED_INODE)]
        elif inode == IMAGES_INODE:
            names = [(image.digest.encode(), image.base) for image in self._images]
        elif inode == SHIFTED_INODE:
            names = [(directory.shift.name.encode(), directory.inode)
                     for directory in self._shift_directories.values()]
        elif isinstance(allocation, _ShiftDirectory):
            names = [(digest.encode(), view.base) for digest, view in allocation.views.items()]
        else:
            view, local = self._locate(inode)
            index = view.image.index
            if not stat.S_ISDIR(index.inode(local).mode):
                raise FilesystemError(errno.ENOTDIR, f"inode {inode} is not a directory")
            for position, name, child in index.entries(local, start):
                yield position + 1, name, view.base + child
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
            view, local = self._locate(inode)
            if stat.S_ISLNK(view.image.index.inode(local).mode):
                return view.image.index.readlink(local)
        else:
            self.getattr(inode)
        raise FilesystemError(errno.EINVAL, f"inode {inode} is not a symbolic link")

    def listxattr(self, inode: int) -> list[bytes]:
        """Return the names of an inode's extended attributes, sorted."""
        if not self.is_image_inode(inode):
            self.getattr(inode)
            return []
        view, local = self._locate(inode)
        return sorted(view.image.index.xattrs(local))

    def getxattr(self, inode: int, name: bytes) -> bytes:
        """Return one extended attribute's value; raise ENODATA if the inode has none of that name."""
        value = None
        if self.is_image_inode(inode):
            view, local = self._locate(inode)
            value = view.image.index.xattrs(local).get(name)
        else:
            self.getattr(inode)
        if value is None:
            raise FilesystemError(errno.ENODATA, f"inode {inode} has no extended attribute {name!r}")
        return value if view.shift is None else view.shift.xattr(name, value)

    def statfs(self) -> FsStats:
        """Return file system totals: the attached images' file bytes and inode counts.

        Shifted views show the same files again, so they add nothing.
        """
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
        view, local = self._locate(inode)
        image = view.image
        record = image.index.inode(local)
        end = min(record.size, offset + size)
        if offset >= end:
            return b""
        extents = image.index.extents(local, offset, size)
        if self.readahead_chunks:
            # Keyed by the plain view's inode, so reads through any view of a
            # file continue one stream.
            self._read_ahead(image, image.base + local, local, offset, end, extents)
        numbers = sorted({extent.chunk for extent in extents})
        if self.on_chunks_read is not None:
            self.on_chunks_read(image, numbers)
        chunks = await self._fetch_chunks(image, numbers)
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
                with image_context(image.digest):
                    fetched = await self.chain.fetch_ahead(address)
            if fetched is None:
                self.counters["prefetch_errors"] += 1
            else:
                image.count_prefetch(fetched)
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
            with image_context(image.digest):
                fetched = await self.chain.fetch(address)
                if len(fetched.data) != length and not fetched.remote:
                    # A cache tier's own checksum passed, but the bytes are not
                    # the chunk: drop every cached copy and fetch it from a store.
                    log.warning("cached chunk %s of image %s is %d bytes, but the index records %d; "
                                "dropping it and fetching it again", address.hex(), image.digest,
                                len(fetched.data), length)
                    await self.chain.discard(address)
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
    return index, index.file_bytes


def _digest_name(name: bytes) -> str:
    """Return an image directory's name as an index digest; raise ENOENT for any other name."""
    if not _DIGEST_NAME.fullmatch(name):
        raise _not_found(f"{name!r} is not an index digest (64 lowercase hex digits)")
    return name.decode()


def _attributes(inode: int, record: Inode, shift: IdShift | None = None) -> Attributes:
    size = record.size
    blocks = -(-size // 512) if stat.S_ISREG(record.mode) else 0
    uid, gid = record.uid, record.gid
    if shift is not None:
        uid, gid = shift.uid(uid), shift.gid(gid)
    return Attributes(st_ino=inode, st_mode=record.mode, st_nlink=record.nlink, st_uid=uid,
                      st_gid=gid, st_size=size, st_blocks=blocks, st_blksize=BLOCK_SIZE,
                      st_rdev=record.rdev, st_mtime_ns=record.mtime_ns)
