"""The pyfuse3 adapter called directly: errno translation, EROFS, cache settings."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pyfuse3
import pytest

from lazyfs.errors import StoreUnavailable
from lazyfs.fuse_ops import IMAGE_CACHE_TIMEOUT_S, SHORT_CACHE_TIMEOUT_S, Operations
from lazyfs.refs import index_key
from lazyfs.tree import IMAGES_INODE
from lazyfs.store_tier import StoreTier
from lazyfs.tiers import RamTier, TierChain
from lazyfs.tree import IMAGES_INODE, ROOT_INODE, Tree
from tests.support import sample_image
from tests.support.sample_image import SampleImage, publish_sample_image, publish_single_file_image
from tests.support.stores import ScriptedStore


@pytest.fixture
def store(tmp_path: Path) -> ScriptedStore:
    return ScriptedStore(tmp_path / "store")


@pytest.fixture
def sample(store: ScriptedStore) -> SampleImage:
    return publish_sample_image(store)


@pytest.fixture
def operations(store: ScriptedStore) -> Operations:
    return Operations(Tree(store, TierChain([RamTier(64 << 20), StoreTier(store)])))


async def lookup_path(operations: Operations, sample: SampleImage, path: bytes) -> int:
    inode = (await operations.lookup(IMAGES_INODE, sample.digest.encode(), None)).st_ino
    for name in path.split(b"/"):
        if name:
            inode = (await operations.lookup(inode, name, None)).st_ino
    return inode


def assert_fuse_errno(caught: pytest.ExceptionInfo, expected: int) -> None:
    assert caught.value.errno == expected, os.strerror(caught.value.errno)


MUTATING_CALLS = {
    "setattr": lambda ops, inode: ops.setattr(inode, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(),
                                              None, None),
    "mknod": lambda ops, inode: ops.mknod(inode, b"node", 0o644, 0, None),
    "mkdir": lambda ops, inode: ops.mkdir(inode, b"dir", 0o755, None),
    "unlink": lambda ops, inode: ops.unlink(inode, b"small.txt", None),
    "rmdir": lambda ops, inode: ops.rmdir(inode, b"nested", None),
    "symlink": lambda ops, inode: ops.symlink(inode, b"link", b"target", None),
    "rename": lambda ops, inode: ops.rename(inode, b"small.txt", inode, b"other", 0, None),
    "link": lambda ops, inode: ops.link(inode, inode, b"hardlink", None),
    "create": lambda ops, inode: ops.create(inode, b"new", 0o644, os.O_WRONLY, None),
    "write": lambda ops, inode: ops.write(inode, 0, b"data"),
    "setxattr": lambda ops, inode: ops.setxattr(inode, b"user.x", b"1", None),
    "removexattr": lambda ops, inode: ops.removexattr(inode, b"user.x", None),
}


@pytest.mark.parametrize("call", list(MUTATING_CALLS))
async def test_ops_mutation_erofs(operations: Operations, sample: SampleImage, call: str):
    inode = await lookup_path(operations, sample, b"data")

    with pytest.raises(pyfuse3.FUSEError) as caught:
        await MUTATING_CALLS[call](operations, inode)

    assert_fuse_errno(caught, errno.EROFS)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_APPEND,
                                   os.O_RDONLY | os.O_TRUNC])
async def test_ops_open_for_write_erofs(operations: Operations, sample: SampleImage, flags: int):
    inode = await lookup_path(operations, sample, b"data/small.txt")

    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.open(inode, flags, None)

    assert_fuse_errno(caught, errno.EROFS)


async def test_ops_open_keeps_page_cache(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data/small.txt")

    info = await operations.open(inode, os.O_RDONLY, None)

    assert info.fh == inode
    assert info.keep_cache
    assert not info.direct_io
    assert await operations.read(info.fh, 0, 4096) == sample_image.SMALL_DATA


async def test_ops_open_directory_eisdir(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data")

    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.open(inode, os.O_RDONLY, None)

    assert_fuse_errno(caught, errno.EISDIR)


async def test_ops_opendir_of_file_enotdir(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data/small.txt")

    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.opendir(inode, None)

    assert_fuse_errno(caught, errno.ENOTDIR)


async def test_ops_cache_timeouts(operations: Operations, sample: SampleImage):
    image_entry = await operations.lookup(IMAGES_INODE, sample.digest.encode(), None)
    file_entry = await operations.lookup(image_entry.st_ino, b"data", None)
    images_entry = await operations.lookup(ROOT_INODE, b"images", None)
    root = await operations.getattr(ROOT_INODE, None)

    assert image_entry.entry_timeout == image_entry.attr_timeout == IMAGE_CACHE_TIMEOUT_S
    assert file_entry.entry_timeout == file_entry.attr_timeout == IMAGE_CACHE_TIMEOUT_S
    assert images_entry.entry_timeout == images_entry.attr_timeout == SHORT_CACHE_TIMEOUT_S
    assert root.attr_timeout == SHORT_CACHE_TIMEOUT_S


async def test_ops_entry_attributes(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"dev/null")

    entry = await operations.getattr(inode, None)

    assert entry.st_ino == inode
    assert entry.st_rdev == sample_image.DEVICE_RDEV
    assert entry.st_mtime_ns == entry.st_atime_ns == entry.st_ctime_ns == sample_image.MTIME_NS
    assert entry.generation == 0


async def test_ops_missing_name_cached_negative(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data")

    entry = await operations.lookup(inode, b"absent", None)

    # st_ino 0 is a negative entry, which the kernel keeps for entry_timeout.
    assert entry.st_ino == 0
    assert entry.entry_timeout == IMAGE_CACHE_TIMEOUT_S


async def test_ops_missing_image_enoent(operations: Operations):
    # An image may be published later, so a missing one is not cached.
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.lookup(IMAGES_INODE, b"0" * 64, None)

    assert_fuse_errno(caught, errno.ENOENT)


async def test_ops_lookup_under_file_enotdir(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data/small.txt")

    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.lookup(inode, b"child", None)

    assert_fuse_errno(caught, errno.ENOTDIR)


async def test_ops_missing_xattr_enodata(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"xattrs")

    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.getxattr(inode, b"user.absent", None)

    assert_fuse_errno(caught, errno.ENODATA)
    assert await operations.listxattr(inode, None) == sorted(sample_image.XATTRS)


async def test_ops_missing_chunk_eio_logged(operations: Operations, store: ScriptedStore,
                                            caplog: pytest.LogCaptureFixture):
    digest, addresses = publish_single_file_image(store, b"q" * 100, store_chunks=False)
    root = (await operations.lookup(IMAGES_INODE, digest.encode(), None)).st_ino
    inode = (await operations.lookup(root, b"file.bin", None)).st_ino

    with caplog.at_level(logging.ERROR, logger="lazyfs.fuse_ops"):
        for _ in range(3):
            with pytest.raises(pyfuse3.FUSEError) as caught:
                await operations.read(inode, 0, 100)
            assert_fuse_errno(caught, errno.EIO)

    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"image {digest}, chunk {addresses[0].hex()}" in errors[0].getMessage()
    assert operations.error_log.suppressed == 2


async def test_ops_store_failure_on_lookup_eio(operations: Operations, store: ScriptedStore,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture):
    digest = "ef" * 32

    def unavailable(key: str) -> bytes:
        raise StoreUnavailable(f"get {key} failed after 5 attempts: connection refused")

    monkeypatch.setattr(store, "get", unavailable)
    with caplog.at_level(logging.ERROR, logger="lazyfs.fuse_ops"):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await operations.lookup(IMAGES_INODE, digest.encode(), None)

    assert_fuse_errno(caught, errno.EIO)
    assert f"get {index_key(digest)} failed after 5 attempts" in caplog.text


async def test_ops_unexpected_error_eio(operations: Operations, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture):
    def broken(inode: int):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(operations.tree, "getattr", broken)
    with caplog.at_level(logging.ERROR, logger="lazyfs.fuse_ops"):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await operations.getattr(ROOT_INODE, None)

    assert_fuse_errno(caught, errno.EIO)
    assert "unexpected error in getattr" in caplog.text
    assert "ZeroDivisionError: a bug" in caplog.text


async def test_ops_statfs(operations: Operations, sample: SampleImage):
    await operations.lookup(IMAGES_INODE, sample.digest.encode(), None)

    totals = await operations.statfs(None)

    assert totals.f_bsize == totals.f_frsize == 4096
    assert totals.f_blocks > 0
    assert totals.f_bfree == totals.f_bavail == 0
    assert totals.f_files == 23
    assert totals.f_namemax == 255


async def test_ops_access(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data/small.txt")

    assert await operations.access(inode, os.R_OK, None) is True
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.access(inode, os.W_OK, None)
    assert_fuse_errno(caught, errno.EROFS)


async def test_ops_no_op_handlers(operations: Operations, sample: SampleImage):
    inode = await lookup_path(operations, sample, b"data/small.txt")

    assert await operations.forget([(inode, 1)]) is None
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.flush(inode)
    assert_fuse_errno(caught, errno.ENOSYS)
    assert await operations.release(inode) is None
    assert await operations.fsync(inode, False) is None
    assert await operations.releasedir(inode) is None
