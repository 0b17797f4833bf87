"""Layer flattening: whiteouts, replacement, hardlinks, attributes and hostile names.

Each test writes a synthetic OCI layout, runs ``lazyfs-index`` on it into a
``file://`` store and reads the index back.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from lazyfs.store import open_store
from tests.support import oci
from tests.support.oci import Layer, directory, file, hardlink, opaque, symlink, whiteout


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def index_layers(tmp_path: Path, store_url: str, *layers: list[oci.Entry]) -> oci.TreeView:
    image = oci.write_image(tmp_path / "layout", [Layer(entries) for entries in layers])
    run = oci.run_indexer("--store", store_url, image.source)
    assert run.code == 0, run.stderr
    return oci.TreeView(open_store(store_url), image.manifest_digest)


def index_rejected(tmp_path: Path, store_url: str, *layers: list[oci.Entry]) -> tuple[oci.Image, oci.IndexerRun]:
    image = oci.write_image(tmp_path / "layout", [Layer(entries) for entries in layers])
    run = oci.run_indexer("--store", store_url, image.source)
    store = open_store(store_url)
    assert store.list("indexes/") == []
    assert store.list("refs/") == []
    return image, run


# -- whiteouts ---------------------------------------------------------------


def test_opaque_directory_with_whiteout_in_same_layer(tmp_path, store_url):
    lower = [directory("etc"), file("etc/old1", b"1"), file("etc/old2", b"2"),
             directory("etc/sub"), file("etc/sub/deep", b"3"), file("keep", b"k")]
    upper = [directory("etc", mode=0o750, mtime=5), opaque("etc"), file("etc/new1", b"a"),
             file("etc/new2", b"b"), whiteout("etc/new1")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.listdir(b"etc") == [b"new2"]
    assert tree.read(b"etc/new2") == b"b"
    assert tree.inode(b"etc").mode == stat.S_IFDIR | 0o750
    assert tree.listdir() == [b"etc", b"keep"]


def test_opaque_keeps_entries_before_and_after_marker(tmp_path, store_url):
    lower = [directory("d"), file("d/old", b"old"), directory("d/sub"), file("d/sub/old", b"x")]
    upper = [directory("d"), file("d/before", b"b"), directory("d/sub"), opaque("d"),
             file("d/after", b"a")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.listdir(b"d") == [b"after", b"before", b"sub"]
    # d/sub is in the upper layer, but its lower content is hidden with the rest of d.
    assert tree.listdir(b"d/sub") == []


def test_opaque_marker_hides_lower_subtrees_recursively(tmp_path, store_url):
    lower = [directory("d"), directory("d/a"), file("d/a/lower", b"l"), file("d/x", b"x")]
    upper = [opaque("d"), file("d/a/upper", b"u")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.listdir(b"d") == [b"a"]
    assert tree.listdir(b"d/a") == [b"upper"]


def test_opaque_marker_in_root(tmp_path, store_url):
    lower = [file("a", b"a"), directory("b"), file("b/c", b"c")]
    upper = [file("new", b"n"), opaque("")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.paths() == {b"new"}


def test_root_whiteout_keeps_namesakes_in_subdirectories(tmp_path, store_url):
    lower = [file("foo", b"top"), directory("sub"), file("sub/foo", b"sub"), directory("a"),
             directory("a/b"), file("a/b/foo", b"deep")]
    upper = [whiteout("foo")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.paths() == {b"sub", b"sub/foo", b"a", b"a/b", b"a/b/foo"}
    assert tree.read(b"sub/foo") == b"sub"
    assert tree.read(b"a/b/foo") == b"deep"


def test_whiteout_removes_directory_tree(tmp_path, store_url):
    lower = [directory("d"), directory("d/e"), file("d/e/f", b"f"), file("other", b"o")]
    upper = [whiteout("d")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.paths() == {b"other"}


def test_whiteout_of_missing_name_changes_nothing(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [file("a", b"a")], [whiteout("nothing"), whiteout("d/nothing")])

    # The whiteout's parent directory exists in the layer, so it appears (empty).
    assert tree.paths() == {b"a", b"d"}
    assert tree.listdir(b"d") == []


def test_whiteout_before_entry_in_same_layer_keeps_entry(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [file("x", b"lower")], [whiteout("x"), file("x", b"upper")])

    assert tree.read(b"x") == b"upper"


def test_aufs_metadata_entries_are_skipped(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [
        file("a", b"a"), directory(".wh..wh.plnk"), file(".wh..wh.plnk/1234.5678", b"x"),
        file(".wh..wh.aufs", b""), directory("d"), file("d/.wh..wh.other", b"")])

    assert tree.paths() == {b"a", b"d"}


# -- replacement -------------------------------------------------------------


def test_two_entries_for_one_path_last_wins(tmp_path, store_url):
    entries = [file("x", b"first"), file("x", b"second", mode=0o600),
               file("y", b"file"), directory("y", mode=0o700),
               directory("z"), file("z/child", b"c"), file("z", b"now a file"),
               symlink("w", "one"), symlink("w", "two")]
    tree = index_layers(tmp_path, store_url, entries)

    assert tree.listdir() == [b"w", b"x", b"y", b"z"]
    assert tree.read(b"x") == b"second"
    assert tree.inode(b"x").mode == stat.S_IFREG | 0o600
    assert tree.inode(b"y").mode == stat.S_IFDIR | 0o700
    assert tree.listdir(b"y") == []
    assert tree.read(b"z") == b"now a file"
    assert tree.readlink(b"w") == b"two"


def test_directory_over_directory_keeps_children_and_takes_attributes(tmp_path, store_url):
    lower = [directory("d", mode=0o755, mtime=1), file("d/x", b"x")]
    upper = [directory("d", mode=0o700, uid=7, gid=8, mtime=2, xattrs={b"user.new": b"v"})]
    tree = index_layers(tmp_path, store_url, lower, upper)

    record = tree.inode(b"d")
    assert tree.listdir(b"d") == [b"x"]
    assert record.mode == stat.S_IFDIR | 0o700
    assert (record.uid, record.gid) == (7, 8)
    assert record.mtime_ns == 2_000_000_000
    assert tree.xattrs(b"d") == {b"user.new": b"v"}


def test_directory_replaces_file_and_file_replaces_directory(tmp_path, store_url):
    lower = [file("f", b"file"), directory("d"), file("d/x", b"x")]
    upper = [directory("f"), file("f/inner", b"i"), file("d", b"was a directory")]
    tree = index_layers(tmp_path, store_url, lower, upper)

    assert tree.paths() == {b"f", b"f/inner", b"d"}
    assert tree.file_type(b"f") == stat.S_IFDIR
    assert tree.read(b"d") == b"was a directory"


def test_missing_parents_are_created(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [file("a/b/c", b"c", uid=5, mtime=99)])

    for path in (b"a", b"a/b"):
        record = tree.inode(path)
        assert record.mode == stat.S_IFDIR | 0o755
        assert (record.uid, record.gid, record.mtime_ns) == (0, 0, 0)
    assert tree.read(b"a/b/c") == b"c"


def test_root_entry_sets_root_attributes(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url,
                        [directory("./", mode=0o700, uid=3, gid=4, mtime=10), file("./etc/x", b"x")])

    root = tree.index.inode(0)
    assert root.mode == stat.S_IFDIR | 0o700
    assert (root.uid, root.gid, root.mtime_ns) == (3, 4, 10_000_000_000)
    assert tree.paths() == {b"etc", b"etc/x"}


def test_root_without_entry_gets_defaults(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [file("x", b"x")])

    root = tree.index.inode(0)
    assert root.mode == stat.S_IFDIR | 0o755
    assert (root.uid, root.gid, root.mtime_ns) == (0, 0, 0)


# -- hardlinks ---------------------------------------------------------------


def test_hardlink_chain_shares_one_inode(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url,
                        [file("a", b"shared", mode=0o640, uid=9), hardlink("b", "a"), hardlink("dir/c", "b")])

    numbers = {tree.inodes[path] for path in (b"a", b"b", b"dir/c")}
    assert len(numbers) == 1
    record = tree.inode(b"a")
    assert record.nlink == 3
    assert record.mode == stat.S_IFREG | 0o640
    assert record.uid == 9
    assert tree.read(b"dir/c") == b"shared"


def test_replaced_hardlink_keeps_old_inode(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [file("a", b"old"), hardlink("b", "a")], [file("a", b"new")])

    assert tree.read(b"a") == b"new"
    assert tree.read(b"b") == b"old"
    assert tree.inode(b"a").nlink == 1
    assert tree.inode(b"b").nlink == 1
    assert tree.inodes[b"a"] != tree.inodes[b"b"]


def test_hardlink_across_layers(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [file("lib/x", b"x")], [hardlink("bin/x", "./lib/x")])

    assert tree.inodes[b"lib/x"] == tree.inodes[b"bin/x"]
    assert tree.inode(b"bin/x").nlink == 2


def test_hardlink_to_symlink(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [symlink("s", "target"), hardlink("h", "s")])

    assert tree.inodes[b"s"] == tree.inodes[b"h"]
    assert tree.readlink(b"h") == b"target"
    assert tree.inode(b"h").nlink == 2


@pytest.mark.parametrize("entries, message", [
    ([hardlink("h", "missing")], "hardlink target 'missing' does not exist"),
    ([directory("d"), hardlink("h", "d")], "hardlink target 'd' is a directory"),
    ([file("a", b"a"), whiteout("a"), hardlink("h", "a")], "hardlink target 'a' does not exist"),
], ids=["missing", "directory", "whited-out"])
def test_invalid_hardlink_is_rejected(tmp_path, store_url, entries, message):
    image, run = index_rejected(tmp_path, store_url, entries)

    assert run.code == 3
    assert message in run.stderr
    assert image.layer_digests[0] in run.stderr


# -- hostile names ---------------------------------------------------------------


@pytest.mark.parametrize("layers, entry, message", [
    ([[file("../x", b"x")]], "../x", "the name contains a '..' component"),
    ([[file("a/../../x", b"x")]], "a/../../x", "the name contains a '..' component"),
    ([[file("/abs", b"x")]], "/abs", "the name is an absolute path"),
    ([[symlink("link", "/etc"), file("link/passwd", b"x")]], "link/passwd",
     "leads through the symlink 'link'"),
    ([[symlink("link", ".")], [file("link/x", b"x")]], "link/x", "leads through the symlink 'link'"),
    ([[directory("d"), symlink("d/up", "..")], [directory("d/up/etc")]], "d/up/etc",
     "leads through the symlink 'd/up'"),
    ([[file("f", b"f"), file("f/x", b"x")]], "f/x", "leads through 'f', which is not a directory"),
    ([[hardlink("h", "../etc/passwd")]], "h", "hardlink target '../etc/passwd' contains a '..' component"),
    ([[hardlink("h", "/etc/passwd")]], "h", "hardlink target '/etc/passwd' is an absolute path"),
    ([[symlink("link", "/etc"), hardlink("h", "link/passwd")]], "h",
     "hardlink target leads through the symlink 'link'"),
    ([[file(".wh..", b"")]], ".wh..", "whiteout names no entry"),
    ([[symlink("long", "x" * 4096)]], "long", "symlink target is longer than 4095 bytes"),
], ids=["dotdot", "dotdot-nested", "absolute", "symlink-parent", "symlink-parent-lower-layer",
        "symlink-parent-dotdot", "file-parent", "hardlink-dotdot", "hardlink-absolute",
        "hardlink-through-symlink", "whiteout-dotdot", "symlink-target-4096-bytes"])
def test_hostile_entry_is_rejected(tmp_path, store_url, layers, entry, message):
    image, run = index_rejected(tmp_path, store_url, *layers)

    assert run.code == 3
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lazyfs-index: error: ")
    assert image.source in lines[0]
    assert image.layer_digests[-1] in lines[0]
    assert f"entry {entry!r}" in lines[0]
    assert message in lines[0]


# -- entry kinds and attributes ----------------------------------------------------


def test_symlink_targets_are_exact_bytes(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [
        symlink("absolute", "/etc/passwd"), symlink("dangling", "no/such/target"),
        symlink("self", "self"), symlink("binary", b"caf\xe9/\xff")])

    assert tree.readlink(b"absolute") == b"/etc/passwd"
    assert tree.readlink(b"dangling") == b"no/such/target"
    assert tree.readlink(b"self") == b"self"
    assert tree.readlink(b"binary") == b"caf\xe9/\xff"
    record = tree.inode(b"binary")
    assert record.mode == stat.S_IFLNK | 0o777
    assert record.size == 6


def test_modes_owners_and_nanosecond_mtime(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [
        file("setuid", b"u", mode=0o4755, uid=1000, gid=100, mtime="1700000000.123456789"),
        file("setgid", b"g", mode=0o2711),
        directory("tmp", mode=0o1777, mtime=1234),
        file("big-ids", b"i", uid=4_000_000_000, gid=3_000_000_000),
        file("old", b"o", mtime="-1.5"),
    ])

    setuid = tree.inode(b"setuid")
    assert setuid.mode == stat.S_IFREG | 0o4755
    assert (setuid.uid, setuid.gid) == (1000, 100)
    assert setuid.mtime_ns == 1_700_000_000_123_456_789
    assert tree.inode(b"setgid").mode == stat.S_IFREG | 0o2711
    assert tree.inode(b"tmp").mode == stat.S_IFDIR | 0o1777
    assert tree.inode(b"tmp").mtime_ns == 1_234_000_000_000
    assert (tree.inode(b"big-ids").uid, tree.inode(b"big-ids").gid) == (4_000_000_000, 3_000_000_000)
    assert tree.inode(b"old").mtime_ns == -1_500_000_000


def test_xattrs_keep_exact_bytes(tmp_path, store_url):
    binary = bytes(range(256))
    capability = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    tree = index_layers(tmp_path, store_url, [
        file("f", b"f", xattrs={b"user.binary": binary, b"security.capability": capability,
                                b"user.text": "v\u00e4lue".encode()}),
        directory("d", xattrs={b"trusted.overlay.x": b"y"})])

    assert tree.xattrs(b"f") == {b"security.capability": capability, b"user.binary": binary,
                                 b"user.text": "v\u00e4lue".encode()}
    assert tree.xattrs(b"d") == {b"trusted.overlay.x": b"y"}


def test_devices_and_fifo(tmp_path, store_url):
    tree = index_layers(tmp_path, store_url, [
        oci.device("dev/null", "char", 1, 3, mode=0o666), oci.device("dev/sda", "block", 8, 0),
        oci.device("dev/big", "char", 511, 70000), oci.fifo("run/pipe", mode=0o620)])

    assert tree.inode(b"dev/null").mode == stat.S_IFCHR | 0o666
    assert tree.inode(b"dev/null").rdev == os.makedev(1, 3)
    assert tree.inode(b"dev/sda").mode == stat.S_IFBLK | 0o600
    assert tree.inode(b"dev/sda").rdev == os.makedev(8, 0)
    assert tree.inode(b"dev/big").rdev == os.makedev(511, 70000)
    assert tree.inode(b"run/pipe").mode == stat.S_IFIFO | 0o620


def test_names_that_are_not_utf8(tmp_path, store_url):
    latin1 = b"caf\xe9"
    invalid = b"\xff\xfe-\x80"
    tree = index_layers(tmp_path, store_url, [
        directory(latin1), file(latin1 + b"/" + invalid, b"data"), hardlink(b"link-" + invalid, latin1 + b"/" + invalid)])

    assert tree.paths() == {latin1, latin1 + b"/" + invalid, b"link-" + invalid}
    assert tree.read(latin1 + b"/" + invalid) == b"data"
    assert tree.inode(b"link-" + invalid).nlink == 2


def test_unsupported_entry_type_is_rejected(tmp_path, store_url):
    # Swap the type flag for GNU's volume header, which an image has no use for.
    tar = oci.tar_bytes([file("vol", b"")])
    header_offset = tar.index(b"vol\0")
    assert tar[header_offset + 156:header_offset + 157] == b"0"
    mangled = tar[:header_offset + 148] + b" " * 8 + b"V" + tar[header_offset + 157:]
    checksum = sum(mangled[header_offset:header_offset + 512])
    mangled = mangled[:header_offset + 148] + f"{checksum:06o}\0 ".encode() + mangled[header_offset + 156:]
    image = oci.write_image(tmp_path / "layout", [Layer(tar=mangled)])
    run = oci.run_indexer("--store", store_url, image.source)

    assert run.code == 3
    assert "entry 'vol': unsupported tar entry type 'V'" in run.stderr
    assert open_store(store_url).list("indexes/") == []


def test_empty_layer(tmp_path, store_url):
    # Docker writes layers without changes as an empty archive: zero blocks only.
    tree = index_layers(tmp_path, store_url, [file("a", b"a")], [], [file("b", b"b")])

    assert tree.paths() == {b"a", b"b"}


@pytest.mark.parametrize("tar_format", ["posix", "gnu"])
def test_sparse_file_from_gnu_tar(tmp_path, store_url, tar_format):
    if shutil.which("tar") is None or b"GNU tar" not in subprocess.run(
            ["tar", "--version"], capture_output=True).stdout:
        pytest.skip("GNU tar is missing")
    source = tmp_path / "source"
    source.mkdir()
    data = bytearray(5 << 20)
    data[3_000_000:3_000_005] = b"hello"
    data += b"tail"
    with open(source / "sparse.bin", "wb") as stream:
        stream.truncate(5 << 20)
        stream.seek(3_000_000)
        stream.write(b"hello")
        stream.seek(5 << 20)
        stream.write(b"tail")
    archive = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-C", str(source), "-cf", str(archive),
                    "sparse.bin"], check=True)
    image = oci.write_image(tmp_path / "layout", [Layer(tar=archive.read_bytes())])

    run = oci.run_indexer("--store", store_url, image.source)

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), image.manifest_digest)
    assert tree.inode(b"sparse.bin").size == len(data)
    assert tree.read(b"sparse.bin") == bytes(data)
