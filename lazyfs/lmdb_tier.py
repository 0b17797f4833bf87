"""The local disk tier: chunks in one LMDB environment, bounded by bytes.

Key layout, four named databases in the environment at ``path``::

    chunks  address (32 bytes) -> checksum (8 bytes) + stored chunk object
            the object as the store holds it (``lazyfs.chunk``: a codec byte,
            then a zstd frame or the raw bytes), so a chunk takes its
            compressed size on disk; reads decompress it
            checksum = XXH3-64, big-endian, of the address followed by the object
    ticks   address -> tick of the entry's last recorded use (u64 big-endian)
    lru     tick (u64 big-endian) + address -> size of the chunks value (u64 big-endian)
            LMDB keeps keys sorted, so a cursor walks entries oldest first
    meta    b"version"    -> FORMAT_VERSION (u64 big-endian)
            b"used_bytes" -> sum of the sizes of all chunks values (u64 big-endian)
            b"tick"       -> the last tick handed out (u64 big-endian)

Eviction order approximates least recently used. Every write transaction takes
the next tick. A read writes nothing: it records the address in memory, and the
next write transaction (a put, or a flush after TOUCH_BATCH reads) moves those
entries to its tick. Reads not yet flushed do not count, and entries moved in
the same transaction leave in address order.

Budget: ``capacity_bytes`` bounds the sum of the chunks values (stored objects
plus 8 bytes each). A put that would exceed it first evicts the oldest entries until
the usage is at most LOW_WATER_FRACTION of the budget, so eviction runs in
batches and not on every put. LMDB needs more room than the values for its
B-tree pages and copy-on-write, so the map is larger than the budget
(``default_map_size``). The map size is fixed, so a full map (MapFullError) can
still happen when the map is small for the budget. A full disk can happen too,
when the file system has less free space than the budget. LMDB reports that
as a failed commit (EIO), which the tier takes for a full disk when the file
system has less than DISK_FULL_FREE_BYTES free. In both cases a quarter of the
bytes are evicted and the write is retried, because LMDB reuses the freed
pages instead of growing the file. If even that eviction fails, the cache is
emptied. A write that still fails is dropped and counted, and a batch of
chunks is then retried one chunk per transaction, so a reader never sees an
error from this tier. The first full map and the first full disk are each
logged once as a warning with the bytes in use, the budget, the map size and
the free space. Later ones are counted in ``map_full`` and ``disk_full`` and
logged at DEBUG.

Integrity: every read recomputes the checksum. An entry that fails it, or
whose object does not decompress, is deleted and counted in ``corrupt``, and
the read is a miss, so the chain refetches the chunk from a store, which
verifies it against its SHA-256 address. Fills from a store keep the object
that the store tier verified; a put of bare chunk bytes compresses them first.

Durability: the environment is opened with ``sync=False, metasync=False``, so
commits do not wait for fsync. A daemon crash loses nothing, because the
writes are in the kernel's page cache. A system crash can lose the last
transactions, and the MDB_NOSYNC documentation of LMDB 0.9 warns that it can
corrupt the database unless the filesystem preserves write order. So the tier
writes the kernel's boot id to OPEN_MARKER when it opens and removes the file
when it closes cleanly. A marker from an earlier boot means the system went
down while the cache was open, and the cache is emptied at start. So is an
environment that LMDB cannot open, or one of another FORMAT_VERSION.

Threads: reads run in up to ``read_concurrency`` worker threads at once; writes
run one at a time, under a trio lock, in a worker thread. Processes: one tier
owns the directory at a time, through an flock on LOCK_FILE.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import lmdb
import trio
import xxhash

from . import chunk
from .errors import IntegrityError
from .logutil import image_phrase
from .tiers import Chunk, Tier

log = logging.getLogger(__name__)

# Version 1 kept uncompressed chunks; an environment of it is emptied at open.
FORMAT_VERSION = 2
TOUCH_BATCH = 256
LOW_WATER_FRACTION = 0.9
MAX_WRITE_ATTEMPTS = 3
# A write that fails while the file system has less than this free is taken as
# a full disk: a put_many batch is at most 16 chunks of about 1 MiB, plus pages.
DISK_FULL_FREE_BYTES = 64 << 20

CHECKSUM_BYTES = 8
_U64 = struct.Struct(">Q")
_META_VERSION = b"version"
_META_USED = b"used_bytes"
_META_TICK = b"tick"
_DATA_FILES = ("data.mdb", "lock.mdb")
OPEN_MARKER = "open-boot-id"
LOCK_FILE = "owner.lock"
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"



class _Corrupt(NamedTuple):
    """Read result for an entry that must be dropped, with the reason."""

    reason: str


class _DamagedMeta(Exception):
    """A value of the meta database has the wrong length."""

# One step of a write transaction: (transaction, tick, counters) -> None.
WriteStep = Callable[[lmdb.Transaction, bytes, Counter], None]


def default_map_size(capacity_bytes: int) -> int:
    """Return the LMDB map size for a byte budget: 1.5 times it plus 64 MiB.

    The margin covers B-tree pages and copy-on-write space. It is an estimate;
    MapFullError handling covers the cases where it is not enough.
    """
    return capacity_bytes + capacity_bytes // 2 + (64 << 20)


def checksum(address: bytes, data: bytes | memoryview) -> bytes:
    """Return the 8-byte XXH3-64 checksum that guards one cache entry."""
    hasher = xxhash.xxh3_64(address)
    hasher.update(data)
    return hasher.digest()


class LmdbTier(Tier):
    """Verified chunks on local disk that survive restarts; see the module docstring."""

    fill_in_background = True

    def __init__(self, path: str | Path, capacity_bytes: int, *, map_size_bytes: int | None = None,
                 name: str = "disk", read_concurrency: int = 4):
        super().__init__()
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, not {capacity_bytes}")
        self.name = name
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.map_size_bytes = map_size_bytes or default_map_size(capacity_bytes)
        self.used_bytes = 0
        self._read_limiter = trio.CapacityLimiter(read_concurrency)
        self._write_lock = trio.Lock()
        self._touches: set[bytes] = set()
        self._closed = False
        # Kinds of trouble ("map_full", "disk_full", ...) already logged as a warning.
        self._warned: set[str] = set()
        self._lock_file = None
        try:
            self._open_checked()
        except BaseException:
            # The directory lock dies with the failed tier, not with the process.
            if self._lock_file is not None:
                self._lock_file.close()
            raise

    # -- opening -----------------------------------------------------------

    def _open_checked(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_directory()
        self._discard_after_system_crash()
        try:
            self._open_env()
            self._check_format()
        except (lmdb.Error, _DamagedMeta) as exc:
            log.warning("disk cache %s cannot be opened (%s); removing it and starting empty",
                        self.path, exc)
            self._remove_files()
            self._open_env()
            self._check_format()
        if self.used_bytes > self.capacity_bytes:
            log.info("disk cache %s uses %d bytes, more than its %d-byte budget; evicting",
                     self.path, self.used_bytes, self.capacity_bytes)
            self.counters.update(self._write_sync(self._shrink_to_budget, set()))
        (self.path / OPEN_MARKER).write_text(_boot_id())
        log.info("disk cache %s opened: %d bytes in use of %d, map size %d",
                 self.path, self.used_bytes, self.capacity_bytes, self.map_size_bytes)

    def _check_file_size(self) -> None:
        """Raise lmdb.CorruptedError when data.mdb is shorter than its meta page claims.

        LMDB maps the file, so reading a page past a truncated end would kill
        the daemon with SIGBUS instead of raising an error.
        """
        expected = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        actual = (self.path / "data.mdb").stat().st_size
        if actual < expected:
            raise lmdb.CorruptedError(f"data.mdb has {actual} bytes, its meta page needs {expected}")

    def _lock_directory(self) -> None:
        # One owner at a time: the open marker and the byte accounting assume it.
        self._lock_file = open(self.path / LOCK_FILE, "a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise OSError(errno.EBUSY, f"disk cache {self.path} is in use by another process") from None

    def _discard_after_system_crash(self) -> None:
        marker = self.path / OPEN_MARKER
        try:
            opened_in_boot = marker.read_text()
        except FileNotFoundError:
            return
        if opened_in_boot != _boot_id():
            log.warning("disk cache %s was open when the system went down (boot %s); "
                        "emptying it, because unsynced LMDB writes may have corrupted it",
                        self.path, opened_in_boot.strip())
            self._remove_files()

    def _open_env(self) -> None:
        # Readahead stays on: a chunk is one value of about 1 MiB read whole, and
        # with MADV_RANDOM each of its pages faulted in separately (measured 17x
        # slower for a cold page cache on the small-image boot benchmark).
        self._env = lmdb.open(
            str(self.path), map_size=self.map_size_bytes, max_dbs=4, subdir=True,
            sync=False, metasync=False, readahead=True, mode=0o600)
        self._check_file_size()
        self._chunks = self._env.open_db(b"chunks")
        self._ticks = self._env.open_db(b"ticks")
        self._lru = self._env.open_db(b"lru")
        self._meta = self._env.open_db(b"meta")

    def _remove_files(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None
        for name in _DATA_FILES:
            (self.path / name).unlink(missing_ok=True)

    def _check_format(self) -> None:
        with self._env.begin(write=True) as txn:
            for key in (_META_VERSION, _META_USED, _META_TICK):
                value = txn.get(key, db=self._meta)
                if value is not None and len(value) != _U64.size:
                    raise _DamagedMeta(f"meta value {key.decode()} is {len(value)} bytes, not {_U64.size}")
            version = txn.get(_META_VERSION, db=self._meta)
            if version is not None and _U64.unpack(version)[0] != FORMAT_VERSION:
                log.warning("disk cache %s has format version %d, not %d; emptying it",
                            self.path, _U64.unpack(version)[0], FORMAT_VERSION)
                self._drop_all(txn)
            txn.put(_META_VERSION, _U64.pack(FORMAT_VERSION), db=self._meta)
            self.used_bytes = self._used(txn)

    # -- reads -------------------------------------------------------------

    async def get(self, address: bytes) -> bytes | None:
        if self._closed:
            raise RuntimeError(f"disk cache {self.path} is closed")
        try:
            result = await trio.to_thread.run_sync(self._read, address, limiter=self._read_limiter)
        except lmdb.Error as exc:
            self.counters["errors"] += 1
            self.counters["misses"] += 1
            log.warning("disk cache read of chunk %s failed, treating it as a miss: %s",
                        address.hex(), exc)
            return None
        if result is None:
            self.counters["misses"] += 1
            return None
        if isinstance(result, _Corrupt):
            self.counters["misses"] += 1
            await self._drop_corrupt(address, result.reason)
            return None
        self.counters["hits"] += 1
        self.counters["bytes_served"] += len(result)
        self._touches.add(address)
        if len(self._touches) >= TOUCH_BATCH and not self._write_lock.locked():
            await self._write(None)
        return result

    async def discard(self, address: bytes) -> None:
        await self._drop_corrupt(address, "is not the chunk the index records")

    async def _drop_corrupt(self, address: bytes, reason: str) -> None:
        """Count, log and delete an entry that must not be served again."""
        self.counters["corrupt"] += 1
        log.warning("disk cache entry for chunk %s%s %s; dropping it", address.hex(), image_phrase("of"), reason)
        try:
            await self._write(lambda txn, tick, counts: self._delete(txn, address, counts))
        except (lmdb.Error, struct.error, ValueError) as exc:
            # The entry stays, but the refetched chunk overwrites it on fill.
            self.counters["errors"] += 1
            log.warning("dropping the corrupt disk cache entry for chunk %s failed: %s", address.hex(), exc)

    def _read(self, address: bytes) -> bytes | _Corrupt | None:
        with self._env.begin(db=self._chunks, buffers=True) as txn:
            value = txn.get(address)
            if value is None:
                return None
            if len(value) < CHECKSUM_BYTES:
                return _Corrupt("is shorter than its checksum")
            stored = value[CHECKSUM_BYTES:]
            if bytes(value[:CHECKSUM_BYTES]) != checksum(address, stored):
                return _Corrupt("failed its XXH3 check")
            try:
                return chunk.unpack(stored, address)
            except IntegrityError as exc:
                return _Corrupt(f"passed its XXH3 check but does not decode ({exc})")

    # -- writes ------------------------------------------------------------

    async def put(self, address: bytes, data: bytes) -> None:
        await self.fill([(address, Chunk(data))])

    async def put_many(self, chunks: list[tuple[bytes, bytes]]) -> None:
        """Store several chunks in one write transaction."""
        await self.fill([(address, Chunk(data)) for address, data in chunks])

    async def fill(self, chunks: list[tuple[bytes, Chunk]]) -> None:
        """Store several chunks in one write transaction, as the store's objects where given."""
        if self._closed:
            raise RuntimeError(f"disk cache {self.path} is closed")
        if any(fetched.stored is None for _address, fetched in chunks):
            # Bare chunk bytes (not from a store) are compressed like the indexer does.
            chunks = await trio.to_thread.run_sync(_with_stored_objects, chunks)
        accepted = []
        for address, fetched in chunks:
            if CHECKSUM_BYTES + len(fetched.stored) > self.capacity_bytes:
                self.counters["rejected"] += 1
            else:
                accepted.append((address, fetched.stored))
        if not accepted:
            return
        if await self._write(self._insert_all(accepted)) or len(accepted) == 1:
            return
        # LMDB reuses pages freed by eviction only in a later transaction, so
        # a batch can fail where its chunks fit one at a time.
        for entry in accepted:
            await self._write(self._insert_all([entry]))

    def _insert_all(self, entries: list[tuple[bytes, bytes]]) -> WriteStep:
        def insert_all(txn: lmdb.Transaction, tick: bytes, counts: Counter) -> None:
            for address, stored in entries:
                self._insert(txn, tick, address, stored, counts)

        return insert_all

    async def _write(self, step: WriteStep | None) -> bool:
        """Run ``step`` in a write transaction; return False when it was dropped."""
        async with self._write_lock:
            touches, self._touches = self._touches, set()
            counts = await trio.to_thread.run_sync(self._write_sync, step, touches)
        self.counters.update(counts)
        return not counts["put_failures"]

    def _write_sync(self, step: WriteStep | None, touches: set[bytes]) -> Counter:
        """Run one write transaction: record reads, then ``step``; recover from a full map or disk."""
        counts: Counter[str] = Counter()
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            attempt_counts: Counter[str] = Counter()
            try:
                with self._env.begin(write=True) as txn:
                    tick = self._next_tick(txn)
                    self._apply_touches(txn, tick, touches)
                    if step is not None:
                        step(txn, tick, attempt_counts)
                    used = self._used(txn)
            except lmdb.MapFullError:
                counts["map_full"] += 1
                self._report_full("map_full", "the LMDB map is full",
                                  "raise disk_cache_map_bytes or lower disk_cache_bytes")
                self._free_map_space(counts)
                continue
            except lmdb.Error:
                if self._free_disk_bytes() >= DISK_FULL_FREE_BYTES:
                    raise
                counts["disk_full"] += 1
                self._report_full("disk_full", "the file system is full",
                                  "lower disk_cache_bytes or free space on that file system")
                self._free_map_space(counts)
                continue
            counts.update(attempt_counts)
            self.used_bytes = used
            return counts
        counts["put_failures"] += 1
        self._warn_once("write_dropped", "disk cache %s: a write failed %d times for lack of space; "
                        "dropping it", self.path, MAX_WRITE_ATTEMPTS)
        return counts

    def _report_full(self, counter: str, condition: str, remedy: str) -> None:
        self._warn_once(counter, "disk cache %s: %s (%d bytes of chunks in use, budget %d bytes, "
                        "map size %d bytes, %d bytes free on the file system). Evicting the oldest "
                        "entries; later cases are only counted in %s. To keep more cached, %s",
                        self.path, condition, self.used_bytes, self.capacity_bytes, self.map_size_bytes,
                        self._free_disk_bytes(), counter, remedy)

    def _warn_once(self, kind: str, message: str, *args) -> None:
        """Log ``message`` as a warning the first time ``kind`` happens, later at DEBUG."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, message, *args)

    def _free_disk_bytes(self) -> int:
        """Return the bytes that unprivileged writers may still use on the cache's file system."""
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def _insert(self, txn: lmdb.Transaction, tick: bytes, address: bytes, stored: bytes,
                counts: Counter) -> None:
        if txn.get(address, db=self._ticks) is not None:
            return
        value = checksum(address, stored) + stored
        used = self._used(txn)
        if used + len(value) > self.capacity_bytes:
            target = max(0, int(self.capacity_bytes * LOW_WATER_FRACTION) - len(value))
            used -= self._evict(txn, used - target, counts)
        txn.put(address, value, db=self._chunks)
        txn.put(tick + address, _U64.pack(len(value)), db=self._lru)
        txn.put(address, tick, db=self._ticks)
        self._set_used(txn, used + len(value))
        counts["puts"] += 1

    def _delete(self, txn: lmdb.Transaction, address: bytes, counts: Counter) -> None:
        tick = txn.pop(address, db=self._ticks)
        txn.delete(address, db=self._chunks)
        if tick is None:
            return
        size = txn.pop(tick + address, db=self._lru)
        if size is not None:
            self._set_used(txn, self._used(txn) - _U64.unpack(size)[0])
        counts["deleted"] += 1

    def _evict(self, txn: lmdb.Transaction, bytes_to_free: int, counts: Counter) -> int:
        """Delete the oldest entries until ``bytes_to_free`` bytes are free; return the bytes freed."""
        freed = 0
        cursor = txn.cursor(db=self._lru)
        if not cursor.first():
            return 0
        while freed < bytes_to_free:
            key = cursor.key()
            if not key:
                break
            address = key[8:]
            freed += _U64.unpack(cursor.value())[0]
            txn.delete(address, db=self._chunks)
            txn.delete(address, db=self._ticks)
            cursor.delete()
            counts["evictions"] += 1
        self._set_used(txn, self._used(txn) - freed)
        return freed

    def _shrink_to_budget(self, txn: lmdb.Transaction, tick: bytes, counts: Counter) -> None:
        used = self._used(txn)
        target = int(self.capacity_bytes * LOW_WATER_FRACTION)
        if used > self.capacity_bytes:
            self._evict(txn, used - target, counts)

    def _apply_touches(self, txn: lmdb.Transaction, tick: bytes, touches: set[bytes]) -> None:
        for address in sorted(touches):
            old_tick = txn.get(address, db=self._ticks)
            if old_tick is None or old_tick == tick:
                continue
            size = txn.pop(old_tick + address, db=self._lru)
            if size is None:
                continue
            txn.put(tick + address, size, db=self._lru)
            txn.put(address, tick, db=self._ticks)

    def _free_map_space(self, counts: Counter) -> None:
        """Make room after a full map or disk: evict a quarter of the bytes, or empty the cache."""
        try:
            with self._env.begin(write=True) as txn:
                self._evict(txn, max(1, self._used(txn) // 4), counts)
                used = self._used(txn)
            self.used_bytes = used
        except lmdb.Error as exc:
            self._warn_once("reset", "disk cache %s: evicting failed (%s); dropping every entry",
                            self.path, exc)
            with self._env.begin(write=True) as txn:
                self._drop_all(txn)
            self.used_bytes = 0
            counts["resets"] += 1

    def _drop_all(self, txn: lmdb.Transaction) -> None:
        for db in (self._chunks, self._ticks, self._lru):
            txn.drop(db, delete=False)
        self._set_used(txn, 0)

    def _next_tick(self, txn: lmdb.Transaction) -> bytes:
        raw = txn.get(_META_TICK, db=self._meta)
        tick = _U64.pack((_U64.unpack(raw)[0] if raw else 0) + 1)
        txn.put(_META_TICK, tick, db=self._meta)
        return tick

    def _used(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_META_USED, db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    def _set_used(self, txn: lmdb.Transaction, used: int) -> None:
        # A damaged size record must not drive the total below zero.
        txn.put(_META_USED, _U64.pack(max(0, used)), db=self._meta)

    # -- state -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        result = {"hits": 0, "misses": 0, "bytes_served": 0, "puts": 0, "evictions": 0,
                  "corrupt": 0, "map_full": 0, "disk_full": 0, "put_failures": 0}
        result.update(self.counters)
        entries = 0
        if not self._closed:
            with self._env.begin() as txn:
                entries = txn.stat(self._chunks)["entries"]
        result.update(entries=entries, used_bytes=self.used_bytes,
                      capacity_bytes=self.capacity_bytes, map_size_bytes=self.map_size_bytes)
        return result

    async def aclose(self) -> None:
        """Record pending reads, sync the environment to disk and close it."""
        if self._closed:
            return
        if self._touches:
            await self._write(None)
        async with self._write_lock:
            self._closed = True
            await trio.to_thread.run_sync(self._sync_and_close)

    def _sync_and_close(self) -> None:
        self._env.sync(True)
        self._env.close()
        (self.path / OPEN_MARKER).unlink(missing_ok=True)
        self._lock_file.close()
        log.info("disk cache %s closed", self.path)


def _boot_id() -> str:
    """Return the kernel's random id of the current boot."""
    with open(_BOOT_ID_PATH) as boot_id:
        return boot_id.read()


def _with_stored_objects(chunks: list[tuple[bytes, Chunk]]) -> list[tuple[bytes, Chunk]]:
    """Return the chunks with each missing store object made by ``lazyfs.chunk.encode``."""
    result = []
    for address, fetched in chunks:
        if fetched.stored is None:
            fetched = Chunk(fetched.data, chunk.encode(fetched.data))
        result.append((address, fetched))
    return result
