"""Synthetic images built with tarfile, indexed by lazyfs-index and read through a real mount.

Each case writes an OCI layout, indexes it into one ``file://`` store and
checks what the mounted tree shows through ordinary system calls.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
from pathlib import Path

import pytest
from fastcdc.fastcdc_cy import fastcdc_cy

from lazyfs.indexer.chunker import ChunkingParams
from lazyfs.refs import chunk_key
from lazyfs.store import open_store
from tests.support import oci
from tests.support.daemon import running_daemon

pytestmark = pytest.mark.fuse

PARAMS = ChunkingParams()


def _two_chunk_data() -> bytes:
    source = random.Random(11).randbytes(8 << 20)
    first, second = list(fastcdc_cy(source, PARAMS.min_chunk_bytes, PARAMS.avg_chunk_bytes,
                                     PARAMS.max_chunk_bytes))[:2]
    return source[:first.length + second.length]


TWO_CHUNKS = _two_chunk_data()

# A revision-2 file capability: effective, permitted CAP_NET_BIND_SERVICE. The
# kernel rejects a malformed value on getxattr, so it must be well formed.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)

IMAGES = {
    "opaque": [
        oci.Layer([oci.directory("dir"), oci.file("dir/old1", b"1"), oci.file("dir/old2", b"2"),
                   oci.directory("dir/sub"), oci.file("dir/sub/deep", b"3")]),
        oci.Layer([oci.directory("dir", mode=0o750), oci.opaque("dir"), oci.file("dir/new1", b"n1"),
                   oci.file("dir/new2", b"n2"), oci.whiteout("dir/new1")], compression="zstd"),
    ],
    "root-whiteout": [
        oci.Layer([oci.file("name", b"top"), oci.directory("sub"), oci.file("sub/name", b"nested")]),
        oci.Layer([oci.whiteout("name")], compression="none"),
    ],
    "duplicate": [
        oci.Layer([oci.file("a", b"first"), oci.file("a", b"second", mode=0o600)]),
    ],
    "links": [
        oci.Layer([oci.file("h1", b"shared", mode=0o640), oci.hardlink("h2", "h1"), oci.hardlink("h3", "h2"),
                   oci.symlink("absolute", "/etc/passwd"), oci.symlink("dangling", "no/such/target"),
                   oci.symlink("self", "self")]),
    ],
    "sizes": [
        oci.Layer([oci.file("empty", b""), oci.file("two", TWO_CHUNKS)], compression="zstd"),
    ],
    "attributes": [
        oci.Layer([oci.file("suid", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=2000),
                   oci.directory("sticky", mode=0o1777), oci.file("none", b"x", mode=0o000),
                   oci.device("null", "char", 1, 3, mode=0o666), oci.device("loop", "block", 7, 0),
                   oci.fifo("pipe"), oci.file(b"caf\xe9", b"latin-1 name"),
                   oci.file("capable", b"bin", xattrs={"security.capability": CAPABILITY,
                                                       "user.note": b"hello"}),
                   oci.file("timed", b"t", mtime="1700000000.123456789")]),
    ],
}


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    """Index every image into one store, mount it; yield (daemon, {case: image root})."""
    base = tmp_path_factory.mktemp("synthetic")
    store_url = (base / "store").as_uri()
    digests = {}
    for case, layers in IMAGES.items():
        image = oci.write_image(base / "layouts" / case, layers)
        run = oci.run_indexer("--store", store_url, "--json", image.source)
        assert run.code == 0, run.stderr
        digests[case] = run.result["index_digest"]
    with running_daemon(directory=base / "daemon", store_url=store_url) as daemon:
        yield daemon, {case: daemon.image(digest) for case, digest in digests.items()}


def test_opaque_dir_with_same_layer_whiteout(mounted):
    _daemon, roots = mounted
    directory = roots["opaque"] / "dir"

    assert sorted(os.listdir(directory)) == ["new2"]
    assert (directory / "new2").read_bytes() == b"n2"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o750
    for hidden in ("old1", "old2", "sub", "new1", ".wh.new1", ".wh..wh..opq"):
        assert not os.path.lexists(directory / hidden)


def test_root_whiteout_keeps_nested_name(mounted):
    _daemon, roots = mounted
    root = roots["root-whiteout"]

    assert sorted(os.listdir(root)) == ["sub"]
    assert (root / "sub" / "name").read_bytes() == b"nested"


def test_duplicate_entry_last_wins(mounted):
    _daemon, roots = mounted
    root = roots["duplicate"]

    assert os.listdir(root) == ["a"]
    assert (root / "a").read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(root / "a").st_mode) == 0o600


def test_hardlink_chain_one_inode(mounted):
    _daemon, roots = mounted
    root = roots["links"]

    # The very first stat of a link, before any other access, already counts all three.
    first = os.stat(root / "h3")
    assert first.st_nlink == 3
    inodes = {name: os.stat(root / name).st_ino for name in ("h1", "h2", "h3")}
    assert len(set(inodes.values())) == 1
    for entry in os.scandir(root):
        assert entry.inode() == os.lstat(entry.path).st_ino
    assert (root / "h2").read_bytes() == b"shared"


def test_symlink_targets_exact(mounted):
    _daemon, roots = mounted
    root = roots["links"]

    assert os.readlink(os.fsencode(root / "absolute")) == b"/etc/passwd"
    assert os.readlink(os.fsencode(root / "dangling")) == b"no/such/target"
    assert os.readlink(os.fsencode(root / "self")) == b"self"
    assert os.lstat(root / "self").st_size == 4
    with pytest.raises(OSError) as caught:
        os.stat(root / "self")
    assert caught.value.errno == errno.ELOOP


def test_zero_size_and_two_chunk_files(mounted, tmp_path):
    daemon, roots = mounted
    root = roots["sizes"]

    assert os.stat(root / "empty").st_size == 0
    assert (root / "empty").read_bytes() == b""
    assert os.stat(root / "two").st_size == len(TWO_CHUNKS)
    fd = os.open(root / "two", os.O_RDONLY)
    try:
        assert os.pread(fd, len(TWO_CHUNKS) + 100, 0) == TWO_CHUNKS
        assert os.pread(fd, 4096, len(TWO_CHUNKS)) == b""
        assert os.pread(fd, 4096, len(TWO_CHUNKS) + 10_000) == b""
        assert os.pread(fd, 10, len(TWO_CHUNKS) - 4) == TWO_CHUNKS[-4:]
    finally:
        os.close(fd)
    digest = root.name
    assert daemon.status()["images"][digest]["chunks"] == 2


def test_modes_owners_devices_xattrs(mounted):
    _daemon, roots = mounted
    root = roots["attributes"]

    suid = os.stat(root / "suid")
    assert (stat.S_IMODE(suid.st_mode), suid.st_uid, suid.st_gid) == (0o4755, 1000, 2000)
    assert stat.S_IMODE(os.stat(root / "sticky").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(root / "none").st_mode) == 0
    null = os.lstat(root / "null")
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = os.lstat(root / "loop")
    assert stat.S_ISBLK(loop.st_mode)
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)
    assert b"caf\xe9" in os.listdir(os.fsencode(root))
    with open(os.path.join(os.fsencode(root), b"caf\xe9"), "rb") as latin:
        assert latin.read() == b"latin-1 name"
    assert os.getxattr(root / "capable", "security.capability") == CAPABILITY
    assert os.getxattr(root / "capable", "user.note") == b"hello"
    assert sorted(os.listxattr(root / "capable")) == ["security.capability", "user.note"]
    assert os.stat(root / "timed").st_mtime_ns == 1700000000123456789


def test_writes_fail_read_only(mounted):
    _daemon, roots = mounted
    root = roots["duplicate"]

    for action in (lambda: open(root / "a", "wb"), lambda: open(root / "new", "wb"),
                   lambda: os.mkdir(root / "d"), lambda: os.unlink(root / "a"),
                   lambda: os.setxattr(root / "a", "user.x", b"1")):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == errno.EROFS


def test_missing_chunk_is_eio(tmp_path):
    data = random.Random(5).randbytes(3 << 20)
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file("big", data), oci.file("small", b"ok")])])
    store_url = (tmp_path / "store").as_uri()
    run = oci.run_indexer("--store", store_url, "--json", image.source)
    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), run.result["index_digest"])
    victim = tree.extents(b"big")[1]
    (tmp_path / "store" / chunk_key(tree.index.chunk(victim.chunk)[0])).unlink()

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url,
                        store_max_attempts=1) as daemon:
        root = daemon.image(run.result["index_digest"])
        fd = os.open(root / "big", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == data[:4096]
            with pytest.raises(OSError) as caught:
                os.pread(fd, 4096, victim.file_offset)
            assert caught.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert (root / "small").read_bytes() == b"ok"
        assert daemon.status()["tiers"]["store"]["not_found"] == 1


def test_readahead_config_reaches_daemon(tmp_path):
    data = random.Random(9).randbytes(6 << 20)
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file("big", data)])])
    store_url = (tmp_path / "store").as_uri()
    run = oci.run_indexer("--store", store_url, "--json", image.source)
    assert run.code == 0, run.stderr

    prefetches = {}
    for readahead_chunks in (0, 2):
        with running_daemon(directory=tmp_path / f"daemon-{readahead_chunks}", store_url=store_url,
                            readahead_chunks=readahead_chunks) as daemon:
            assert (daemon.image(run.result["index_digest"]) / "big").read_bytes() == data
            prefetches[readahead_chunks] = daemon.status()["readahead"]["prefetches"]

    assert prefetches[0] == 0
    assert prefetches[2] > 0
