"""Index the debootstrap-built Debian images and compare them with ``umoci unpack``.

The unpacked tree is the reference: every path, type, mode, owner, mtime,
link count, hardlink identity, symlink target, device number, extended
attribute and every byte of file data must match the index. The tools image
is also mounted, and the mounted tree must match the unpacked one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lazyfs.store import open_store
from tests.support import images, oci, trees
from tests.support.daemon import running_daemon

pytestmark = pytest.mark.image


def _disk_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {os.fsencode(name): os.getxattr(path, name, follow_symlinks=False) for name in names}


def compare_with_rootfs(tree: oci.TreeView, rootfs: Path) -> list[str]:
    """Return every difference between the indexed tree and an unpacked rootfs."""
    differences = []
    root = os.fsencode(rootfs)
    disk_inode_of = {}
    for path, number in tree.index.walk():
        record = tree.index.inode(number)
        full = os.path.join(root, path) if path else root
        try:
            disk = os.lstat(full)
        except FileNotFoundError:
            differences.append(f"{path!r}: only in the index")
            continue
        if (disk.st_mode, disk.st_uid, disk.st_gid) != (record.mode, record.uid, record.gid):
            differences.append(f"{path!r}: mode/uid/gid {oct(disk.st_mode)}/{disk.st_uid}/{disk.st_gid} "
                               f"on disk, {oct(record.mode)}/{record.uid}/{record.gid} in the index")
        # umoci gives the root the unpack time and cannot set a symlink's mtime
        # on every kernel, so those two are not compared.
        if path and not stat.S_ISLNK(disk.st_mode) and disk.st_mtime_ns != record.mtime_ns:
            differences.append(f"{path!r}: mtime {disk.st_mtime_ns} on disk, {record.mtime_ns} in the index")
        if not stat.S_ISDIR(disk.st_mode) and disk.st_nlink != record.nlink:
            differences.append(f"{path!r}: nlink {disk.st_nlink} on disk, {record.nlink} in the index")
        if disk_inode_of.setdefault(disk.st_ino, number) != number:
            differences.append(f"{path!r}: hardlink identity differs")
        if stat.S_ISREG(disk.st_mode):
            with open(full, "rb") as stream:
                if stream.read() != tree.read(path):
                    differences.append(f"{path!r}: file data differs")
        elif stat.S_ISLNK(disk.st_mode) and os.readlink(full) != tree.readlink(path):
            differences.append(f"{path!r}: symlink target differs")
        elif (stat.S_ISCHR(disk.st_mode) or stat.S_ISBLK(disk.st_mode)) and disk.st_rdev != record.rdev:
            differences.append(f"{path!r}: device number differs")
        if _disk_xattrs(full) != tree.xattrs(path):
            differences.append(f"{path!r}: xattrs {_disk_xattrs(full)} on disk, {tree.xattrs(path)} in the index")
    indexed = tree.paths()
    for directory, names, files in os.walk(root):
        for name in names + files:
            relative = os.path.relpath(os.path.join(directory, name), root)
            if relative not in indexed:
                differences.append(f"{relative!r}: only on disk")
    return differences


def test_debootstrap_image_matches_umoci_unpack(debootstrap_image, tmp_path):
    layout, tag = debootstrap_image
    store_url = (tmp_path / "store").as_uri()

    run = oci.run_indexer("--store", store_url, "--json", f"oci:{layout}:{tag}")

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), run.result["manifest_digest"])
    rootfs = images.umoci_unpack(layout, tag, tmp_path / "bundle")
    assert compare_with_rootfs(tree, rootfs) == []
    assert tree.index.config["config"]["Cmd"] == ["/usr/bin/python3"]
    assert run.result["files"] > 5000

    again = oci.run_indexer("--store", store_url, "--json", f"oci:{layout}:{tag}")
    assert again.code == 0, again.stderr
    assert again.result["index_digest"] == run.result["index_digest"]
    assert again.result["chunks_new"] == 0


@pytest.mark.fuse
def test_tools_image_mount_matches_umoci_unpack(tools_image, tmp_path):
    layout, tag = tools_image
    store_url = (tmp_path / "store").as_uri()

    run = oci.run_indexer("--store", store_url, "--json", f"oci:{layout}:{tag}")

    assert run.code == 0, run.stderr
    assert run.result["layers"] == 3
    tree = oci.TreeView(open_store(store_url), run.result["manifest_digest"])
    rootfs = images.umoci_unpack(layout, tag, tmp_path / "bundle")
    assert compare_with_rootfs(tree, rootfs) == []
    # The packages and the third layer's whiteouts that make this image worth testing.
    assert tree.xattrs(b"usr/bin/ping")[b"security.capability"][:4] == b"\x01\x00\x00\x02"
    assert tree.inode(b"usr/bin/sudo").mode == stat.S_IFREG | 0o4755
    assert tree.inode(b"var/mail").mode == stat.S_IFDIR | 0o2775
    assert b"usr/share/doc" not in tree.paths()
    assert b"usr/bin/perl" in tree.paths()
    assert b"etc/ssl/certs/ca-certificates.crt" in tree.paths()

    with running_daemon(directory=tmp_path / "daemon", store_url=store_url) as daemon:
        mounted = daemon.image(run.result["index_digest"])
        expected = trees.snapshot(rootfs, with_nlink=True)
        actual = trees.snapshot(mounted, with_nlink=True)
        # umoci gives the root directory the time of the unpack, not the image's.
        del expected[trees.ROOT], actual[trees.ROOT]
        differences = trees.diff(expected, actual)
        assert not differences, "\n".join(differences)
        assert trees.hardlink_groups(mounted) == trees.hardlink_groups(rootfs)
