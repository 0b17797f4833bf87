"""Conformance of the flattened, mounted image with ``umoci unpack`` of the same image.

Each case is a real OCI image. All cases are indexed into one ``file://``
store and read through one mounted daemon. The mounted tree must equal what
``umoci unpack`` writes for the same image in paths, types, modes, owners,
sizes, SHA-256 of file data, symlink targets, hardlink groups and link counts,
xattrs, device numbers and mtimes. umoci gives the root directory the time of
the unpack, so only the root's mtime is not compared.

Where umoci rejects an input or differs from Docker on purpose, the case
carries the expected tree written out here, with the reason next to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from tests.support import images, oci, trees
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.oci import Layer, device, directory, fifo, file, hardlink, opaque, symlink, whiteout

pytestmark = pytest.mark.fuse

T0 = 1_700_000_000
T0_NS = T0 * 10**9

# A revision-2 file capability: effective, permitted CAP_NET_RAW. The kernel
# rejects a malformed value, so it must be well formed.
CAPABILITY = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")

LONG_A = "a" * 200
LONG_B = "b" * 240
LONG_C = "c" * 255
LONG_DIR = f"{LONG_A}/{LONG_B}"
LONG_FILE = f"{LONG_DIR}/{LONG_C}"


# -- expected trees, for inputs that umoci rejects or gets wrong ---------------

def expect_dir(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> trees.Entry:
    return trees.Entry("dir", mode, uid, gid, None, None, None, None, {}, mtime_ns, None)


def expect_file(data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime_ns: int = 0,
                nlink: int = 1) -> trees.Entry:
    return trees.Entry("file", mode, uid, gid, len(data), hashlib.sha256(data).hexdigest(), None, None,
                       {}, mtime_ns, nlink)


@dataclass
class Expected:
    """A tree written out by hand: paths (without the root) and hardlink groups."""

    entries: dict[bytes, trees.Entry]
    hardlinks: set[frozenset[bytes]] = field(default_factory=set)


@dataclass
class Case:
    """One image: its layers (or a function of a work directory that builds them).

    ``expected`` replaces the umoci reference, ``absent`` lists paths that a
    direct lookup must not find.
    """

    layers: list[Layer] | Callable[[Path], list[Layer]]
    expected: Expected | None = None
    absent: tuple[str, ...] = ()

    def build(self, work: Path) -> list[Layer]:
        return self.layers(work) if callable(self.layers) else self.layers


# -- tar dialects made with GNU tar ---------------------------------------------

# Each file's size and its data as (offset, bytes) pieces. The rest of a file is a hole.
SPARSE_FILES = {
    "all-hole": (1 << 20, []),
    "holes": (3 << 20, [(0, b"A" * 4096), ((1 << 20) + 5, b"B" * 100)]),
    "tail-data": (2 << 20, [((2 << 20) - 10, b"0123456789")]),
}


def sparse_data(name: str) -> bytes:
    size, pieces = SPARSE_FILES[name]
    data = bytearray(size)
    for offset, piece in pieces:
        data[offset:offset + len(piece)] = piece
    return bytes(data)


def _sparse_source(work: Path) -> Path:
    """Write the files of SPARSE_FILES with real holes, once, and return their directory."""
    source = work / "sparse-source"
    if source.exists():
        return source
    source.mkdir()
    for name, (size, pieces) in SPARSE_FILES.items():
        with open(source / name, "wb") as stream:
            for offset, piece in pieces:
                stream.seek(offset)
                stream.write(piece)
            stream.truncate(size)
        os.chmod(source / name, 0o640)
    return source


def sparse_layers(*options: str) -> Callable[[Path], list[Layer]]:
    def build(work: Path) -> list[Layer]:
        tar = oci.gnu_tar(_sparse_source(work), list(SPARSE_FILES), *options)
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            assert all(member.sparse for member in archive), "GNU tar wrote files without a sparse map"
        return [Layer(tar=tar, compression="none")]
    return build


def _sparse_pax(version: str) -> Callable[[Path], list[Layer]]:
    return sparse_layers("--format=posix", f"--sparse-version={version}",
                         "--pax-option=delete=atime,delete=ctime")


# -- raw tar variants -----------------------------------------------------------

SMALL_TREE = [directory("etc", mtime=T0), file("etc/hostname", b"conformance\n", mtime=T0),
              directory("usr", mtime=T0), file("usr/data", random.Random(3).randbytes(300_000), mtime=T0)]


def _with_padding(tar: bytes) -> bytes:
    return tar + bytes(64 << 10)


def _fifo_without_device_fields() -> bytes:
    tar = oci.tar_bytes([directory("dev"), fifo("dev/pipe", mode=0o620, mtime=T0),
                         file("dev/after", b"after the fifo")], tar_format=tarfile.USTAR_FORMAT)
    return oci.with_empty_device_fields(tar, "dev/pipe")


def _zstd_frames(tar: bytes) -> bytes:
    """Return ``tar`` as three zstd frames, as pzstd writes a stream."""
    third = -(-len(tar) // 3)
    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(tar[start:start + third]) for start in range(0, len(tar), third))


# -- the cases ------------------------------------------------------------------

ZSTD_LOWER = [directory("app", mtime=T0), file("app/keep", b"keep", mtime=T0),
              file("app/gone", b"gone", mtime=T0), file("app/old", b"old", mtime=T0)]
ZSTD_UPPER = [whiteout("app/gone"), file("app/old", b"new", mode=0o600, mtime=T0),
              hardlink("app/link", "app/keep")]
SPARSE_EXPECTED = Expected(
    # umoci 0.4.7 rejects the GNU sparse entry type ("unknown typeflag '\x53'").
    {name.encode(): expect_file(sparse_data(name), mode=0o640, mtime_ns=T0_NS) for name in SPARSE_FILES})

GZIP_HEADER_CRC_EXPECTED = Expected(
    # umoci 0.4.7's gzip reader checks FHCRC against the first 10 header bytes
    # only and rejects a header with FEXTRA or FNAME ("gzip: invalid header").
    # RFC 1952 covers every header byte before the CRC, and GNU gzip accepts it.
    {b"etc": expect_dir(mtime_ns=T0_NS), b"etc/hostname": expect_file(b"conformance\n", mtime_ns=T0_NS),
     b"usr": expect_dir(mtime_ns=T0_NS), b"usr/data": expect_file(SMALL_TREE[3].data, mtime_ns=T0_NS)})

EMPTY_XATTR_EXPECTED = Expected(
    # umoci 0.4.7 reads Go's deprecated Header.Xattrs, where archive/tar skips
    # empty values. Docker and containerd set xattrs from Header.PAXRecords,
    # which keeps them, and lazyfs keeps them too.
    {b"f": dataclasses.replace(expect_file(b"f"), xattrs={"user.empty": b"", "user.set": b"1"})})

OPAQUE_SUBDIRECTORY_EXPECTED = Expected(
    # umoci 0.4.7 does not restore the mtime of d/sub after the opaque marker
    # removes its lower children, so d/sub shows the time of the unpack.
    # Docker and containerd set the mtime of every directory entry after the
    # whole layer is applied, so d/sub has its entry's mtime, 0.
    {b"d": expect_dir(), b"d/sub": expect_dir(), b"d/sub/new": expect_file(b"upper")})

MISSING_DIRECTORY_WHITEOUT_EXPECTED = Expected(
    # umoci 0.4.7 skips a whiteout whose directory is missing. Docker and
    # containerd create the missing parents of every entry, whiteouts included,
    # so the directories exist and are empty. lazyfs creates them too, with
    # mtime 0 where Docker shows the time of the unpack.
    {b"a": expect_file(b"a"), b"nodir": expect_dir(), b"nodir2": expect_dir(),
     b"nodir2/deeper": expect_dir()})

SAME_LAYER_WHITEOUT_EXPECTED = Expected(
    # The OCI image spec applies a whiteout to lower layers only, and umoci
    # 0.4.7 keeps the entries that come before it in the same layer. Docker's
    # and containerd's appliers remove them, and lazyfs does the same.
    {})

IMPLICIT_PARENTS_EXPECTED = Expected(
    # umoci, Docker and containerd create a missing parent directory with mode
    # 0755 and the time of the unpack. lazyfs gives it mtime 0, so that the
    # same image always gives the same index.
    {b"a": expect_dir(), b"a/b": expect_dir(), b"a/b/c": expect_dir(),
     b"a/b/c/file": expect_file(b"deep", mtime_ns=T0_NS), b"a/b/other": expect_file(b"other", mtime_ns=T0_NS)})

ZSTD_EXPECTED = Expected(
    # umoci 0.4.7 rejects the zstd layer media type ("blob is not correct mediatype").
    {b"app": expect_dir(mtime_ns=T0_NS), b"app/keep": expect_file(b"keep", mtime_ns=T0_NS, nlink=2),
     b"app/link": expect_file(b"keep", mtime_ns=T0_NS, nlink=2),
     b"app/old": expect_file(b"new", mode=0o600, mtime_ns=T0_NS)},
    {frozenset({b"app/keep", b"app/link"})})

CASES: dict[str, Case] = {
    # OCI layer semantics
    "whiteout-file": Case([
        Layer([directory("d"), file("d/a", b"a"), file("d/b", b"b")]),
        Layer([whiteout("d/a")])], absent=("d/a",)),
    "whiteout-directory-tree": Case([
        Layer([directory("d"), directory("d/x"), file("d/x/y", b"y"), file("keep", b"k")]),
        Layer([whiteout("d")])], absent=("d", "d/x/y")),
    "opaque-directory": Case([
        Layer([directory("d"), file("d/old", b"1"), directory("d/sub"), file("d/sub/deep", b"2")]),
        Layer([directory("d", mode=0o750, mtime=T0), opaque("d"), file("d/new", b"n")])],
        absent=("d/old", "d/sub", "d/sub/deep")),
    "opaque-hides-nested-lower-subdirectories": Case([
        Layer([directory("d"), directory("d/sub", mode=0o700, mtime=T0), directory("d/sub/deep"),
               file("d/sub/deep/file", b"lower"), file("d/sub/lower", b"lower")]),
        Layer([directory("d"), directory("d/sub"), file("d/sub/new", b"upper"), opaque("d")])],
        expected=OPAQUE_SUBDIRECTORY_EXPECTED, absent=("d/sub/deep", "d/sub/deep/file", "d/sub/lower")),
    "opaque-marker-before-entries": Case([
        Layer([directory("d"), directory("d/sub"), file("d/sub/lower", b"lower"), file("d/x", b"x")]),
        Layer([directory("d"), opaque("d"), directory("d/sub", mode=0o711), file("d/sub/new", b"upper")])],
        absent=("d/sub/lower", "d/x")),
    "opaque-root-directory": Case([
        Layer([directory("etc"), file("etc/old", b"old"), file("top", b"top")]),
        Layer([opaque(""), directory("etc"), file("etc/new", b"new")])],
        absent=("top", "etc/old")),
    "directory-file-directory": Case([
        Layer([directory("p"), file("p/child", b"lower"), directory("p/sub"), file("p/sub/x", b"x")]),
        Layer([file("p", b"now a file", mode=0o600)]),
        Layer([directory("p", mode=0o700), file("p/new", b"new")])],
        absent=("p/child", "p/sub")),
    "file-to-symlink": Case([
        Layer([directory("bin"), file("bin/tool", b"#!/bin/sh\n", mode=0o755)]),
        Layer([directory("bin"), symlink("bin/tool", "../usr/bin/tool")])]),
    "symlink-to-directory": Case([
        Layer([directory("target"), file("target/inside", b"t"), symlink("s", "target")]),
        Layer([directory("s", mode=0o750), file("s/own", b"own")])],
        absent=("s/inside",)),
    "file-to-directory": Case([
        Layer([file("f", b"file")]),
        Layer([directory("f"), file("f/child", b"c")])]),
    "deleted-directory-recreated-empty": Case([
        Layer([directory("d"), file("d/a", b"a"), directory("d/sub"), file("d/sub/b", b"b")]),
        Layer([whiteout("d")]),
        Layer([directory("d", mode=0o700), file("d/c", b"c")])],
        absent=("d/a", "d/sub")),
    "whiteout-then-directory-same-layer": Case([
        Layer([directory("d"), file("d/a", b"a")]),
        Layer([whiteout("d"), directory("d"), file("d/b", b"b")])],
        absent=("d/a",)),
    "whiteout-of-missing-path": Case([
        Layer([directory("d"), file("d/a", b"a")]),
        Layer([directory("d"), whiteout("d/ghost"), whiteout("ghost")])]),
    "whiteout-in-missing-directory": Case([
        Layer([file("a", b"a")]),
        Layer([whiteout("nodir/ghost"), whiteout("nodir2/deeper/ghost")])],
        expected=MISSING_DIRECTORY_WHITEOUT_EXPECTED),
    "entry-then-whiteout-same-layer": Case([
        Layer([file("a", b"lower")]),
        Layer([file("a", b"upper"), whiteout("a"), directory("d"), file("d/x", b"x"), whiteout("d")])],
        expected=SAME_LAYER_WHITEOUT_EXPECTED, absent=("a", "d")),
    "directory-to-symlink": Case([
        Layer([directory("d"), file("d/child", b"c"), directory("target")]),
        Layer([symlink("d", "target")])],
        absent=("d/child",)),
    "implicit-parent-directories": Case([
        Layer([file("a/b/c/file", b"deep", mtime=T0)]),
        Layer([file("a/b/other", b"other", mtime=T0)])], expected=IMPLICIT_PARENTS_EXPECTED),
    "root-directory-entry": Case([
        Layer([directory(".", mode=0o700, uid=5, gid=6, mtime=T0), file("./f", b"f", mtime=T0)])]),
    "dot-slash-names": Case([
        Layer([directory("./etc", mtime=T0), file("./etc/a", b"a", mtime=T0), hardlink("./etc/b", "./etc/a"),
               directory("usr/", mtime=T0), file("usr//x", b"x", mtime=T0)]),
        Layer([whiteout("./etc/a")])]),
    "whiteout-then-file-same-layer": Case([
        Layer([file("a", b"lower"), file("b", b"lower")]),
        Layer([whiteout("a"), file("a", b"upper", mode=0o600), whiteout("b")])]),
    "duplicate-entries-last-wins": Case([
        Layer([directory("d"), file("d/a", b"first"), file("d/a", b"second", mode=0o600),
               directory("d", mode=0o700, mtime=T0)])]),

    # hardlinks
    "hardlink-target-overwritten-later": Case([
        Layer([file("a", b"v1"), hardlink("b", "a"), hardlink("c", "a")]),
        Layer([file("a", b"v2", mode=0o600)])]),
    "hardlink-target-deleted-later": Case([
        Layer([file("a", b"v1", mode=0o640), hardlink("b", "a")]),
        Layer([whiteout("a")])]),
    "hardlink-to-lower-layer-file": Case([
        Layer([directory("lib"), file("lib/one", b"shared", mode=0o755, uid=7, gid=8)]),
        Layer([directory("bin"), hardlink("bin/two", "lib/one")])]),
    "hardlink-chain": Case([
        Layer([file("a", b"chain"), hardlink("b", "a"), hardlink("c", "b"), hardlink("d", "c")])]),
    "hardlink-before-target-rewritten": Case([
        Layer([file("a", b"v1"), hardlink("b", "a"), file("a", b"v2")])]),
    "hardlink-name-replaced-later": Case([
        Layer([file("a", b"v1"), hardlink("b", "a"), hardlink("c", "a")]),
        Layer([symlink("b", "a")])]),
    # NOTE: Docker's applier (moby's createTarFile) also applies a hardlink
    # header's mode, owner and mtime to the shared inode. umoci 0.4.7 and
    # lazyfs keep the target's. Tar writers that stat the one inode write the
    # same values into both headers, so real images rarely differ.
    "hardlink-header-attributes": Case([
        Layer([file("a", b"a", mode=0o644, mtime=T0), hardlink("b", "a", mode=0o600, uid=5, gid=6, mtime=T0 + 5,
                                                      xattrs={b"user.link": b"1"})])]),
    "directory-attributes-replaced": Case([
        Layer([directory("d", mode=0o700, uid=1, gid=2, mtime=T0, xattrs={b"user.lower": b"1"}), file("d/f", b"f")]),
        Layer([directory("d", mode=0o755, mtime=T0 + 1, xattrs={b"user.upper": b"2"})])]),
    "hardlink-to-symlink": Case([
        Layer([symlink("s", "target/path"), hardlink("h", "s")])]),
    "hardlink-to-device-and-fifo": Case([
        Layer([device("null", "char", 1, 3, mode=0o666), hardlink("null2", "null"),
               fifo("pipe"), hardlink("pipe2", "pipe")])]),

    # tar dialects
    "pax-long-names": Case([
        Layer([directory(LONG_A), directory(LONG_DIR), file(LONG_FILE, b"long"),
               hardlink(f"{LONG_A}/{LONG_C}", LONG_FILE), symlink(f"{LONG_DIR}/link", "../" * 30 + LONG_FILE)])]),
    "gnu-long-names": Case([
        Layer(tar=oci.tar_bytes([directory(LONG_A), directory(LONG_DIR), file(LONG_FILE, b"long"),
                                 hardlink(f"{LONG_A}/{LONG_C}", LONG_FILE),
                                 symlink(f"{LONG_DIR}/link", "../" * 30 + LONG_FILE)],
                                tar_format=tarfile.GNU_FORMAT))]),
    "non-utf8-names-pax": Case([
        Layer([directory(b"caf\xe9"), file(b"caf\xe9/\xff\xfe", b"latin"), symlink(b"link\x80", b"caf\xe9/\xff\xfe"),
               hardlink(b"hard\xc3", b"caf\xe9/\xff\xfe")])]),
    "non-utf8-names-gnu": Case([
        Layer(tar=oci.tar_bytes([directory(b"d\xe9"), file(b"d\xe9/" + b"\xff" * 150, b"long latin"),
                                 symlink(b"s\x80", b"\xfe" * 120)], tar_format=tarfile.GNU_FORMAT))]),
    "large-ids-pax": Case([
        Layer([file("octal", b"o", uid=70000, gid=65536), file("pax", b"p", uid=3_000_000, gid=4_000_000),
               directory("dir", uid=2_097_152, gid=100_000), symlink("link", "pax", uid=5_000_000)])]),
    "large-ids-gnu-base256": Case([
        Layer(tar=oci.tar_bytes([file("big", b"b", uid=3_000_000, gid=4_294_967_294),
                                 directory("dir", uid=2_097_152, gid=65537)], tar_format=tarfile.GNU_FORMAT))]),
    "sparse-gnu": Case(sparse_layers("--format=gnu", "--sparse"), expected=SPARSE_EXPECTED),
    "sparse-pax-0.0": Case(_sparse_pax("0.0")),
    "sparse-pax-0.1": Case(_sparse_pax("0.1")),
    "sparse-pax-1.0": Case(_sparse_pax("1.0")),
    "xattrs": Case([
        Layer([directory("d", xattrs={b"user.dir": b"on a directory"}),
               file("d/ping", b"\x7fELF", mode=0o755, xattrs={b"security.capability": CAPABILITY}),
               file("d/notes", b"n", xattrs={b"user.a": b"1", b"user.binary": b"\x00\xff\x01"}),
               file("d/replaced", b"x", xattrs={b"user.old": b"1"})]),
        Layer([directory("d"), file("d/replaced", b"y", xattrs={b"user.new": b"2"})])]),
    "xattr-with-empty-value": Case([
        Layer([file("f", b"f", xattrs={b"user.empty": b"", b"user.set": b"1"})])], expected=EMPTY_XATTR_EXPECTED),
    "special-mode-bits": Case([
        Layer([file("setuid", b"u", mode=0o4755), file("setgid", b"g", mode=0o2711, gid=42),
               directory("sticky", mode=0o1777), directory("setgid-dir", mode=0o2775),
               file("no-permissions", b"none", mode=0o000), directory("closed", mode=0o000),
               file("all-bits", b"all", mode=0o7777)])]),
    "devices-and-fifos": Case([
        Layer([directory("dev"), device("dev/null", "char", 1, 3, mode=0o666),
               device("dev/loop0", "block", 7, 0, mode=0o660, gid=6),
               device("dev/big", "char", 259, 70000), fifo("dev/fifo", mode=0o600)])]),
    "fifo-with-empty-device-fields": Case([Layer(tar=_fifo_without_device_fields(), compression="none")]),
    "subsecond-mtimes": Case([
        Layer([directory("d", mtime="1700000000.5"), file("d/f", b"f", mtime="1700000000.123456789"),
               file("d/micro", b"m", mtime="1600000000.000001"), symlink("d/s", "f", mtime="1700000001.25"),
               fifo("d/p", mtime="1700000002.999999999")])]),
    "pre-epoch-mtimes-pax": Case([
        Layer([file("f", b"f", mtime="-1.5"), directory("d", mtime="-86400")])]),
    "pre-epoch-mtimes-gnu-base256": Case([
        Layer(tar=oci.tar_bytes([file("f", b"f", mtime=-(1 << 31) + 1), file("g", b"g", mtime=-1)],
                                tar_format=tarfile.GNU_FORMAT))]),

    # compression and stream framing
    "gzip-several-members": Case([
        Layer(SMALL_TREE, blob=oci.gzip_members(oci.tar_bytes(SMALL_TREE), 4))]),
    "gzip-header-fields": Case([
        Layer(SMALL_TREE, blob=oci.gzip_with_header_fields(oci.tar_bytes(SMALL_TREE)))]),
    "gzip-header-crc": Case([
        Layer(SMALL_TREE, blob=oci.gzip_with_header_fields(oci.tar_bytes(SMALL_TREE), header_crc=True))],
        expected=GZIP_HEADER_CRC_EXPECTED),
    "uncompressed-layer": Case([Layer(SMALL_TREE, compression="none")]),
    "trailing-zero-padding": Case([
        Layer(tar=_with_padding(oci.tar_bytes(SMALL_TREE)), compression="gzip")]),
    "no-end-of-archive-marker": Case([
        Layer(tar=oci.without_end_marker(oci.tar_bytes(SMALL_TREE)), compression="gzip"),
        Layer(tar=oci.without_end_marker(oci.tar_bytes([file("etc/hostname", b"second\n")])),
              compression="none")]),
    "zstd-layer": Case([Layer(ZSTD_LOWER), Layer(ZSTD_UPPER, compression="zstd")], expected=ZSTD_EXPECTED),
    "zstd-several-frames": Case([
        Layer(ZSTD_LOWER, compression="zstd", blob=_zstd_frames(oci.tar_bytes(ZSTD_LOWER))),
        Layer(ZSTD_UPPER, compression="zstd")], expected=ZSTD_EXPECTED),
}


# -- fixture: index every case, unpack it with umoci, mount the store --------------

@dataclass
class Conformance:
    """The shared store, the running daemon, and each case's mounted root and umoci reference."""

    base: Path
    store_url: str
    daemon: DaemonProcess
    runs: dict[str, oci.IndexerRun]
    references: dict[str, Path | str]

    def root(self, name: str) -> Path:
        """Return the mounted root of case ``name``; fail the test if indexing it failed."""
        run = self.runs[name]
        assert run.code == 0, run.stderr
        return self.daemon.image(run.result["index_digest"])

    def reference(self, name: str) -> Path:
        """Return umoci's rootfs of case ``name``; fail the test if umoci failed."""
        reference = self.references[name]
        assert isinstance(reference, Path), f"umoci unpack failed: {reference}"
        return reference


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path | str:
    """Return the rootfs that ``umoci unpack`` writes for ``layout:tag``, or umoci's error output."""
    result = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        return result.stderr.decode(errors="replace")
    return bundle / "rootfs"


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    base = tmp_path_factory.mktemp("conformance")
    store_url = (base / "store").as_uri()
    layout = base / "layout"
    runs, references = {}, {}
    for name, case in CASES.items():
        image = oci.write_image(layout, case.build(base), tag=name)
        runs[name] = oci.run_indexer("--store", store_url, "--json", image.source)
        if case.expected is None:
            references[name] = umoci_unpack(layout, name, base / "bundles" / name)
    with running_daemon(directory=base / "daemon", store_url=store_url) as daemon:
        yield Conformance(base, store_url, daemon, runs, references)


def assert_same_tree(reference: Path, mounted: Path) -> None:
    expected = trees.snapshot(reference, with_nlink=True)
    actual = trees.snapshot(mounted, with_nlink=True)
    # umoci gives the root directory the time of the unpack.
    expected[trees.ROOT] = dataclasses.replace(expected[trees.ROOT], mtime_ns=actual[trees.ROOT].mtime_ns)

    differences = trees.diff(expected, actual)
    assert not differences, "\n".join(differences)
    assert trees.hardlink_groups(mounted) == trees.hardlink_groups(reference)


def assert_expected_tree(expected: Expected, mounted: Path) -> None:
    actual = trees.snapshot(mounted, with_nlink=True)
    root = actual.pop(trees.ROOT)

    assert (root.type, root.mode, root.uid, root.gid) == ("dir", 0o755, 0, 0)
    differences = trees.diff(expected.entries, actual)
    assert not differences, "\n".join(differences)
    assert trees.hardlink_groups(mounted) == expected.hardlinks


@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_reference(conformance, name):
    case = CASES[name]
    mounted = conformance.root(name)

    if case.expected is None:
        assert_same_tree(conformance.reference(name), mounted)
    else:
        assert_expected_tree(case.expected, mounted)
    for path in case.absent:
        with pytest.raises(FileNotFoundError):
            os.lstat(mounted / path)
    if name.startswith("sparse-"):
        # umoci and lazyfs could expand holes the same wrong way; check the bytes too.
        for sparse_name in SPARSE_FILES:
            assert (mounted / sparse_name).read_bytes() == sparse_data(sparse_name)


# -- image sources: registry (OCI, Docker schema 2, image index) and docker save ---

SOURCE_LAYERS = [
    Layer([directory("etc", mtime=T0), file("etc/os-release", b"ID=conformance\n", mtime=T0),
           file("etc/gone", b"gone", mtime=T0), directory("bin", mtime=T0),
           file("bin/tool", b"\x7fELF tool", mode=0o4755, mtime=T0, xattrs={b"user.origin": b"lower"}),
           hardlink("bin/tool-alias", "bin/tool"), symlink("bin/sh", "tool", mtime=T0)]),
    Layer([directory("etc", mtime=T0), whiteout("etc/gone"), file("etc/new", b"new\n", uid=1000, gid=1000,
                                                                   mtime="1700000000.25")]),
]
PLATFORM_LAYERS = {
    "amd64": [Layer([directory("arch", mtime=T0), file("arch/name", b"amd64\n", mtime=T0)])],
    "arm64": [Layer([directory("arch", mtime=T0), file("arch/name", b"arm64\n", mtime=T0),
                     file("arch/only-arm64", b"", mtime=T0)])],
}
HOST_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def push_docker_image(registry, image: oci.Image, repository: str, tag: str) -> None:
    """Push the blobs and the Docker schema 2 manifest of ``image`` with the registry API.

    skopeo's oci: transport finds no Docker media types in index.json, so it
    cannot push this manifest unchanged.
    """
    for digest in [image.config_digest, *image.layer_digests]:
        request = urllib.request.Request(f"{registry.url}/v2/{repository}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(request) as response:
            location = urllib.parse.urljoin(registry.url, response.headers["Location"])
        separator = "&" if "?" in location else "?"
        upload = urllib.request.Request(f"{location}{separator}digest={digest}", method="PUT",
                                        data=image.blob_path(digest).read_bytes(),
                                        headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(upload).close()
    manifest = urllib.request.Request(f"{registry.url}/v2/{repository}/manifests/{tag}", method="PUT",
                                      data=image.blob_path(image.manifest_digest).read_bytes(),
                                      headers={"Content-Type": oci.DOCKER_MANIFEST})
    urllib.request.urlopen(manifest).close()


def write_docker_archive(path: Path, layers: list[Layer], repo_tag: str) -> None:
    """Write a ``docker save`` archive as Docker 24 does: ``<id>.json`` and ``<id>/layer.tar``."""
    tars = [layer.tar_data() for layer in layers]
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [oci.digest_of(tar) for tar in tars]}}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    members = {config_name: config_bytes}
    for number, tar in enumerate(tars):
        members[f"{hashlib.sha256(tar + bytes([number])).hexdigest()}/layer.tar"] = tar
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": list(members)[1:]}]
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def source_references(conformance):
    """umoci unpacks of the source images, written as OCI layouts; {name: rootfs}."""
    layout = conformance.base / "source-layout"
    written = {"sources": oci.write_image(layout, SOURCE_LAYERS, tag="sources")}
    for architecture, layers in PLATFORM_LAYERS.items():
        written[architecture] = oci.write_image(layout, layers, tag=architecture,
                                               platform=("linux", architecture))
    references = {name: images.umoci_unpack(layout, name, conformance.base / "source-bundles" / name)
                  for name in written}
    return written, references


def index_source(conformance, source: str, *options: str) -> dict:
    run = oci.run_indexer("--store", conformance.store_url, "--json", *options, source)
    assert run.code == 0, run.stderr
    return run.result


def test_registry_oci_manifest(conformance, source_references, registry):
    images, references = source_references
    digest = registry.push(images["sources"].layout, "sources", "conformance/oci", "v1")

    result = index_source(conformance, f"docker://{registry.host}/conformance/oci:v1", "--plain-http")

    assert result["manifest_digest"] == digest == images["sources"].manifest_digest
    assert_same_tree(references["sources"], conformance.daemon.image(result["index_digest"]))


def test_registry_docker_schema2_manifest(conformance, source_references, registry):
    _images, references = source_references
    image = oci.write_image(conformance.base / "docker-layout", SOURCE_LAYERS, tag="v1", docker=True)
    push_docker_image(registry, image, "conformance/docker", "v1")

    result = index_source(conformance, f"docker://{registry.host}/conformance/docker:v1", "--plain-http")

    assert result["manifest_digest"] == image.manifest_digest
    assert_same_tree(references["sources"], conformance.daemon.image(result["index_digest"]))


@pytest.mark.parametrize("platform", [None, "linux/amd64", "linux/arm64"],
                         ids=["host-default", "linux-amd64", "linux-arm64"])
def test_registry_image_index_platform(conformance, source_references, registry, platform):
    images, references = source_references
    layout = conformance.base / "index-layout"
    if not layout.exists():
        for architecture in PLATFORM_LAYERS:
            oci.write_image(layout, PLATFORM_LAYERS[architecture], tag=None, platform=("linux", architecture))
        oci.write_image_index(layout, [(images[architecture], {"os": "linux", "architecture": architecture})
                                       for architecture in PLATFORM_LAYERS], "multi")
    registry.push(layout, "multi", "conformance/multi", "v1", all_platforms=True)
    if platform is None:
        architecture = HOST_ARCHITECTURES.get(os.uname().machine)
        if architecture is None:
            pytest.skip(f"the image index has no image for this machine ({os.uname().machine})")
        options = ()
    else:
        architecture = platform.split("/")[1]
        options = ("--platform", platform)

    result = index_source(conformance, f"docker://{registry.host}/conformance/multi:v1", "--plain-http", *options)

    assert result["manifest_digest"] == images[architecture].manifest_digest
    assert_same_tree(references[architecture], conformance.daemon.image(result["index_digest"]))


def test_docker_archive(conformance, source_references):
    _images, references = source_references
    archive = conformance.base / "saved.tar"
    write_docker_archive(archive, SOURCE_LAYERS, "conformance/saved:v1")

    result = index_source(conformance, f"docker-archive:{archive}:conformance/saved:v1")

    assert_same_tree(references["sources"], conformance.daemon.image(result["index_digest"]))


# -- a truncated layer stream ------------------------------------------------------

@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_truncated_layer_is_rejected(tmp_path, compression):
    tar = oci.tar_bytes(SMALL_TREE)
    blob = oci.compress(tar, compression)
    image = oci.write_image(tmp_path / "layout", [
        Layer(SMALL_TREE, compression=compression, blob=blob[:len(blob) * 3 // 5], diff_id=oci.digest_of(tar))])
    store = tmp_path / "store"

    run = oci.run_indexer("--store", store.as_uri(), image.source)

    assert run.code == 3, run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert image.layer_digests[0] in run.stderr
    assert not (store / "refs").exists() or not any((store / "refs").rglob("*"))


def test_name_component_over_255_bytes_is_rejected(tmp_path):
    # Linux rejects a name over NAME_MAX (255 bytes), so the mount could not show it;
    # pax-long-names shows that longer paths of shorter components work.
    image = oci.write_image(tmp_path / "layout", [Layer([directory("d"), file("d/" + "n" * 256, b"x")])])
    store = tmp_path / "store"

    run = oci.run_indexer("--store", store.as_uri(), image.source)

    assert run.code == 3, run.stderr
    assert "component longer than 255 bytes" in run.stderr
    assert not (store / "refs").exists() or not any((store / "refs").rglob("*"))
