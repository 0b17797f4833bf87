"""Cache tiers: one suite run against every tier, then the chain and the LMDB tier's hard cases."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import trio
import trio.testing

from lazyfs.chunk import address_of, encode
from lazyfs.errors import IntegrityError, ObjectNotFound, StoreUnavailable
from lazyfs.lmdb_tier import CHECKSUM_BYTES, OPEN_MARKER, LmdbTier, checksum
from lazyfs.refs import chunk_key
from lazyfs.s3store import S3Store
from lazyfs.store import FileStore, StoreOptions
from lazyfs.store_tier import StoreTier
from lazyfs.tiers import RamTier, TierChain
from tests.support.lmdbfiles import put_raw
from tests.support.sample_image import deterministic_bytes
from tests.support.stores import ScriptedStore

MiB = 1 << 20


def chunk(seed: int, size: int = 64 << 10) -> tuple[bytes, bytes]:
    """Return (address, data) of a chunk of incompressible bytes."""
    data = deterministic_bytes(seed, size)
    return address_of(data), data


def entry_bytes(data: bytes) -> int:
    """Return the LMDB tier's budget use for a chunk: its stored object plus the checksum."""
    return CHECKSUM_BYTES + len(encode(data))


def store_chunk(store: FileStore, data: bytes) -> bytes:
    address = address_of(data)
    store.put(chunk_key(address), encode(data))
    return address


# ---------------------------------------------------------------------------
# One suite for every tier


@pytest.fixture(params=["ram", "lmdb", "file-store", "s3-store"])
async def tier(request, tmp_path: Path):
    if request.param == "ram":
        yield RamTier(64 * MiB)
    elif request.param == "lmdb":
        disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
        yield disk
        await disk.aclose()
    elif request.param == "file-store":
        yield StoreTier(FileStore(tmp_path / "store"), missing_is_miss=True)
    else:
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        store = S3Store(bucket, "tiers", StoreOptions(endpoint_url=server.endpoint_url))
        yield StoreTier(store, missing_is_miss=True)
        store.close()


async def test_tier_unknown_address_is_miss(tier):
    address, _data = chunk(1)

    assert await tier.get(address) is None
    stats = tier.stats()
    assert stats["misses"] == 1
    assert stats["hits"] == 0
    assert stats["bytes_served"] == 0


async def test_tier_put_then_get_returns_bytes(tier):
    address, data = chunk(2)

    await tier.put(address, data)
    assert await tier.get(address) == data
    stats = tier.stats()
    assert stats["hits"] == 1
    assert stats["misses"] == 0
    assert stats["bytes_served"] == len(data)


async def test_tier_put_twice_keeps_bytes(tier):
    address, data = chunk(3)

    await tier.put(address, data)
    await tier.put(address, data)
    assert await tier.get(address) == data


async def test_tier_put_many_round_trip(tier):
    chunks = [chunk(seed) for seed in (5, 6, 7)]

    await tier.put_many(chunks)
    for address, data in chunks:
        assert await tier.get(address) == data
    stats = tier.stats()
    assert stats["hits"] == 3
    assert stats["misses"] == 0


async def test_tier_many_sizes_round_trip(tier):
    chunks = [chunk(seed, size) for seed, size in enumerate([1, 31, 4096, 65537, 2 * MiB], start=10)]

    for address, data in chunks:
        await tier.put(address, data)
    for address, data in chunks:
        assert await tier.get(address) == data
    assert tier.stats()["hits"] == len(chunks)


async def test_tier_concurrent_gets_agree(tier):
    address, data = chunk(4)
    await tier.put(address, data)
    results = []

    async def read() -> None:
        results.append(await tier.get(address))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(read)
    assert results == [data] * 8


async def test_tier_stats_are_integers(tier):
    stats = tier.stats()

    assert stats
    for name, value in stats.items():
        assert type(value) is int, name


# ---------------------------------------------------------------------------
# Chain


def make_chain(tmp_path: Path, *, ram_bytes: int = 64 * MiB, disk_bytes: int | None = 64 * MiB,
               **chain_options) -> tuple[TierChain, ScriptedStore]:
    store = ScriptedStore(tmp_path / "store")
    tiers = [RamTier(ram_bytes)]
    if disk_bytes is not None:
        tiers.append(LmdbTier(tmp_path / "lmdb", disk_bytes))
    tiers.append(StoreTier(store, fetch_timeout_s=30))
    return TierChain(tiers, **chain_options), store


async def test_chain_single_flight(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    _address, data = chunk(20)
    address = store_chunk(store, data)
    store.hold()
    results = []

    async def read() -> None:
        results.append(await chain.get(address))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        store.release()

    assert results == [data] * 20
    assert store.chunk_gets() == 1
    assert chain.stats()["store"]["requests"] == 1
    assert chain.chain_stats()["joined"] == 19
    await chain.aclose()


async def test_chain_single_flight_shares_error(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    address, _data = chunk(21)
    store.replacements[chunk_key(address)] = encode(b"not the chunk")
    store.hold()
    errors = []

    async def read() -> None:
        try:
            await chain.get(address)
        except IntegrityError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        store.release()

    assert len(errors) == 5
    assert store.chunk_gets() == 1
    await chain.aclose()


async def test_chain_cancelled_leader_hands_over(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    address = store_chunk(store, chunk(22)[1])
    store.hold()
    results = []

    async def lead(cancel_scope: trio.CancelScope) -> None:
        with cancel_scope:
            await chain.get(address)

    async def follow() -> None:
        results.append(await chain.get(address))

    leader_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead, leader_scope)
        await trio.to_thread.run_sync(store.wait_until_held, 1)
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.to_thread.run_sync(store.wait_until_held, 2)
        store.release()

    assert results == [chunk(22)[1]]
    assert store.chunk_gets() == 2
    await chain.aclose()


async def test_chain_fills_faster_tiers(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    data = chunk(23)[1]
    address = store_chunk(store, data)
    ram, disk, _store_tier = chain.tiers

    first = await chain.fetch(address)
    assert first.data == data
    assert first.source == "store"
    assert await ram.get(address) == data
    await chain.wait_for_fills()
    assert await disk.get(address) == data

    second = await chain.fetch(address)
    assert second.source == "ram"
    assert store.chunk_gets() == 1
    await chain.aclose()


async def test_chain_disk_hit_fills_ram(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    data = chunk(24)[1]
    address = store_chunk(store, data)
    ram, disk, _store_tier = chain.tiers
    await disk.put(address, data)

    fetched = await chain.fetch(address)

    assert fetched.source == "disk"
    assert fetched.remote is False
    assert await ram.get(address) == data
    assert store.chunk_gets() == 0
    await chain.aclose()


async def test_chain_near_store_filled_from_far(tmp_path: Path):
    near_store = ScriptedStore(tmp_path / "near")
    far_store = ScriptedStore(tmp_path / "far")
    data = chunk(25)[1]
    address = store_chunk(far_store, data)
    chain = TierChain([
        RamTier(MiB),
        StoreTier(near_store, name="near", missing_is_miss=True),
        StoreTier(far_store, name="far"),
    ])

    fetched = await chain.fetch(address)
    await chain.wait_for_fills()

    assert fetched.data == data
    assert fetched.source == "far"
    assert near_store.get(chunk_key(address)) == encode(data)
    stats = chain.stats()
    assert stats["near"]["misses"] == 1
    assert stats["near"]["puts"] == 1
    assert stats["far"]["requests"] == 1

    # A second chain without the far store finds the chunk in the near one.
    again = TierChain([StoreTier(near_store, name="near")])
    assert await again.get(address) == data


async def test_chain_wrong_bytes_not_cached(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    address, _data = chunk(26)
    store.replacements[chunk_key(address)] = encode(b"some other chunk")
    ram, disk, store_tier = chain.tiers

    with pytest.raises(IntegrityError):
        await chain.get(address)

    assert ram.stats()["entries"] == 0
    assert disk.stats()["entries"] == 0
    assert store_tier.stats()["integrity_errors"] == 1
    await chain.aclose()


async def test_chain_remembers_integrity_failure(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    address, _data = chunk(27)
    store.replacements[chunk_key(address)] = encode(b"wrong")

    for _ in range(3):
        with pytest.raises(IntegrityError):
            await chain.get(address)

    assert store.chunk_gets() == 1
    assert chain.chain_stats()["failed_fast"] == 2
    await chain.aclose()


async def test_chain_failure_memory_expires(tmp_path: Path):
    chain, store = make_chain(tmp_path, failure_ttl_s=0.0)
    address, _data = chunk(28)
    store.replacements[chunk_key(address)] = encode(b"wrong")

    for _ in range(2):
        with pytest.raises(IntegrityError):
            await chain.get(address)

    assert store.chunk_gets() == 2
    await chain.aclose()


async def test_chain_missing_chunk_is_error(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    address, _data = chunk(29)

    with pytest.raises(ObjectNotFound):
        await chain.get(address)

    assert chain.stats()["store"]["not_found"] == 1
    assert chain.tiers[0].stats()["entries"] == 0
    await chain.aclose()


async def test_chain_without_any_holder_raises_not_found(tmp_path: Path):
    chain = TierChain([RamTier(MiB)])
    address, _data = chunk(30)

    with pytest.raises(ObjectNotFound):
        await chain.get(address)


class GatedFillTier(RamTier):
    """A RAM tier filled in the background whose puts wait until ``gate`` is set."""

    fill_in_background = True

    def __init__(self, name: str = "slow"):
        super().__init__(64 * MiB, name=name)
        self.gate = trio.Event()
        self.puts_started = 0

    async def put(self, address: bytes, data: bytes) -> None:
        self.puts_started += 1
        await self.gate.wait()
        await super().put(address, data)


async def test_chain_returns_before_background_fill(tmp_path: Path):
    store = ScriptedStore(tmp_path / "store")
    ram, slow = RamTier(MiB), GatedFillTier()
    chain = TierChain([ram, slow, StoreTier(store)])
    data = chunk(32)[1]
    address = store_chunk(store, data)

    fetched = await chain.fetch(address)
    await trio.testing.wait_all_tasks_blocked()

    assert fetched.data == data
    assert fetched.source == "store"
    assert await ram.get(address) == data
    assert slow.puts_started == 1
    assert slow.stats()["entries"] == 0
    assert chain.chain_stats()["fill_queue"] == 1
    slow.gate.set()
    await chain.wait_for_fills()
    assert await slow.get(address) == data
    assert chain.chain_stats()["fill_queue"] == 0
    assert chain.chain_stats()["fills_queued"] == 1
    await chain.aclose()


async def test_chain_serves_chunk_waiting_for_fill(tmp_path: Path):
    store = ScriptedStore(tmp_path / "store")
    slow = GatedFillTier()
    chain = TierChain([slow, StoreTier(store)])
    data = chunk(33)[1]
    address = store_chunk(store, data)

    first = await chain.fetch(address)
    second = await chain.fetch(address)

    assert first.data == data
    assert first.remote is True
    assert second.data == data
    assert second.source == "slow"
    assert second.remote is False
    assert store.chunk_gets() == 1
    assert chain.chain_stats()["fill_queue_hits"] == 1
    slow.gate.set()
    await chain.aclose()
    assert slow.stats()["puts"] == 1


async def test_chain_drops_fills_when_queue_full(tmp_path: Path):
    store = ScriptedStore(tmp_path / "store")
    slow = GatedFillTier()
    chain = TierChain([slow, StoreTier(store)], fill_queue_size=1)
    chunks = [chunk(seed)[1] for seed in (34, 35, 36)]
    addresses = [store_chunk(store, data) for data in chunks]

    for address, data in zip(addresses, chunks):
        assert await chain.get(address) == data
    slow.gate.set()
    await chain.wait_for_fills()

    stats = chain.chain_stats()
    assert stats["fills_queued"] == 1
    assert stats["fills_dropped"] == 2
    assert stats["fill_queue"] == 0
    assert await slow.get(addresses[0]) == chunks[0]
    assert await slow.get(addresses[1]) is None
    assert await slow.get(addresses[2]) is None
    await chain.aclose()


async def test_chain_writes_queued_fills_together(tmp_path: Path):
    store = ScriptedStore(tmp_path / "store")
    slow = GatedFillTier()
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    chain = TierChain([slow, disk, StoreTier(store)])
    chunks = [chunk(seed)[1] for seed in (40, 41, 42)]
    addresses = [store_chunk(store, data) for data in chunks]

    for address, data in zip(addresses, chunks):
        assert await chain.get(address) == data
    await trio.testing.wait_all_tasks_blocked()
    assert slow.puts_started == 1
    slow.gate.set()
    await chain.wait_for_fills()

    # The first chunk went alone; the two queued behind it share one transaction,
    # and every write transaction takes the next tick.
    with disk._env.begin() as txn:
        assert txn.get(b"tick", db=disk._meta) == (2).to_bytes(8, "big")
    assert disk.stats()["puts"] == 3
    assert disk.stats()["entries"] == 3
    assert chain.chain_stats()["fills_queued"] == 3
    await chain.aclose()


async def test_chain_close_finishes_disk_fills(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    chunks = [chunk(seed)[1] for seed in (37, 38, 39)]
    addresses = [store_chunk(store, data) for data in chunks]

    for address, data in zip(addresses, chunks):
        assert await chain.get(address) == data
    await chain.aclose()

    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    for address, data in zip(addresses, chunks):
        assert await disk.get(address) == data
    assert disk.stats()["entries"] == 3
    await disk.aclose()


async def test_store_tier_timeout(tmp_path: Path):
    store = ScriptedStore(tmp_path / "store")
    address = store_chunk(store, chunk(31)[1])
    tier = StoreTier(store, fetch_timeout_s=0.2)
    store.hold()

    with pytest.raises(StoreUnavailable, match="timed out after 0.2 s"):
        await tier.get(address)

    store.release()
    assert tier.stats()["timeouts"] == 1


async def test_store_tier_limits_concurrency(tmp_path: Path):
    store = ScriptedStore(tmp_path / "store")
    addresses = [store_chunk(store, chunk(seed)[1]) for seed in range(40, 46)]
    tier = StoreTier(store, fetch_concurrency=2)
    store.hold()

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(tier.get, address)
        await trio.to_thread.run_sync(store.wait_until_held, 2)
        await trio.testing.wait_all_tasks_blocked()
        limiter = tier._limiter.statistics()
        assert limiter.borrowed_tokens == 2
        assert limiter.tasks_waiting == 4
        assert store.gets_at_gate == 2
        store.release()

    assert sum(store.gets.values()) == 6


# ---------------------------------------------------------------------------
# LMDB tier


async def test_lmdb_survives_restart(tmp_path: Path):
    chunks = [chunk(seed) for seed in range(50, 55)]
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    for address, data in chunks:
        await disk.put(address, data)
    used = disk.stats()["used_bytes"]
    await disk.aclose()

    reopened = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    for address, data in chunks:
        assert await reopened.get(address) == data
    stats = reopened.stats()
    assert stats["entries"] == 5
    assert stats["used_bytes"] == used
    assert used == sum(entry_bytes(data) for _address, data in chunks)
    await reopened.aclose()


def flip_byte_of(path: Path, needle: bytes) -> None:
    """Flip one bit in the middle of the only copy of ``needle`` in a file."""
    content = bytearray(path.read_bytes())
    position = content.find(needle)
    assert position >= 0, "the chunk bytes are not in the LMDB data file"
    assert content.find(needle, position + 1) < 0, "the chunk bytes are in the data file twice"
    content[position + len(needle) // 2] ^= 0x01
    path.write_bytes(bytes(content))


async def test_lmdb_flipped_byte_refetched(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    data = chunk(60, 256 << 10)[1]
    address = store_chunk(store, data)
    assert await chain.get(address) == data
    await chain.aclose()
    flip_byte_of(tmp_path / "lmdb" / "data.mdb", data)

    chain, store = make_chain(tmp_path)
    ram, disk, _store_tier = chain.tiers
    assert await disk.get(address) is None
    assert disk.stats()["corrupt"] == 1
    assert disk.stats()["entries"] == 0

    assert await chain.get(address) == data
    assert store.chunk_gets() == 1
    await chain.wait_for_fills()
    assert await disk.get(address) == data
    assert disk.stats()["corrupt"] == 1
    await chain.aclose()


async def test_lmdb_bad_value_dropped(tmp_path: Path):
    address, data = chunk(61)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)
    await disk.aclose()
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        chunks_db = env.open_db(b"chunks", txn=txn)
        value = txn.get(address, db=chunks_db)
        txn.put(address, value[:CHECKSUM_BYTES] + b"X" + value[CHECKSUM_BYTES + 1:], db=chunks_db)
    env.close()

    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    assert await disk.get(address) is None
    stats = disk.stats()
    assert stats["corrupt"] == 1
    assert stats["entries"] == 0
    assert stats["used_bytes"] == 0
    await disk.put(address, data)
    assert await disk.get(address) == data
    await disk.aclose()


async def test_lmdb_short_value_dropped(tmp_path: Path):
    address, data = chunk(62)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)
    await disk.aclose()
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(address, b"abc", db=env.open_db(b"chunks", txn=txn))
    env.close()

    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    assert await disk.get(address) is None
    assert disk.stats()["corrupt"] == 1
    await disk.aclose()


async def test_lmdb_evicts_least_recently_used(tmp_path: Path):
    chunks = [chunk(seed, MiB) for seed in range(70, 76)]
    disk = LmdbTier(tmp_path / "lmdb", 3 * entry_bytes(chunks[0][1]))
    for address, data in chunks[:3]:
        await disk.put(address, data)
    assert await disk.get(chunks[0][0]) == chunks[0][1]

    for address, data in chunks[3:]:
        await disk.put(address, data)

    stats = disk.stats()
    assert stats["used_bytes"] <= disk.capacity_bytes
    assert stats["evictions"] >= 3
    assert await disk.get(chunks[1][0]) is None
    assert await disk.get(chunks[2][0]) is None
    assert await disk.get(chunks[-1][0]) == chunks[-1][1]
    await disk.aclose()


async def test_lmdb_read_keeps_entry(tmp_path: Path):
    size = 100 << 10
    chunks = [chunk(seed, size) for seed in range(80, 91)]
    disk = LmdbTier(tmp_path / "lmdb", 10 * entry_bytes(chunks[0][1]))
    for address, data in chunks[:10]:
        await disk.put(address, data)
    assert await disk.get(chunks[0][0]) == chunks[0][1]

    # Over budget: eviction frees down to 90 % of it, the two least recently used.
    await disk.put(*chunks[10])

    assert disk.stats()["evictions"] == 2
    assert await disk.get(chunks[0][0]) == chunks[0][1]
    assert await disk.get(chunks[1][0]) is None
    assert await disk.get(chunks[2][0]) is None
    for address, data in chunks[3:]:
        assert await disk.get(address) == data
    await disk.aclose()


async def test_lmdb_oversized_chunk_rejected(tmp_path: Path):
    disk = LmdbTier(tmp_path / "lmdb", MiB)
    address, data = chunk(90, MiB)

    await disk.put(address, data)

    assert await disk.get(address) is None
    assert disk.stats()["rejected"] == 1
    await disk.aclose()


async def test_lmdb_full_map_evicts(tmp_path: Path):
    disk = LmdbTier(tmp_path / "lmdb", 1 << 30, map_size_bytes=4 * MiB)
    chunks = [chunk(seed, 300_000) for seed in range(100, 140)]

    for address, data in chunks:
        await disk.put(address, data)

    stats = disk.stats()
    assert stats["map_full"] >= 1
    assert stats["evictions"] >= 1
    assert stats["put_failures"] == 0
    assert await disk.get(chunks[-1][0]) == chunks[-1][1]
    assert stats["used_bytes"] == stats["entries"] * entry_bytes(chunks[0][1])
    await disk.aclose()


async def test_lmdb_budget_shrink_on_reopen(tmp_path: Path):
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    for seed in range(110, 118):
        await disk.put(*chunk(seed, MiB))
    await disk.aclose()

    smaller = LmdbTier(tmp_path / "lmdb", 4 * MiB)

    assert smaller.stats()["used_bytes"] <= 4 * MiB
    assert await smaller.get(chunk(117, MiB)[0]) == chunk(117, MiB)[1]
    await smaller.aclose()


async def test_lmdb_unreadable_environment_replaced(tmp_path: Path):
    path = tmp_path / "lmdb"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not an LMDB file" * 512)

    disk = LmdbTier(path, 64 * MiB)
    address, data = chunk(120)
    await disk.put(address, data)

    assert await disk.get(address) == data
    await disk.aclose()


async def test_lmdb_open_in_earlier_boot_emptied(tmp_path: Path):
    address, data = chunk(130)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)
    await disk.aclose()
    assert not (tmp_path / "lmdb" / OPEN_MARKER).exists()
    # As if the system went down while the cache was open.
    (tmp_path / "lmdb" / OPEN_MARKER).write_text("00000000-0000-0000-0000-000000000000\n")

    reopened = LmdbTier(tmp_path / "lmdb", 64 * MiB)

    assert await reopened.get(address) is None
    assert reopened.stats()["entries"] == 0
    await reopened.aclose()


async def test_lmdb_daemon_crash_keeps_entries(tmp_path: Path):
    address, data = chunk(131)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)
    assert (tmp_path / "lmdb" / OPEN_MARKER).read_text() == Path("/proc/sys/kernel/random/boot_id").read_text()
    await disk.aclose()
    # As if the daemon was killed in this boot: the marker stays behind.
    (tmp_path / "lmdb" / OPEN_MARKER).write_text(Path("/proc/sys/kernel/random/boot_id").read_text())

    reopened = LmdbTier(tmp_path / "lmdb", 64 * MiB)

    assert await reopened.get(address) == data
    await reopened.aclose()


async def test_lmdb_second_owner_rejected(tmp_path: Path):
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)

    with pytest.raises(OSError, match="is in use by another process") as caught:
        LmdbTier(tmp_path / "lmdb", 64 * MiB)

    assert caught.value.errno == errno.EBUSY
    await disk.aclose()
    reopened = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await reopened.aclose()


@pytest.mark.parametrize("keep_bytes", [12 << 10, None])
def test_lmdb_truncated_file_starts_empty(tmp_path, keep_bytes):
    # Run in a child process: a regression would kill it with SIGBUS, not pytest.
    script = f"""
import os, trio
from lazyfs.lmdb_tier import LmdbTier

async def main():
    tier = LmdbTier({str(tmp_path / "cache")!r}, capacity_bytes=64 << 20)
    for n in range(40):
        await tier.put(bytes([n]) * 32, os.urandom(256 << 10))
    await tier.aclose()
    data_file = {str(tmp_path / "cache" / "data.mdb")!r}
    size = os.path.getsize(data_file)
    os.truncate(data_file, {keep_bytes!r} or size // 2)
    tier = LmdbTier({str(tmp_path / "cache")!r}, capacity_bytes=64 << 20)
    found = [await tier.get(bytes([n]) * 32) for n in range(40)]
    print(sum(item is not None for item in found), tier.used_bytes)
    await tier.put(b"x" * 32, b"fresh")
    print(await tier.get(b"x" * 32))
    await tier.aclose()

trio.run(main)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "0 0\nb'fresh'\n"
    assert "cannot be opened" in result.stderr


# ---------------------------------------------------------------------------
# The LMDB tier keeps chunks in their stored, compressed form


def compressible_chunk(seed: int, size: int = 256 << 10) -> tuple[bytes, bytes]:
    """Return (address, data) of a chunk that zstd shrinks: a short random run repeated."""
    data = (deterministic_bytes(seed, 4096) * (size // 4096 + 1))[:size]
    return address_of(data), data


def lmdb_value(path: Path, address: bytes) -> bytes:
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return bytes(txn.get(address, db=env.open_db(b"chunks", txn=txn, create=False)))
    finally:
        env.close()


async def test_lmdb_keeps_store_object(tmp_path: Path):
    chain, store = make_chain(tmp_path)
    address, data = compressible_chunk(140)
    assert store_chunk(store, data) == address
    stored = store.get(chunk_key(address))

    assert await chain.get(address) == data
    await chain.wait_for_fills()
    disk = chain.tiers[1]
    used = disk.stats()["used_bytes"]
    await chain.aclose()

    assert stored[0] == 1
    assert len(stored) < len(data) // 10
    assert used == CHECKSUM_BYTES + len(stored)
    value = lmdb_value(tmp_path / "lmdb", address)
    assert value[CHECKSUM_BYTES:] == stored
    assert value[:CHECKSUM_BYTES] == checksum(address, stored)

    reopened = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    assert await reopened.get(address) == data
    assert reopened.stats()["bytes_served"] == len(data)
    await reopened.aclose()


async def test_lmdb_put_compresses_chunk(tmp_path: Path):
    address, data = compressible_chunk(141)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)

    assert disk.stats()["used_bytes"] == CHECKSUM_BYTES + len(encode(data))
    assert disk.stats()["used_bytes"] < len(data) // 10
    assert await disk.get(address) == data
    await disk.aclose()
    assert lmdb_value(tmp_path / "lmdb", address)[CHECKSUM_BYTES:] == encode(data)


async def test_lmdb_undecodable_entry_dropped(tmp_path: Path):
    address, data = compressible_chunk(142)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)
    await disk.aclose()
    # A truncated zstd frame under a checksum that matches it.
    broken = encode(data)[:40]
    put_raw(tmp_path / "lmdb", b"chunks", address, checksum(address, broken) + broken)

    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    assert await disk.get(address) is None
    stats = disk.stats()
    assert stats["corrupt"] == 1
    assert stats["entries"] == 0
    await disk.aclose()


async def test_lmdb_older_format_emptied(tmp_path: Path):
    address, data = chunk(143)
    disk = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    await disk.put(address, data)
    await disk.aclose()
    put_raw(tmp_path / "lmdb", b"meta", b"version", (1).to_bytes(8, "big"))

    reopened = LmdbTier(tmp_path / "lmdb", 64 * MiB)
    stats = reopened.stats()
    assert stats["entries"] == 0
    assert stats["used_bytes"] == 0
    assert await reopened.get(address) is None
    await reopened.aclose()
