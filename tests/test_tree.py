"""The namespace without a mount: lookups, attributes, listings, reads and image loading."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from lazyfs.chunk import encode
from lazyfs.errors import ChunkReadError, FilesystemError, IndexFormatError, IntegrityError, ObjectNotFound
from lazyfs.index import Node
from lazyfs.refs import chunk_key, index_key
from lazyfs.store_tier import StoreTier
from lazyfs.tiers import RamTier, TierChain
from lazyfs.tree import (BLOCK_SIZE, FIRST_IMAGE_INODE, IMAGES_INODE, INDEX_FAILURE_MEMORY_S, ROOT_INODE,
                         SHIFTED_INODE, Tree)
from tests.support import sample_image
from tests.support.sample_image import SampleImage, publish_sample_image, publish_single_file_image
from tests.support.stores import ScriptedStore

MOUNT_TIME_NS = 1_600_000_000_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> ScriptedStore:
    return ScriptedStore(tmp_path / "store")


@pytest.fixture
def sample(store: ScriptedStore) -> SampleImage:
    return publish_sample_image(store)


def make_tree(store: ScriptedStore, **options) -> Tree:
    chain = TierChain([RamTier(64 << 20), StoreTier(store)])
    return Tree(store, chain, clock_ns=lambda: MOUNT_TIME_NS, **options)


async def resolve(tree: Tree, path: bytes, start: int = ROOT_INODE) -> int:
    inode = start
    for name in path.split(b"/"):
        if name:
            inode = await tree.lookup(inode, name)
    return inode


async def image_path(tree: Tree, sample: SampleImage, path: bytes) -> int:
    return await resolve(tree, b"images/" + sample.digest.encode() + b"/" + path)


def assert_errno(caught: pytest.ExceptionInfo, expected: int) -> None:
    assert caught.value.errno == expected, os.strerror(caught.value.errno)


# ---------------------------------------------------------------------------
# Mount root and images/


async def test_tree_root_and_images(store: ScriptedStore):
    tree = make_tree(store)

    assert await tree.lookup(ROOT_INODE, b"images") == IMAGES_INODE
    assert await tree.lookup(ROOT_INODE, b".") == ROOT_INODE
    assert await tree.lookup(IMAGES_INODE, b"..") == ROOT_INODE
    root = tree.getattr(ROOT_INODE)
    assert root.st_mode == stat.S_IFDIR | 0o755
    assert root.st_nlink == 4
    assert root.st_mtime_ns == MOUNT_TIME_NS
    images = tree.getattr(IMAGES_INODE)
    assert images.st_mode == stat.S_IFDIR | 0o755
    assert images.st_nlink == 2
    assert list(tree.entries(ROOT_INODE)) == [(1, b"images", IMAGES_INODE), (2, b"shifted", SHIFTED_INODE)]
    assert list(tree.entries(IMAGES_INODE)) == []


async def test_tree_root_unknown_name(store: ScriptedStore):
    tree = make_tree(store)

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(ROOT_INODE, b"other")

    assert_errno(caught, errno.ENOENT)


@pytest.mark.parametrize("name", [
    b"not-a-digest", b"A" * 64, b"0" * 63, b"0" * 65, b"g" * 64, b"\xff" * 64, b"",
])
async def test_tree_non_digest_name_no_request(store: ScriptedStore, name: bytes):
    tree = make_tree(store)

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(IMAGES_INODE, name)

    assert_errno(caught, errno.ENOENT)
    assert sum(store.gets.values()) == 0


async def test_tree_missing_index_enoent(store: ScriptedStore):
    tree = make_tree(store)
    digest = "ab" * 32

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(IMAGES_INODE, digest.encode())

    assert_errno(caught, errno.ENOENT)
    assert store.gets[index_key(digest)] == 1
    assert list(tree.entries(IMAGES_INODE)) == []


async def test_tree_failed_load_remembered_briefly(store: ScriptedStore):
    now = [1000.0]
    tree = make_tree(store, monotonic=lambda: now[0])
    digest = "ab" * 32

    for _ in range(3):
        with pytest.raises(FilesystemError) as caught:
            await tree.lookup(IMAGES_INODE, digest.encode())
        assert_errno(caught, errno.ENOENT)
    assert store.gets[index_key(digest)] == 1

    now[0] += INDEX_FAILURE_MEMORY_S
    with pytest.raises(FilesystemError):
        await tree.lookup(IMAGES_INODE, digest.encode())
    assert store.gets[index_key(digest)] == 2


async def test_tree_index_digest_mismatch(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    other = "cd" * 32
    store.put(index_key(other), store.get(index_key(sample.digest)))

    with pytest.raises(IndexFormatError, match="does not match the digest"):
        await tree.lookup(IMAGES_INODE, other.encode())

    assert tree.images == []


async def test_tree_attach_lists_image(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    inode = await tree.lookup(IMAGES_INODE, sample.digest.encode())

    assert inode == FIRST_IMAGE_INODE
    assert list(tree.entries(IMAGES_INODE)) == [(1, sample.digest.encode(), FIRST_IMAGE_INODE)]
    assert tree.getattr(IMAGES_INODE).st_nlink == 3
    assert await tree.lookup(inode, b"..") == IMAGES_INODE
    assert await tree.lookup(inode, b".") == inode


async def test_tree_concurrent_attach_loads_once(store: ScriptedStore):
    first = publish_sample_image(store, seed=1)
    second = publish_sample_image(store, seed=2)
    tree = make_tree(store)
    store.hold()
    found: dict[str, list[int]] = {first.digest: [], second.digest: []}

    async def look(digest: str) -> None:
        found[digest].append(await tree.lookup(IMAGES_INODE, digest.encode()))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(look, first.digest)
            nursery.start_soon(look, second.digest)
        await trio.to_thread.run_sync(store.wait_until_held, 2)
        await trio.testing.wait_all_tasks_blocked()
        store.release()

    assert store.gets[index_key(first.digest)] == 1
    assert store.gets[index_key(second.digest)] == 1
    assert len(set(found[first.digest])) == 1
    assert len(set(found[second.digest])) == 1
    assert len(tree.images) == 2


async def test_tree_images_get_disjoint_ranges(store: ScriptedStore):
    first = publish_sample_image(store, seed=1)
    second = publish_sample_image(store, seed=2)
    tree = make_tree(store)

    first_root = await tree.lookup(IMAGES_INODE, first.digest.encode())
    second_root = await tree.lookup(IMAGES_INODE, second.digest.encode())

    first_image, second_image = tree.images
    assert first_root == first_image.base == FIRST_IMAGE_INODE
    assert second_root == second_image.base == first_image.end
    assert first_image.end - first_image.base == first_image.index.inode_count
    first_file = await image_path(tree, first, b"data/small.txt")
    second_file = await image_path(tree, second, b"data/small.txt")
    assert second_file - first_file == first_image.index.inode_count
    assert await tree.read(first_file, 0, 100) == sample_image.SMALL_DATA
    assert await tree.read(second_file, 0, 100) == sample_image.SMALL_DATA


async def test_tree_index_cache_serves_restart(store: ScriptedStore, sample: SampleImage, tmp_path: Path):
    cache = tmp_path / "indexes"
    tree = make_tree(store, index_cache_dir=cache)
    await tree.lookup(IMAGES_INODE, sample.digest.encode())
    assert (cache / sample.digest).read_bytes() == store.get(index_key(sample.digest))
    gets_before = store.gets[index_key(sample.digest)]

    restarted = make_tree(store, index_cache_dir=cache)
    await restarted.lookup(IMAGES_INODE, sample.digest.encode())

    assert store.gets[index_key(sample.digest)] == gets_before
    assert restarted.index_stats() == {"index_fetches": 0, "index_cache_hits": 1}


async def test_tree_corrupt_cached_index_refetched(store: ScriptedStore, sample: SampleImage,
                                                   tmp_path: Path):
    cache = tmp_path / "indexes"
    cache.mkdir()
    (cache / sample.digest).write_bytes(b"LZIX garbage")
    tree = make_tree(store, index_cache_dir=cache)

    await tree.lookup(IMAGES_INODE, sample.digest.encode())

    assert tree.index_stats() == {"index_fetches": 1, "index_cache_hits": 0}
    assert (cache / sample.digest).read_bytes() == store.get(index_key(sample.digest))


# ---------------------------------------------------------------------------
# Inside an image


async def test_tree_file_attributes(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    inode = await image_path(tree, sample, b"data/two_chunks.bin")

    attributes = tree.getattr(inode)
    size = sample_image.FIRST_CHUNK_BYTES + sample_image.SECOND_CHUNK_BYTES
    assert attributes.st_ino == inode
    assert attributes.st_mode == stat.S_IFREG | 0o644
    assert attributes.st_nlink == 1
    assert attributes.st_uid == sample_image.UID
    assert attributes.st_gid == sample_image.GID
    assert attributes.st_size == size
    assert attributes.st_blocks == (size + 511) // 512
    assert attributes.st_blksize == BLOCK_SIZE
    assert attributes.st_rdev == 0
    assert attributes.st_mtime_ns == sample_image.MTIME_NS


async def test_tree_directory_attributes(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    root = tree.getattr(await image_path(tree, sample, b""))
    data = tree.getattr(await image_path(tree, sample, b"data"))
    deeper = tree.getattr(await image_path(tree, sample, b"data/nested/deeper"))

    assert root.st_mode == stat.S_IFDIR | 0o755
    assert root.st_nlink == 2 + 5
    assert data.st_nlink == 3
    assert deeper.st_mode == stat.S_IFDIR | 0o700
    assert deeper.st_nlink == 2


async def test_tree_hardlinks_share_inode(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    inodes = [await image_path(tree, sample, b"links/hard%d" % number) for number in (1, 2, 3)]

    assert len(set(inodes)) == 1
    assert tree.getattr(inodes[0]).st_nlink == 3
    links = await image_path(tree, sample, b"links")
    listed = {name: inode for _offset, name, inode in tree.entries(links)}
    assert listed[b"hard1"] == listed[b"hard2"] == listed[b"hard3"] == inodes[0]


async def test_tree_listing_matches_lookup(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    root = await image_path(tree, sample, b"")

    listed = list(tree.entries(root))

    assert [name for _offset, name, _inode in listed] == [b"bin", b"data", b"dev", b"links", b"names",
                                                          b"xattrs"]
    assert [offset for offset, _name, _inode in listed] == [1, 2, 3, 4, 5, 6]
    for _offset, name, inode in listed:
        assert await tree.lookup(root, name) == inode
        assert tree.getattr(inode).st_ino == inode


async def test_tree_listing_resumes_at_offset(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    root = await image_path(tree, sample, b"")
    listed = list(tree.entries(root))

    for offset in range(len(listed) + 1):
        assert list(tree.entries(root, offset)) == listed[offset:]


async def test_tree_non_utf8_names(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    names = await image_path(tree, sample, b"names")

    assert [name for _offset, name, _inode in tree.entries(names)] == [b"caf\xe9", b"\xff\xfe"]
    latin1 = await tree.lookup(names, b"caf\xe9")
    assert await tree.read(latin1, 0, 4096) == sample_image.LATIN1_DATA


async def test_tree_symlinks(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    for path, target in sample.symlinks.items():
        inode = await image_path(tree, sample, path)
        attributes = tree.getattr(inode)
        assert stat.S_ISLNK(attributes.st_mode)
        assert attributes.st_size == len(target)
        assert tree.readlink(inode) == target


async def test_tree_readlink_of_file_einval(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    inode = await image_path(tree, sample, b"data/small.txt")

    for target in (inode, ROOT_INODE):
        with pytest.raises(FilesystemError) as caught:
            tree.readlink(target)
        assert_errno(caught, errno.EINVAL)


async def test_tree_device_and_fifo(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    null = tree.getattr(await image_path(tree, sample, b"dev/null"))
    fifo = tree.getattr(await image_path(tree, sample, b"dev/fifo"))

    assert null.st_mode == stat.S_IFCHR | 0o666
    assert null.st_rdev == sample_image.DEVICE_RDEV
    assert os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3
    assert null.st_size == 0
    assert fifo.st_mode == stat.S_IFIFO | 0o644
    assert fifo.st_rdev == 0


async def test_tree_xattrs(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    inode = await image_path(tree, sample, b"xattrs")

    assert tree.listxattr(inode) == sorted(sample_image.XATTRS)
    for name, value in sample_image.XATTRS.items():
        assert tree.getxattr(inode, name) == value


async def test_tree_missing_xattr_enodata(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    with_xattrs = await image_path(tree, sample, b"xattrs")
    without = await image_path(tree, sample, b"data/small.txt")

    assert tree.listxattr(without) == []
    assert tree.listxattr(ROOT_INODE) == []
    for inode in (with_xattrs, without, ROOT_INODE, IMAGES_INODE):
        with pytest.raises(FilesystemError) as caught:
            tree.getxattr(inode, b"user.absent")
        assert_errno(caught, errno.ENODATA)


async def test_tree_lookup_errors(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    data = await image_path(tree, sample, b"data")
    small = await image_path(tree, sample, b"data/small.txt")

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(data, b"absent")
    assert_errno(caught, errno.ENOENT)
    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(small, b"child")
    assert_errno(caught, errno.ENOTDIR)
    with pytest.raises(FilesystemError) as caught:
        list(tree.entries(small))
    assert_errno(caught, errno.ENOTDIR)


async def test_tree_unknown_inode_enoent(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    await tree.lookup(IMAGES_INODE, sample.digest.encode())
    beyond = tree.images[0].end

    for inode in (0, beyond, beyond + 1000):
        with pytest.raises(FilesystemError) as caught:
            tree.getattr(inode)
        assert_errno(caught, errno.ENOENT)


async def test_tree_dotdot_inside_image(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    data = await image_path(tree, sample, b"data")
    deeper = await image_path(tree, sample, b"data/nested/deeper")
    nested = await image_path(tree, sample, b"data/nested")

    assert await tree.lookup(deeper, b"..") == nested
    assert await tree.lookup(nested, b"..") == data


async def test_tree_statfs(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    empty = tree.statfs()
    assert empty.blocks == 0
    assert empty.files == 2

    await tree.lookup(IMAGES_INODE, sample.digest.encode())
    totals = tree.statfs()

    file_bytes = sum(len(data) for path, data in sample.files.items() if path not in (b"links/hard2",
                                                                                      b"links/hard3"))
    assert tree.images[0].size_bytes == file_bytes
    assert totals.block_size == 4096
    assert totals.blocks == -(-file_bytes // 4096)
    assert totals.files == 2 + tree.images[0].index.inode_count
    assert totals.name_max == 255


# ---------------------------------------------------------------------------
# Reads


async def test_tree_reads_every_file(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    for path, data in sample.files.items():
        inode = await image_path(tree, sample, path)
        assert await tree.read(inode, 0, len(data) + 4096) == data, path


@pytest.mark.parametrize("offset, size", [
    (0, 1),
    (0, 1 << 20),
    ((1 << 20) - 10, 20),
    ((1 << 20) - 1, 1),
    (1 << 20, 1),
    (12345, 1_000_000),
    (0, 10 << 20),
    ((1 << 20) + 299_990, 100),
])
async def test_tree_read_ranges(store: ScriptedStore, sample: SampleImage, offset: int, size: int):
    tree = make_tree(store)
    inode = await image_path(tree, sample, b"data/two_chunks.bin")
    data = sample.files[b"data/two_chunks.bin"]

    assert await tree.read(inode, offset, size) == data[offset:offset + size]


async def test_tree_read_at_and_past_eof(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    inode = await image_path(tree, sample, b"data/small.txt")
    empty = await image_path(tree, sample, b"data/empty")
    size = len(sample_image.SMALL_DATA)

    assert await tree.read(inode, size, 10) == b""
    assert await tree.read(inode, size + 100, 10) == b""
    assert await tree.read(inode, 0, 0) == b""
    assert await tree.read(empty, 0, 4096) == b""
    assert sum(store.gets.values()) == 1


async def test_tree_read_of_directory_eisdir(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    data = await image_path(tree, sample, b"data")
    fifo = await image_path(tree, sample, b"dev/fifo")

    with pytest.raises(FilesystemError) as caught:
        await tree.read(data, 0, 10)
    assert_errno(caught, errno.EISDIR)
    with pytest.raises(FilesystemError) as caught:
        await tree.read(fifo, 0, 10)
    assert_errno(caught, errno.EINVAL)


async def test_tree_read_fetches_chunks_concurrently(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    inode = await image_path(tree, sample, b"data/two_chunks.bin")
    data = sample.files[b"data/two_chunks.bin"]
    store.hold()
    result = []

    async def read() -> None:
        result.append(await tree.read(inode, 0, len(data)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        # Both chunk requests are in flight before either returns.
        await trio.to_thread.run_sync(store.wait_until_held, 2)
        store.release()

    assert result == [data]
    assert store.chunk_gets() == 2


async def test_tree_packed_files_share_chunk(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)

    for path in (b"data/small.txt", b"bin/tool", b"links/hard1", b"xattrs"):
        inode = await image_path(tree, sample, path)
        assert await tree.read(inode, 0, 4096) == sample.files[path]

    assert store.chunk_gets() == 1
    counters = tree.status()[sample.digest]
    assert counters["reads"] == 4
    assert counters["chunk_reads"] == 4
    assert counters["fetched_chunks"] == 1


async def test_tree_missing_chunk_read_error(store: ScriptedStore):
    digest, addresses = publish_single_file_image(store, b"x" * 5000, store_chunks=False)
    tree = make_tree(store)
    root = await tree.lookup(IMAGES_INODE, digest.encode())
    inode = await tree.lookup(root, b"file.bin")

    with pytest.raises(ChunkReadError) as caught:
        await tree.read(inode, 0, 100)

    assert caught.value.image_digest == digest
    assert caught.value.address == addresses[0]
    assert isinstance(caught.value.__cause__, ObjectNotFound)
    assert tree.status()[digest]["read_errors"] == 1


async def test_tree_corrupt_chunk_read_error(store: ScriptedStore):
    digest, addresses = publish_single_file_image(store, b"y" * 5000)
    store.put(chunk_key(addresses[0]), encode(b"z" * 5000))
    tree = make_tree(store)
    root = await tree.lookup(IMAGES_INODE, digest.encode())
    inode = await tree.lookup(root, b"file.bin")

    with pytest.raises(ChunkReadError) as caught:
        await tree.read(inode, 0, 100)

    assert isinstance(caught.value.__cause__, IntegrityError)
    assert caught.value.address == addresses[0]


async def test_tree_one_bad_chunk_fails_whole_read(store: ScriptedStore):
    data = sample_image.deterministic_bytes(7, 3 * 4096)
    digest, addresses = publish_single_file_image(store, data, chunk_bytes=4096)
    store.replacements[chunk_key(addresses[1])] = encode(b"wrong")
    tree = make_tree(store)
    root = await tree.lookup(IMAGES_INODE, digest.encode())
    inode = await tree.lookup(root, b"file.bin")

    assert await tree.read(inode, 0, 4096) == data[:4096]
    with pytest.raises(ChunkReadError) as caught:
        await tree.read(inode, 0, len(data))

    assert caught.value.address == addresses[1]
    assert await tree.read(inode, 8192, 4096) == data[8192:]


async def test_tree_extent_past_chunk_rejected_at_attach(store: ScriptedStore):
    data = sample_image.deterministic_bytes(8, 1000)
    address = sample_image.put_chunk(store, data)
    node = Node(mode=stat.S_IFREG | 0o644, size=1500, extents=[(address, 0, 1000), (address, 500, 500)])
    # 600 bytes from offset 900 overrun the 1000-byte chunk.
    broken = Node(mode=stat.S_IFREG | 0o644, size=600, extents=[(address, 900, 600)])
    good = sample_image.publish_index(store, sample_image.directory({b"ok": node}), {address: len(data)})
    bad = sample_image.publish_index(store, sample_image.directory({b"ok": node, b"broken": broken}),
                                     {address: len(data)})
    tree = make_tree(store)

    root = await tree.lookup(IMAGES_INODE, good.encode())
    assert await tree.read(await tree.lookup(root, b"ok"), 0, 2000) == data + data[500:]
    with pytest.raises(IndexFormatError, match="has an extent that leaves a gap, overlaps or lies outside its chunk"):
        await tree.lookup(IMAGES_INODE, bad.encode())
