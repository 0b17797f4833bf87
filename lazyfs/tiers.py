"""Cache tiers behind one interface, and the chain that queries them in order.

A tier maps a chunk address (the 32-byte SHA-256 of the uncompressed chunk) to
the chunk's uncompressed bytes::

    await tier.get(address) -> bytes | None   None is a miss
    await tier.get_chunk(address)             the same as a Chunk, with the store's
                                              encoded object when the tier has it
    await tier.put(address, data)             data has already been verified
    await tier.put_many([(address, data)])    several puts, at once where the tier can
    await tier.fill([(address, chunk)])       put_many of Chunks; the chain's fills
    await tier.discard(address)               drop a cached chunk a reader found wrong
    tier.has_room(size) -> bool               whether a put fits without an eviction
    tier.stats() -> dict[str, int]            counters for the control socket
    await tier.aclose()                       flush and release resources

The tiers are ``RamTier`` (here), ``LmdbTier`` (``lazyfs.lmdb_tier``) and
``StoreTier`` (``lazyfs.store_tier``). Only a store tier receives bytes from
outside the process, and it verifies them against their address before it
returns them, so no tier is ever handed unverified bytes. It also hands the
chain the encoded object it read (``Chunk.stored``), so that the LMDB tier
keeps chunks compressed without compressing them again.

``TierChain`` queries its tiers nearest first. When tier k has the chunk, the chain
puts it into tiers 0..k-1, so the next read is served nearer. A nearer store is
filled from a farther one the same way. Tiers whose ``fill_in_background`` is
false (the RAM tier) are filled before the reader gets the chunk, except that a
background prefetch (``lazyfs.prefetch.background_fetches``) fills them only
while ``has_room`` is true, so it never evicts a reader's chunks. The others
(the LMDB tier, stores) are filled by one background task, so no reader waits
for a disk write or an upload. Concurrency rules, all within one trio run:

- At most one fetch of an address runs at a time. Readers that arrive while it
  runs wait for it and share its result or its error. If the fetching task is
  cancelled, one of the waiters starts a new fetch.
- The foreground fills happen before the waiters wake up, so a reader that
  arrives after a fetch finds the chunk in the nearest tier, unless that tier
  declined or already evicted it, and starts no second fetch. A chunk waiting
  for a background fill is served from the fill queue too.
- Background fills wait in a queue of ``fill_queue_size`` chunks. A fill that
  finds the queue full is dropped and counted in ``fills_dropped``: the chunk
  is still served, and a later read fetches it again. The worker starts with
  the first background fill, as a trio system task, and ``aclose`` lets it
  finish the queue before it closes the tiers.
- A definite failure (bytes that do not match their address, or a chunk the
  last store does not have) is remembered for ``failure_ttl_s`` seconds, and
  reads of that address fail at once instead of refetching. Temporary failures
  (timeouts, unreachable stores) are not remembered.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, OrderedDict
from typing import Callable, NamedTuple

import trio

from .errors import IntegrityError, ObjectNotFound, StoreError, StoreUnavailable
from .logutil import RateLimitedLog, image_phrase
from .prefetch import in_background
from .refs import chunk_key

log = logging.getLogger(__name__)
# A full disk fails every fill, so fill failures are logged once a minute per tier.
_fill_log = RateLimitedLog(log)

DEFAULT_FAILURE_TTL_S = 10.0

# Chunks that may wait for a background fill. A queued chunk keeps its bytes
# (about 1 MiB) and the store's object (at most as large), so a full queue adds
# up to twice this many MiB to the memory that the tiers use.
DEFAULT_FILL_QUEUE_SIZE = 64

# Queued fills written to one tier in one put_many call, at most.
FILL_BATCH_CHUNKS = 16

# A store that timed out or kept failing is asked again after this long. The
# kernel retries a failed readahead as a single-page read right away, which
# would otherwise wait a second full fetch timeout.
DEFAULT_UNAVAILABLE_TTL_S = 2.0

# Expired entries of the failure memory are swept once it contains this many.
_FAILURE_SWEEP_ENTRIES = 4096


class Chunk(NamedTuple):
    """Verified chunk bytes, and the store's encoded object (``lazyfs.chunk``) when there is one."""

    data: bytes
    stored: bytes | None = None


class Tier:
    """Interface of one cache level; see the module docstring."""

    name: str = "tier"
    # True for tiers whose bytes come from outside this machine (stores).
    remote: bool = False
    # True for tiers whose put is slow (a disk write, an upload): the chain then
    # fills them after the reader has the chunk.
    fill_in_background: bool = False

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    async def get(self, address: bytes) -> bytes | None:
        """Return the chunk's uncompressed bytes, or None on a miss."""
        raise NotImplementedError

    async def get_chunk(self, address: bytes) -> Chunk | None:
        """Return the chunk as a Chunk, or None on a miss; only a store tier sets ``stored``."""
        data = await self.get(address)
        return None if data is None else Chunk(data)

    async def put(self, address: bytes, data: bytes) -> None:
        """Store verified chunk bytes; a tier may decline to keep them."""
        raise NotImplementedError

    async def put_many(self, chunks: list[tuple[bytes, bytes]]) -> None:
        """Store several verified (address, data) chunks; a tier may write them at once."""
        for address, data in chunks:
            await self.put(address, data)

    async def fill(self, chunks: list[tuple[bytes, Chunk]]) -> None:
        """Store several verified chunks that the chain fetched from a farther tier."""
        await self.put_many([(address, chunk.data) for address, chunk in chunks])

    async def discard(self, address: bytes) -> None:
        """Drop a cached chunk that a reader found wrong; only cache tiers keep anything to drop."""

    def has_room(self, size: int) -> bool:
        """Return whether a put of ``size`` bytes would fit without evicting anything."""
        return True

    def stats(self) -> dict[str, int]:
        """Return a snapshot of this tier's counters and gauges."""
        return dict(self.counters)

    async def aclose(self) -> None:
        """Flush pending state and release resources."""


class RamTier(Tier):
    """Uncompressed chunks in process memory, bounded by bytes, least recently used out first."""

    def __init__(self, capacity_bytes: int, name: str = "ram"):
        super().__init__()
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, not {capacity_bytes}")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    async def get(self, address: bytes) -> bytes | None:
        data = self._entries.get(address)
        if data is None:
            self.counters["misses"] += 1
            return None
        self._entries.move_to_end(address)
        self.counters["hits"] += 1
        self.counters["bytes_served"] += len(data)
        return data

    async def put(self, address: bytes, data: bytes) -> None:
        size = len(data)
        if size > self.capacity_bytes:
            self.counters["rejected"] += 1
            return
        if address in self._entries:
            self._entries.move_to_end(address)
            return
        while self.used_bytes + size > self.capacity_bytes:
            _evicted, old = self._entries.popitem(last=False)
            self.used_bytes -= len(old)
            self.counters["evictions"] += 1
        self._entries[address] = data
        self.used_bytes += size
        self.counters["puts"] += 1

    async def discard(self, address: bytes) -> None:
        data = self._entries.pop(address, None)
        if data is not None:
            self.used_bytes -= len(data)
            self.counters["discarded"] += 1

    def has_room(self, size: int) -> bool:
        return self.used_bytes + size <= self.capacity_bytes

    def stats(self) -> dict[str, int]:
        result = {"hits": 0, "misses": 0, "bytes_served": 0, "puts": 0, "evictions": 0}
        result.update(self.counters)
        result.update(entries=len(self._entries), used_bytes=self.used_bytes,
                      capacity_bytes=self.capacity_bytes)
        return result


class ChunkFetch(NamedTuple):
    """A chunk returned by ``TierChain.fetch`` and where it came from."""

    data: bytes
    # Name of the tier that had the chunk.
    source: str
    # Whether that tier is remote (a store), so the bytes crossed the network.
    remote: bool
    # True when this reader waited for another reader's fetch instead of fetching.
    joined: bool


class _Flight:
    """One fetch of one address in progress; waiters block on ``done``."""

    __slots__ = ("done", "result", "error", "abandoned")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: ChunkFetch | None = None
        self.error: Exception | None = None
        self.abandoned = False


class TierChain:
    """Tiers asked nearest first, with single-flight fetches and fills on a miss."""

    def __init__(self, tiers: list[Tier], failure_ttl_s: float = DEFAULT_FAILURE_TTL_S,
                 fill_queue_size: int = DEFAULT_FILL_QUEUE_SIZE):
        if not tiers:
            raise ValueError("a tier chain needs at least one tier")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        if fill_queue_size < 0:
            raise ValueError(f"fill_queue_size must be >= 0, not {fill_queue_size}")
        self.tiers = list(tiers)
        self.failure_ttl_s = failure_ttl_s
        self.fill_queue_size = fill_queue_size
        self.counters: Counter[str] = Counter()
        self._flights: dict[bytes, _Flight] = {}
        self._failures: dict[bytes, tuple[float, Exception]] = {}
        # Chunks queued for a background fill, by address, each with the
        # tiers still to fill; a fetch of a queued address is served from here.
        self._fill_queue: OrderedDict[bytes, tuple[Chunk, list[Tier]]] = OrderedDict()
        self._fill_wakeup = trio.Event()
        self._fill_worker_running = False
        self._fills_idle = trio.Event()
        self._fills_idle.set()
        # Set and replaced each time a queued fill finishes.
        self._fill_progress = trio.Event()
        self._closing = False
        # Called as get_observer(tier name, "hit" | "miss" | "error", seconds)
        # after every tier.get, for the latency metrics; None records nothing.
        self.get_observer: Callable[[str, str, float], None] | None = None

    async def get(self, address: bytes) -> bytes:
        """Return the chunk's verified bytes; raise StoreError or IntegrityError."""
        return (await self.fetch(address)).data

    async def fetch_ahead(self, address: bytes) -> ChunkFetch | None:
        """Fetch a chunk before any reader asks for it; return None when the fetch fails.

        A failure is only logged, because the chain remembers definite failures,
        so a demand read of the chunk fails the same way and reports it.
        """
        try:
            return await self.fetch(address)
        except (StoreError, IntegrityError) as exc:
            log.debug("prefetching chunk %s%s failed: %s", address.hex(), image_phrase("of"), exc)
        except Exception:
            # For example a disk tier closed by a shutdown while this ran.
            log.warning("prefetching chunk %s%s failed", address.hex(), image_phrase("of"), exc_info=True)
        return None

    async def fetch(self, address: bytes) -> ChunkFetch:
        """Return the chunk with the name of the tier that had it.

        Raises ObjectNotFound when no tier has the chunk, IntegrityError when a
        store returned wrong bytes, and StoreError when a store failed.
        """
        self._raise_if_failed_recently(address)
        while True:
            flight = self._flights.get(address)
            if flight is None:
                break
            await flight.done.wait()
            if flight.abandoned:
                continue
            if flight.error is not None:
                raise flight.error
            self.counters["joined"] += 1
            return flight.result._replace(joined=True)
        return await self._lead_flight(address)

    async def _lead_flight(self, address: bytes) -> ChunkFetch:
        flight = _Flight()
        self._flights[address] = flight
        try:
            flight.result = await self._fetch_through_tiers(address)
            return flight.result
        except Exception as exc:
            flight.error = exc
            if isinstance(exc, (IntegrityError, ObjectNotFound)):
                self._remember_failure(address, exc, self.failure_ttl_s)
            elif isinstance(exc, StoreUnavailable):
                self._remember_failure(address, exc, DEFAULT_UNAVAILABLE_TTL_S)
            raise
        except BaseException:
            # Cancelled: the waiters did not fail, so one of them fetches again.
            flight.abandoned = True
            raise
        finally:
            del self._flights[address]
            flight.done.set()

    async def _fetch_through_tiers(self, address: bytes) -> ChunkFetch:
        for position, tier in enumerate(self.tiers):
            chunk = self._queued_for(tier, address)
            # A chunk from the fill queue did not cross the network again.
            remote = tier.remote and chunk is None
            if chunk is None:
                chunk = await self._get_from(tier, address)
            if chunk is None:
                continue
            data = chunk.data
            background = []
            for nearer in self.tiers[:position]:
                if nearer.fill_in_background:
                    background.append(nearer)
                elif in_background() and not nearer.has_room(len(data)):
                    # A prefetch never evicts chunks that readers put there.
                    self.counters["prefetch_fills_skipped"] += 1
                else:
                    await self._fill(nearer, address, data)
            if background:
                self._queue_fill(address, chunk, background)
            return ChunkFetch(data, tier.name, remote, False)
        raise ObjectNotFound(chunk_key(address))

    async def _get_from(self, tier: Tier, address: bytes) -> Chunk | None:
        if self.get_observer is None:
            return await tier.get_chunk(address)
        started = time.perf_counter()
        outcome = "error"
        try:
            chunk = await tier.get_chunk(address)
            outcome = "miss" if chunk is None else "hit"
            return chunk
        finally:
            self.get_observer(tier.name, outcome, time.perf_counter() - started)

    def _queued_for(self, tier: Tier, address: bytes) -> Chunk | None:
        """Return the chunk if it waits in the fill queue for ``tier``, else None."""
        queued = self._fill_queue.get(address)
        if queued is None or tier not in queued[1]:
            return None
        self.counters["fill_queue_hits"] += 1
        return queued[0]

    def _queue_fill(self, address: bytes, chunk: Chunk, tiers: list[Tier]) -> None:
        if address in self._fill_queue:
            return
        if self._closing or len(self._fill_queue) >= self.fill_queue_size:
            self.counters["fills_dropped"] += 1
            return
        self._fill_queue[address] = (chunk, tiers)
        self.counters["fills_queued"] += 1
        if self._fills_idle.is_set():
            self._fills_idle = trio.Event()
        self._fill_wakeup.set()
        if not self._fill_worker_running:
            self._fill_worker_running = True
            trio.lowlevel.spawn_system_task(self._run_fill_worker, name="lazyfs tier fills")

    async def _run_fill_worker(self) -> None:
        # A system task: an exception escaping it would end the whole trio run,
        # and _fill_batch catches every Exception of a tier.
        try:
            while True:
                while self._fill_queue:
                    batch = list(itertools.islice(self._fill_queue.items(), FILL_BATCH_CHUNKS))
                    try:
                        await self._fill_batch(batch)
                    finally:
                        # Served from the queue until every tier has them.
                        for address, _queued in batch:
                            del self._fill_queue[address]
                        self._fill_progress.set()
                        self._fill_progress = trio.Event()
                self._fills_idle.set()
                if self._closing:
                    return
                self._fill_wakeup = trio.Event()
                await self._fill_wakeup.wait()
        finally:
            self._fill_worker_running = False
            self._fills_idle.set()

    async def discard(self, address: bytes) -> None:
        """Drop a chunk from every tier that caches it, so the next fetch goes to a store.

        For a chunk that a cache tier returned intact by its own checksum but
        of another length than the index records.
        """
        for tier in self.tiers:
            await tier.discard(address)

    async def wait_for_fill_room(self) -> None:
        """Wait until the fill queue has room, so that a prefetch does not outrun the fills."""
        while len(self._fill_queue) >= self.fill_queue_size and self._fill_worker_running:
            await self._fill_progress.wait()

    async def wait_for_fills(self) -> None:
        """Wait until every queued background fill has finished."""
        while self._fill_queue and self._fill_worker_running:
            await self._fills_idle.wait()

    async def _fill_batch(self, batch: list[tuple[bytes, tuple[Chunk, list[Tier]]]]) -> None:
        """Write queued chunks to their tiers, one fill call per tier."""
        for tier in self.tiers:
            chunks = [(address, chunk) for address, (chunk, tiers) in batch if tier in tiers]
            if not chunks:
                continue
            try:
                await tier.fill(chunks)
            except Exception:
                self.counters["fill_errors"] += len(chunks)
                _fill_log.log(logging.WARNING, tier.name,
                              "filling tier %s with %d chunks (the first %s) failed",
                              tier.name, len(chunks), chunks[0][0].hex(), exc_info=True)

    async def _fill(self, tier: Tier, address: bytes, data: bytes) -> None:
        # A cache that cannot keep a chunk costs a later refetch, never this read.
        try:
            await tier.put(address, data)
        except Exception:
            self.counters["fill_errors"] += 1
            _fill_log.log(logging.WARNING, tier.name, "filling tier %s with chunk %s%s failed",
                          tier.name, address.hex(), image_phrase("of"), exc_info=True)

    def _raise_if_failed_recently(self, address: bytes) -> None:
        failure = self._failures.get(address)
        if failure is None:
            return
        expires_at, error = failure
        if trio.current_time() < expires_at:
            self.counters["failed_fast"] += 1
            raise error
        del self._failures[address]

    def _remember_failure(self, address: bytes, error: Exception, ttl_s: float) -> None:
        now = trio.current_time()
        if len(self._failures) >= _FAILURE_SWEEP_ENTRIES:
            self._failures = {key: value for key, value in self._failures.items() if value[0] > now}
        self._failures[address] = (now + ttl_s, error)

    def stats(self) -> dict[str, dict[str, int]]:
        """Return every tier's counters, keyed by tier name."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def chain_stats(self) -> dict[str, int]:
        """Return the chain's own counters: joined flights, fast failures, fills."""
        result = {"joined": 0, "failed_fast": 0, "fill_errors": 0, "fills_queued": 0,
                  "fills_dropped": 0, "fill_queue_hits": 0}
        result.update(self.counters)
        result["in_flight"] = len(self._flights)
        result["fill_queue"] = len(self._fill_queue)
        return result

    async def aclose(self) -> None:
        """Finish the queued fills, then close every tier, nearest first.

        An error in one tier does not skip the others.
        """
        self._closing = True
        self._fill_wakeup.set()
        await self.wait_for_fills()
        for tier in self.tiers:
            try:
                await tier.aclose()
            except Exception:
                log.exception("closing tier %s failed", tier.name)
