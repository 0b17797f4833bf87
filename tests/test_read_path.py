"""Reads through the tree and the chain: read-ahead of sequential readers and its priority."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from lazyfs.chunk import encode
from lazyfs.errors import ChunkReadError, IntegrityError
from lazyfs.refs import chunk_key
from lazyfs.store_tier import StoreTier
from lazyfs.tiers import RamTier, TierChain
from lazyfs.tree import IMAGES_INODE, Tree
from tests.support.sample_image import deterministic_bytes, publish_single_file_image
from tests.support.stores import ScriptedStore

CHUNK_BYTES = 64 << 10
READ_BYTES = 16 << 10


@pytest.fixture
def store(tmp_path: Path) -> ScriptedStore:
    return ScriptedStore(tmp_path / "store")


async def open_file(store: ScriptedStore, chunks: int, **options) -> tuple[Tree, int, bytes, list[bytes]]:
    """Publish a file of ``chunks`` chunks; return (tree, inode, data, chunk addresses)."""
    data = deterministic_bytes(7, chunks * CHUNK_BYTES)
    digest, addresses = publish_single_file_image(store, data, chunk_bytes=CHUNK_BYTES)
    fetch_concurrency = options.pop("fetch_concurrency", 16)
    chain = TierChain([RamTier(64 << 20), StoreTier(store, fetch_concurrency=fetch_concurrency)])
    tree = Tree(store, chain, **options)
    root = await tree.lookup(IMAGES_INODE, digest.encode())
    return tree, await tree.lookup(root, b"file.bin"), data, addresses


def fetched_chunks(store: ScriptedStore, addresses: list[bytes]) -> list[int]:
    """Return how often the store sent each chunk, in file order."""
    return [store.gets[chunk_key(address)] for address in addresses]


async def test_sequential_read_prefetches_next_chunks(store):
    tree, inode, data, addresses = await open_file(store, 4)
    fetched_after_chunk = []

    for offset in range(0, len(data), READ_BYTES):
        assert await tree.read(inode, offset, READ_BYTES) == data[offset:offset + READ_BYTES]
        await tree.wait_for_prefetches()
        if (offset + READ_BYTES) % CHUNK_BYTES == 0:
            fetched_after_chunk.append(fetched_chunks(store, addresses))

    # Moving on to chunk 1 prefetches chunk 2; moving on to chunk 2 prefetches
    # the next two, of which only chunk 3 exists.
    assert fetched_after_chunk == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert tree.readahead_stats() == {"prefetches": 2, "prefetches_dropped": 0, "prefetch_errors": 0,
                                      "prefetching": 0}
    status = next(iter(tree.status().values()))
    assert status["prefetched_chunks"] == 2
    assert status["fetched_chunks"] == 4
    assert status["fetched_bytes"] == len(data)
    assert tree.chain.stats()["store"]["requests"] == 4


async def test_sequential_read_prefetches_two_ahead(store):
    tree, inode, data, addresses = await open_file(store, 6)

    for offset in range(0, 3 * CHUNK_BYTES, CHUNK_BYTES):
        assert await tree.read(inode, offset, CHUNK_BYTES) == data[offset:offset + CHUNK_BYTES]
        await tree.wait_for_prefetches()

    assert fetched_chunks(store, addresses) == [1, 1, 1, 1, 1, 0]
    assert tree.readahead_stats()["prefetches"] == 3


async def test_random_reads_prefetch_nothing(store):
    tree, inode, data, addresses = await open_file(store, 4)

    for chunk in (3, 0, 2, 1):
        offset = chunk * CHUNK_BYTES
        assert await tree.read(inode, offset, READ_BYTES) == data[offset:offset + READ_BYTES]
    await tree.wait_for_prefetches()

    assert fetched_chunks(store, addresses) == [1, 1, 1, 1]
    assert tree.readahead_stats()["prefetches"] == 0


async def test_readahead_zero_prefetches_nothing(store):
    tree, inode, data, addresses = await open_file(store, 4, readahead_chunks=0)

    for offset in range(0, 2 * CHUNK_BYTES, READ_BYTES):
        assert await tree.read(inode, offset, READ_BYTES) == data[offset:offset + READ_BYTES]
    await tree.wait_for_prefetches()

    assert fetched_chunks(store, addresses) == [1, 1, 0, 0]
    assert tree.readahead_stats()["prefetches"] == 0


async def test_prefetch_leaves_store_slots_for_demand(store):
    tree, inode, data, addresses = await open_file(store, 6, fetch_concurrency=2,
                                                   prefetch_concurrency=1)
    for offset in (0, CHUNK_BYTES):
        await tree.read(inode, offset, CHUNK_BYTES)
    await tree.wait_for_prefetches()
    assert fetched_chunks(store, addresses) == [1, 1, 1, 0, 0, 0]
    store.hold()
    results = {}

    async def read(name: str, offset: int) -> None:
        results[name] = await tree.read(inode, offset, READ_BYTES)

    async with trio.open_nursery() as nursery:
        # Served from RAM; prefetches chunks 3 and 4, and one of them takes the one prefetch slot.
        nursery.start_soon(read, "sequential", 2 * CHUNK_BYTES)
        await trio.to_thread.run_sync(store.wait_until_held, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert tree.readahead_stats()["prefetching"] == 2
        # A demand read of chunk 5 gets the other store slot while the other prefetch waits.
        nursery.start_soon(read, "demand", 5 * CHUNK_BYTES)
        await trio.to_thread.run_sync(store.wait_until_held, 2)
        await trio.testing.wait_all_tasks_blocked()
        counts = fetched_chunks(store, addresses)
        assert counts[:3] == [1, 1, 1]
        assert counts[3] + counts[4] == 1
        assert counts[5] == 1
        assert tree._prefetch_limiter.statistics().tasks_waiting == 1
        store.release()
    await tree.wait_for_prefetches()

    assert results["sequential"] == data[2 * CHUNK_BYTES:2 * CHUNK_BYTES + READ_BYTES]
    assert results["demand"] == data[5 * CHUNK_BYTES:5 * CHUNK_BYTES + READ_BYTES]
    assert fetched_chunks(store, addresses) == [1, 1, 1, 1, 1, 1]


async def test_failed_prefetch_fails_demand_read_once(store):
    tree, inode, data, addresses = await open_file(store, 4)
    store.replacements[chunk_key(addresses[2])] = encode(b"not chunk 2")

    for offset in (0, CHUNK_BYTES):
        assert await tree.read(inode, offset, CHUNK_BYTES) == data[offset:offset + CHUNK_BYTES]
    await tree.wait_for_prefetches()
    with pytest.raises(ChunkReadError) as caught:
        await tree.read(inode, 2 * CHUNK_BYTES, READ_BYTES)

    assert isinstance(caught.value.__cause__, IntegrityError)
    assert fetched_chunks(store, addresses) == [1, 1, 1, 0]
    assert tree.readahead_stats()["prefetch_errors"] == 1
    status = next(iter(tree.status().values()))
    assert status["read_errors"] == 1
    assert status["prefetched_chunks"] == 0


class FailingTier(RamTier):
    """A RAM tier whose get of one address raises RuntimeError, as a closed tier does."""

    def __init__(self, failing_address: bytes):
        super().__init__(64 << 20, name="failing")
        self.failing_address = failing_address

    async def get(self, address: bytes) -> bytes | None:
        if address == self.failing_address:
            raise RuntimeError("the tier is closed")
        return await super().get(address)


async def test_unexpected_prefetch_error_logged(store, caplog):
    data = deterministic_bytes(8, 4 * CHUNK_BYTES)
    digest, addresses = publish_single_file_image(store, data, chunk_bytes=CHUNK_BYTES)
    tree = Tree(store, TierChain([FailingTier(addresses[2]), StoreTier(store)]))
    root = await tree.lookup(IMAGES_INODE, digest.encode())
    inode = await tree.lookup(root, b"file.bin")

    for offset in (0, CHUNK_BYTES):
        assert await tree.read(inode, offset, CHUNK_BYTES) == data[offset:offset + CHUNK_BYTES]
    await tree.wait_for_prefetches()

    assert tree.readahead_stats()["prefetch_errors"] == 1
    assert tree.readahead_stats()["prefetching"] == 0
    assert f"prefetching chunk {addresses[2].hex()} of image {digest} failed" in caplog.text


async def test_parallel_readers_use_every_fetch_slot(store):
    tree, inode, data, addresses = await open_file(store, 20, readahead_chunks=0)
    store_tier = tree.chain.tiers[-1]
    store.hold()
    results = {}

    async def read(number: int) -> None:
        results[number] = await tree.read(inode, number * CHUNK_BYTES, READ_BYTES)

    async with trio.open_nursery() as nursery:
        for number in range(20):
            nursery.start_soon(read, number)
        await trio.to_thread.run_sync(store.wait_until_held, 16)
        await trio.testing.wait_all_tasks_blocked()
        assert store.gets_at_gate == 16
        assert store_tier._limiter.statistics().borrowed_tokens == 16
        assert store_tier._limiter.statistics().tasks_waiting == 4
        store.release()

    for number in range(20):
        assert results[number] == data[number * CHUNK_BYTES:number * CHUNK_BYTES + READ_BYTES]
    assert fetched_chunks(store, addresses) == [1] * 20
