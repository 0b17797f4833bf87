"""The store as a tier: fetch, decode and verify chunks in worker threads.

``lazyfs.store`` is blocking and owns the retry policy. This module bounds how
many fetches run at once (``fetch_concurrency`` worker threads). It also bounds
how long one chunk may take in total (``fetch_timeout_s``), waiting for a free
thread and every retry included. A fetch that times out leaves its thread to finish in
the background. trio releases the limiter slot only when that thread returns,
so timed-out fetches cannot pile up past the bound. Fetches that
``lazyfs.prefetch`` marks as background prefetches run in a separate pool of
``background_concurrency`` threads, so they never take a slot from a demand read.

The stored object is decoded and checked against its address inside the worker
thread (``lazyfs.chunk.decode``), so ``get`` returns verified bytes or raises.
``get_chunk`` returns the stored object too, for the LMDB tier, and a fill of
this tier (a nearer store) uploads that object as it is.
"""

from __future__ import annotations

import trio

from . import chunk
from .errors import IntegrityError, ObjectNotFound, StoreError, StoreUnavailable
from .prefetch import in_background
from .refs import chunk_key
from .store import Store
from .tiers import Chunk, Tier


class StoreTier(Tier):
    """Chunks from a ``Store``.

    ``missing_is_miss`` makes a chunk the store does not have a miss (None), for
    a nearer store that a farther one fills. Without it a missing chunk raises
    ObjectNotFound, because every chunk of a published image must exist.
    The store stays open when the tier closes, because its opener owns it.
    """

    remote = True
    fill_in_background = True

    def __init__(self, store: Store, *, name: str = "store", fetch_concurrency: int = 16,
                 fetch_timeout_s: float = 30.0, missing_is_miss: bool = False,
                 background_concurrency: int = 4):
        super().__init__()
        if fetch_concurrency < 1:
            raise ValueError(f"fetch_concurrency must be >= 1, not {fetch_concurrency}")
        if background_concurrency < 1:
            raise ValueError(f"background_concurrency must be >= 1, not {background_concurrency}")
        if fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be > 0, not {fetch_timeout_s}")
        self.name = name
        self.store = store
        self.fetch_timeout_s = fetch_timeout_s
        self.missing_is_miss = missing_is_miss
        self._limiter = trio.CapacityLimiter(fetch_concurrency)
        # Fetches inside lazyfs.prefetch.background_fetches() use threads of
        # their own, so they never hold a slot that a demand read waits for.
        self._background_limiter = trio.CapacityLimiter(background_concurrency)

    async def get(self, address: bytes) -> bytes | None:
        fetched = await self.get_chunk(address)
        return None if fetched is None else fetched.data

    async def get_chunk(self, address: bytes) -> Chunk | None:
        key = chunk_key(address)
        self.counters["requests"] += 1
        limiter = self._limiter
        if in_background():
            self.counters["background_requests"] += 1
            limiter = self._background_limiter
        try:
            with trio.fail_after(self.fetch_timeout_s):
                fetched = await trio.to_thread.run_sync(
                    self._fetch, key, address, limiter=limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            self.counters["timeouts"] += 1
            raise StoreUnavailable(
                f"fetching {key} from {self.store.url} timed out after {self.fetch_timeout_s:g} s"
            ) from None
        except ObjectNotFound:
            if self.missing_is_miss:
                self.counters["misses"] += 1
                return None
            self.counters["not_found"] += 1
            raise
        except IntegrityError:
            self.counters["integrity_errors"] += 1
            raise
        except StoreError:
            self.counters["errors"] += 1
            raise
        self.counters["bytes"] += len(fetched.stored)
        self.counters["hits"] += 1
        self.counters["bytes_served"] += len(fetched.data)
        return fetched

    def _fetch(self, key: str, address: bytes) -> Chunk:
        stored = self.store.get(key)
        return Chunk(chunk.decode(stored, address), stored)

    async def put(self, address: bytes, data: bytes) -> None:
        await self._put(address, Chunk(data))

    async def fill(self, chunks: list[tuple[bytes, Chunk]]) -> None:
        for address, fetched in chunks:
            await self._put(address, fetched)

    async def _put(self, address: bytes, fetched: Chunk) -> None:
        with trio.fail_after(self.fetch_timeout_s):
            stored_bytes = await trio.to_thread.run_sync(
                self._encode_and_put, address, fetched, limiter=self._limiter, abandon_on_cancel=True)
        self.counters["puts"] += 1
        self.counters["bytes_put"] += stored_bytes

    def _encode_and_put(self, address: bytes, fetched: Chunk) -> int:
        # A chunk from a farther store goes up as the object that store held.
        stored = fetched.stored if fetched.stored is not None else chunk.encode(fetched.data)
        self.store.put(chunk_key(address), stored)
        return len(stored)

    def stats(self) -> dict[str, int]:
        result = {"requests": 0, "bytes": 0, "hits": 0, "misses": 0, "bytes_served": 0,
                  "not_found": 0, "integrity_errors": 0, "errors": 0, "timeouts": 0,
                  "background_requests": 0}
        result.update(self.counters)
        return result
