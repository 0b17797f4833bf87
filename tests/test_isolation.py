"""Containers of ``lazyfs-run`` in a user namespace over the daemon's shifted views.

The tests run at three levels: the tree's shifted view without a mount, the
same view on a real FUSE mount next to the plain one, and runc containers
started by ``lazyfs-run``. The containers run an image made of the debootstrap
test image plus a layer with files of uid 1000 and of an owner outside the
container's ids.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs import tree as tree_module
from lazyfs.control_client import ControlClient
from lazyfs.errors import ControlError, FilesystemError, LazyfsError
from lazyfs.fuse_ops import IMAGE_CACHE_TIMEOUT_S, SHORT_CACHE_TIMEOUT_S, Operations
from lazyfs.notebook.container import ContainerRequest, ContainerStartError, Runc, run_container
from lazyfs.notebook.run import image_path
from lazyfs.notebook.userns import DEFAULT_BASE, IdRange
from lazyfs.store import FileStore
from lazyfs.store_tier import StoreTier
from lazyfs.tiers import RamTier, TierChain
from lazyfs.idshift import OVERFLOW_ID, IdShift
from lazyfs.tree import ROOT_INODE, SHIFTED_INODE, Tree
from tests.support import oci, sample_image
from tests.support.containers import mounts_under, searchable_directory
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.sample_image import SampleImage, publish_sample_image
from tests.support.stores import ScriptedStore

BASE = DEFAULT_BASE
SHIFT = IdShift(100000, 200000, 65536)
SHIFT_PATH = b"shifted/100000:200000:65536/"

# The extra layer on top of the debootstrap image: a user's private files and
# a file whose owner lies outside the container's 65536 ids.
USER_UID = 1000
USER_GID = 1000
NOTES = b"private notes\n"
OUTSIDE_UID = 70000
OUTSIDE_GID = 70001

# A v2 file capability (cap_net_raw in permitted and effective); its root id is implied 0.
CAPABILITY_V2 = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


# ---------------------------------------------------------------------------
# The tree's shifted view, without a mount


def make_tree(store: ScriptedStore) -> Tree:
    return Tree(store, TierChain([RamTier(64 << 20), StoreTier(store)]), clock_ns=lambda: 1)


async def resolve(tree: Tree, path: bytes) -> int:
    inode = ROOT_INODE
    for name in path.split(b"/"):
        if name:
            inode = await tree.lookup(inode, name)
    return inode


def assert_errno(caught: pytest.ExceptionInfo, expected: int) -> None:
    assert caught.value.errno == expected, os.strerror(caught.value.errno)


@pytest.fixture
def store(tmp_path: Path) -> ScriptedStore:
    return ScriptedStore(tmp_path / "store")


@pytest.fixture
def sample(store: ScriptedStore) -> SampleImage:
    return publish_sample_image(store)


async def test_shifted_view_owners_and_inodes(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    plain_root = await resolve(tree, b"images/" + sample.digest.encode())
    shifted_root = await resolve(tree, SHIFT_PATH + sample.digest.encode())

    for path in [b"", b"data/small.txt", b"dev/null", b"links/hard1", b"links/absolute"]:
        plain = tree.getattr(await resolve(tree, b"images/" + sample.digest.encode() + b"/" + path))
        shifted = tree.getattr(await resolve(tree, SHIFT_PATH + sample.digest.encode() + b"/" + path))
        assert shifted.st_uid == plain.st_uid + 100000, path
        assert shifted.st_gid == plain.st_gid + 200000, path
        assert shifted.st_ino == plain.st_ino - plain_root + shifted_root, path
        assert shifted.st_ino != plain.st_ino, path
        for name in ("st_mode", "st_nlink", "st_size", "st_blocks", "st_rdev", "st_mtime_ns"):
            assert getattr(shifted, name) == getattr(plain, name), (path, name)
    image = tree.images[0]
    assert len(tree.images) == 1
    assert shifted_root == image.end + 1
    assert tree.getattr(await resolve(tree, SHIFT_PATH + sample.digest.encode() + b"/data/small.txt")).st_uid == (
        100000 + sample_image.UID)


async def test_shifted_view_hardlinks_and_listing(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    root = await resolve(tree, SHIFT_PATH + sample.digest.encode())
    links = await tree.lookup(root, b"links")

    hardlinks = {await tree.lookup(links, name) for name in (b"hard1", b"hard2", b"hard3")}
    listed = {name: inode for _offset, name, inode in tree.entries(links)}

    assert len(hardlinks) == 1
    assert tree.getattr(hardlinks.pop()).st_nlink == 3
    for name, inode in listed.items():
        assert await tree.lookup(links, name) == inode
        assert tree.getattr(inode).st_ino == inode
    directory = await tree.lookup(SHIFTED_INODE, b"100000:200000:65536")
    assert await tree.lookup(root, b"..") == directory
    assert await tree.lookup(directory, b"..") == SHIFTED_INODE
    assert list(tree.entries(SHIFTED_INODE)) == [(1, b"100000:200000:65536", directory)]
    assert list(tree.entries(directory)) == [(1, sample.digest.encode(), root)]
    assert tree.getattr(directory).st_nlink == 3
    assert tree.getattr(SHIFTED_INODE).st_nlink == 3
    assert not tree.is_image_inode(directory)
    assert tree.is_image_inode(root)


async def test_shifted_view_reads_shared_image(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    plain = await resolve(tree, b"images/" + sample.digest.encode() + b"/data/two_chunks.bin")
    shifted = await resolve(tree, SHIFT_PATH + sample.digest.encode() + b"/data/two_chunks.bin")
    expected = sample.files[b"data/two_chunks.bin"]

    assert await tree.read(shifted, 0, len(expected)) == expected
    assert await tree.read(plain, 0, len(expected)) == expected
    # One image, one index fetch; the second read came from the shared RAM tier.
    assert tree.index_stats()["index_fetches"] == 1
    assert tree.images[0].counters["fetched_chunks"] == 2
    assert tree.images[0].counters["chunk_reads"] == 4
    assert tree.statfs().files == 2 + tree.images[0].index.inode_count


async def test_shifted_view_ids_outside_range(store: ScriptedStore, sample: SampleImage):
    tree = make_tree(store)
    # count 1000: uid 1000 of the sample's files is outside, gid 100 inside.
    path = b"shifted/5000:6000:1000/" + sample.digest.encode() + b"/data/small.txt"

    attributes = tree.getattr(await resolve(tree, path))

    assert attributes.st_uid == OVERFLOW_ID
    assert attributes.st_gid == 6000 + sample_image.GID


@pytest.mark.parametrize("name", [
    b"100000:100000", b"0100000:100000:65536", b"100000:100000:0", b"100000:100000:-1",
    b"4294967295:0:1", b"4294967294:0:2", b"100000:100000:65536:1", b"a:b:c", b" 1:1:1", b"",
])
async def test_shifted_invalid_range_enoent(store: ScriptedStore, name: bytes):
    tree = make_tree(store)

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(SHIFTED_INODE, name)

    assert_errno(caught, errno.ENOENT)
    assert list(tree.entries(SHIFTED_INODE)) == []


async def test_shifted_range_count_limited(store: ScriptedStore, monkeypatch):
    monkeypatch.setattr(tree_module, "MAX_ID_SHIFTS", 2)
    tree = make_tree(store)
    await tree.lookup(SHIFTED_INODE, b"1:1:1")
    await tree.lookup(SHIFTED_INODE, b"2:2:1")

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(SHIFTED_INODE, b"3:3:1")

    assert_errno(caught, errno.ENOSPC)
    assert await tree.lookup(SHIFTED_INODE, b"1:1:1") == 4


async def test_shifted_view_of_missing_image_enoent(store: ScriptedStore):
    tree = make_tree(store)
    directory = await tree.lookup(SHIFTED_INODE, b"100000:200000:65536")

    with pytest.raises(FilesystemError) as caught:
        await tree.lookup(directory, b"ab" * 32)

    assert_errno(caught, errno.ENOENT)
    assert list(tree.entries(directory)) == []


async def test_ops_shifted_cache_timeouts(store: ScriptedStore, sample: SampleImage):
    operations = Operations(make_tree(store))

    directory = await operations.lookup(SHIFTED_INODE, b"100000:200000:65536", None)
    root = await operations.lookup(directory.st_ino, sample.digest.encode(), None)
    shifted = await operations.getattr(SHIFTED_INODE, None)

    assert directory.entry_timeout == directory.attr_timeout == SHORT_CACHE_TIMEOUT_S
    assert shifted.attr_timeout == SHORT_CACHE_TIMEOUT_S
    assert root.entry_timeout == root.attr_timeout == IMAGE_CACHE_TIMEOUT_S
    assert (root.st_uid, root.st_gid) == (100000, 200000)


def test_id_shift_capability_xattr():
    v3 = SHIFT.xattr(b"security.capability", CAPABILITY_V2)
    v3_again = SHIFT.xattr(b"security.capability", v3)

    assert v3 == bytes.fromhex("01000003" "00200000" "00000000" "00000000" "00000000") + (
        100000).to_bytes(4, "little")
    # A revision 3 value already names its root id: 100000 is outside the range.
    assert v3_again[:20] == v3[:20]
    assert int.from_bytes(v3_again[20:], "little") == OVERFLOW_ID
    assert SHIFT.xattr(b"security.capability", b"\x01\x00") == b"\x01\x00"
    assert SHIFT.xattr(b"user.comment", CAPABILITY_V2) == CAPABILITY_V2


def test_id_shift_acl_xattr():
    def entry(tag: int, perm: int, owner: int) -> bytes:
        return tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + owner.to_bytes(4, "little")

    header = (2).to_bytes(4, "little")
    undefined = 0xFFFFFFFF
    acl = header + entry(0x01, 6, undefined) + entry(0x02, 4, 1000) + entry(0x08, 4, 50) + entry(
        0x08, 4, 70000) + entry(0x10, 4, undefined) + entry(0x20, 0, undefined)

    shifted = SHIFT.xattr(b"system.posix_acl_access", acl)

    assert shifted == header + entry(0x01, 6, undefined) + entry(0x02, 4, 101000) + entry(
        0x08, 4, 200050) + entry(0x08, 4, OVERFLOW_ID) + entry(0x10, 4, undefined) + entry(0x20, 0, undefined)
    assert SHIFT.xattr(b"system.posix_acl_default", acl[:-1]) == acl[:-1]


# ---------------------------------------------------------------------------
# The shifted view on a real mount


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[FileStore, SampleImage]:
    store = FileStore(tmp_path_factory.mktemp("store"))
    return store, publish_sample_image(store, seed=7)


def walk(root: bytes) -> list[bytes]:
    """Return every path below ``root``, relative to it, in a stable order."""
    paths = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            paths.append(os.path.relpath(os.path.join(directory, name), root))
    return paths


@pytest.mark.fuse
def test_mount_shifted_view_differs_only_in_owners(published, tmp_path: Path):
    store, sample = published
    with running_daemon(directory=tmp_path / "daemon", store_url=store.url) as daemon:
        plain = os.fsencode(daemon.image(sample.digest))
        shifted = os.fsencode(daemon.mountpoint) + b"/" + SHIFT_PATH + sample.digest.encode()

        paths = walk(shifted)
        assert paths == walk(plain)
        assert len(paths) == 22
        plain_inodes, shifted_inodes = set(), set()
        for path in [b"."] + paths:
            before = os.lstat(os.path.join(plain, path))
            after = os.lstat(os.path.join(shifted, path))
            for name in ("st_mode", "st_nlink", "st_size", "st_blocks", "st_rdev", "st_mtime_ns"):
                assert getattr(after, name) == getattr(before, name), (path, name)
            assert after.st_uid == before.st_uid + 100000, path
            assert after.st_gid == before.st_gid + 200000, path
            plain_inodes.add(before.st_ino)
            shifted_inodes.add(after.st_ino)
            if stat.S_ISREG(before.st_mode):
                with open(os.path.join(shifted, path), "rb") as stream:
                    assert stream.read() == sample.files[path]
            if stat.S_ISLNK(before.st_mode):
                assert os.readlink(os.path.join(shifted, path)) == sample.symlinks[path]
            assert os.listxattr(os.path.join(shifted, path), follow_symlinks=False) == os.listxattr(
                os.path.join(plain, path), follow_symlinks=False)
        assert plain_inodes.isdisjoint(shifted_inodes)
        # 22 paths, 3 of them one hardlinked file, plus the root.
        assert len(shifted_inodes) == 21
        assert os.getxattr(os.path.join(shifted, b"xattrs"), b"user.binary") == bytes(range(16))
        for directory in [b"", b"links", b"data"]:
            with os.scandir(os.path.join(shifted, directory)) as entries:
                for entry in entries:
                    assert entry.inode() == os.lstat(entry.path).st_ino, entry.path
        assert os.listdir(os.path.join(os.fsencode(daemon.mountpoint), b"shifted")) == [b"100000:200000:65536"]
        assert os.listdir(daemon.mountpoint) == ["images", "shifted"]


@pytest.mark.fuse
def test_control_image_shifted_path(published, tmp_path: Path):
    store, sample = published
    with running_daemon(directory=tmp_path / "daemon", store_url=store.url) as daemon:
        client = ControlClient(daemon.control_socket)

        assert client.image(sample.digest)["path"] == f"images/{sample.digest}"
        assert client.image(sample.digest, shift="1000:2000:10")["path"] == f"shifted/1000:2000:10/{sample.digest}"
        with pytest.raises(ControlError, match="invalid 'shift' '1000:2000': expected "
                                               "'<uid base>:<gid base>:<count>' in decimal"):
            client.image(sample.digest, shift="1000:2000")
        shifted = daemon.mountpoint / "shifted" / "1000:2000:10" / sample.digest
        # Owners 0:0 are inside the 10 ids; 1000:100 of the files are outside.
        assert (os.stat(shifted / "data").st_uid, os.stat(shifted / "data").st_gid) == (1000, 2000)
        small = os.stat(shifted / "data/small.txt")
        assert (small.st_uid, small.st_gid) == (OVERFLOW_ID, OVERFLOW_ID)


def stat_as(uid: int, gid: int, path: bytes) -> subprocess.CompletedProcess:
    """Read a file in a child process running as ``uid``/``gid``; its stdout is the errno name or "ok"."""
    program = ("import errno, sys\n"
               "try:\n"
               "    open(sys.argv[1], 'rb').read()\n"
               "except OSError as exc:\n"
               "    print(errno.errorcode[exc.errno])\n"
               "else:\n"
               "    print('ok')\n")
    return subprocess.run([sys.executable, "-c", program, os.fsdecode(path)], user=uid, group=gid,
                          extra_groups=[], capture_output=True, text=True, timeout=30, check=True)


@pytest.mark.fuse
def test_mount_kernel_checks_shifted_modes(published):
    store, sample = published
    # Other users must reach the mount point, so it lives under /tmp, not in pytest's private directory.
    with searchable_directory(prefix="lazyfs-modes-") as directory, running_daemon(
            directory=directory / "daemon", store_url=store.url, allow_other=True) as daemon:
        mountpoint = os.fsencode(daemon.mountpoint)
        plain = mountpoint + b"/images/" + sample.digest.encode() + b"/data/empty"
        shifted = mountpoint + b"/" + SHIFT_PATH + sample.digest.encode() + b"/data/empty"
        assert stat.S_IMODE(os.stat(shifted).st_mode) == 0o600

        # data/empty is 0600, owned by uid 1000 in the image.
        assert stat_as(101000, 200100, shifted).stdout == "ok\n"
        assert stat_as(1000, 100, shifted).stdout == "EACCES\n"
        assert stat_as(1000, 100, plain).stdout == "ok\n"
        assert stat_as(101000, 200100, plain).stdout == "EACCES\n"
        assert stat_as(101001, 200100, shifted).stdout == "EACCES\n"


@pytest.mark.fuse
def test_mount_without_allow_other_rejects_users(published):
    store, sample = published
    with searchable_directory(prefix="lazyfs-modes-") as directory, running_daemon(
            directory=directory / "daemon", store_url=store.url) as daemon:
        shifted = os.fsencode(daemon.mountpoint) + b"/" + SHIFT_PATH + sample.digest.encode() + b"/data/small.txt"
        assert stat.S_IMODE(os.stat(shifted).st_mode) == 0o644

        assert stat_as(101000, 200100, shifted).stdout == "EACCES\n"
        assert stat_as(65534, 65534, shifted).stdout == "EACCES\n"


# ---------------------------------------------------------------------------
# Containers of lazyfs-run


def user_layer() -> oci.Layer:
    return oci.Layer([
        oci.directory("home/", mode=0o755),
        oci.directory("home/user/", mode=0o750, uid=USER_UID, gid=USER_GID),
        oci.file("home/user/notes", NOTES, mode=0o600, uid=USER_UID, gid=USER_GID),
        oci.hardlink("home/user/notes-link", "home/user/notes", uid=USER_UID, gid=USER_GID),
        oci.directory("srv/", mode=0o755),
        oci.file("srv/outside", b"outside\n", mode=0o644, uid=OUTSIDE_UID, gid=OUTSIDE_GID),
    ])


@pytest.fixture(scope="module")
def user_image(debootstrap_image, tmp_path_factory: pytest.TempPathFactory) -> tuple[FileStore, str]:
    """The debootstrap image plus ``user_layer``, indexed into a file store; returns (store, index digest)."""
    base_layout, tag = debootstrap_image
    manifest = json.loads(oci.blob_path(base_layout, _manifest_digest(base_layout, tag)).read_text())
    config = json.loads(oci.blob_path(base_layout, manifest["config"]["digest"]).read_text())
    layers = [oci.Layer(compression="gzip", blob=oci.blob_path(base_layout, layer["digest"]).read_bytes(),
                        diff_id=diff_id)
              for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"])]
    layout = tmp_path_factory.mktemp("layout")
    oci.write_image(layout, layers + [user_layer()], tag="users", config=config["config"])
    store = FileStore(tmp_path_factory.mktemp("user-store"))
    run = oci.run_indexer("--store", store.url, "--json", f"oci:{layout}:users")
    assert run.code == 0, run.stderr
    return store, run.result["index_digest"]


def _manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    [descriptor] = [entry for entry in index["manifests"]
                    if entry.get("annotations", {}).get(oci.REF_NAME) == tag]
    return descriptor["digest"]


@pytest.fixture(scope="module")
def user_daemon(user_image, tmp_path_factory: pytest.TempPathFactory) -> DaemonProcess:
    store, _digest = user_image
    with running_daemon(directory=tmp_path_factory.mktemp("user-daemon"), store_url=store.url) as daemon:
        yield daemon


@pytest.fixture
def state_dir():
    with searchable_directory() as path:
        yield path / "containers"


def lazyfs_run(daemon: DaemonProcess, state_dir: Path, digest: str, *command: str,
               extra: tuple[str, ...] = (), stdin=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lazyfs.notebook.run", "--control-socket", str(daemon.control_socket),
         "--state-dir", str(state_dir), *extra, digest, "--", *command],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(daemon: DaemonProcess, state_dir: Path, digest: str, *command: str,
               extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    process = lazyfs_run(daemon, state_dir, digest, *command, extra=extra)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


OWNERSHIP_SCRIPT = (
    "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; "
    "stat -c '%u:%g %a %h %n' / /etc/passwd /etc/shadow /tmp /var/mail /home/user /home/user/notes "
    "/srv/outside")


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_shows_image_ownership(user_image, user_daemon, state_dir):
    _store, digest = user_image

    code, stdout, stderr = run_to_end(user_daemon, state_dir, digest, "sh", "-c", OWNERSHIP_SCRIPT)

    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[:2] == ["0", "0"]
    assert [line.split() for line in lines[2:4]] == [["0", "100000", "65536"]] * 2
    assert lines[4:] == [
        "0:0 755 1 /",
        "0:0 644 1 /etc/passwd",
        "0:42 640 1 /etc/shadow",
        "0:0 1777 2 /tmp",
        "0:8 2775 2 /var/mail",
        "1000:1000 750 2 /home/user",
        "1000:1000 600 2 /home/user/notes",
        "65534:65534 644 1 /srv/outside",
    ]
    assert stderr == ""
    assert mounts_under(state_dir) == []
    assert list(state_dir.iterdir()) == []


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_no_userns_is_host_root(user_image, user_daemon, state_dir):
    _store, digest = user_image

    code, stdout, stderr = run_to_end(user_daemon, state_dir, digest, "sh", "-c",
                                      "id -u; cat /proc/self/uid_map; stat -c '%u:%g' /home/user/notes",
                                      extra=("--no-userns",))

    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "0", "4294967295"]
    assert lines[2] == "1000:1000"


WRITE_SCRIPT = (
    "echo new > /etc/new-file && echo appended >> /etc/passwd && "
    "setpriv --reuid 1000 --regid 1000 --clear-groups sh -c 'echo mine > /home/user/mine' && "
    "echo written && read reply")


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_writes_land_in_upper(user_image, user_daemon, state_dir):
    _store, digest = user_image
    plain = user_daemon.image(digest)
    shifted = user_daemon.mountpoint / "shifted" / f"{BASE}:{BASE}:65536" / digest
    passwd = (plain / "etc/passwd").read_bytes()

    process = lazyfs_run(user_daemon, state_dir, digest, "sh", "-c", WRITE_SCRIPT, stdin=subprocess.PIPE)
    try:
        assert process.stdout.readline() == "written\n"
        [container] = list(state_dir.iterdir())
        upper = container / "upper"
        assert stat.S_IMODE(os.stat(container).st_mode) == 0o700
        assert (os.stat(container).st_uid, os.stat(container).st_gid) == (BASE, BASE)
        assert (upper / "etc/new-file").read_bytes() == b"new\n"
        assert (upper / "etc/passwd").read_bytes() == passwd + b"appended\n"
        for path, owner, mode in [("", (BASE, BASE), 0o755), ("etc/new-file", (BASE, BASE), 0o644),
                                  ("etc/passwd", (BASE, BASE), 0o644),
                                  ("home/user", (BASE + 1000, BASE + 1000), 0o750),
                                  ("home/user/mine", (BASE + 1000, BASE + 1000), 0o644)]:
            info = os.lstat(upper / path)
            assert (info.st_uid, info.st_gid) == owner, path
            assert stat.S_IMODE(info.st_mode) == mode, path
        assert (plain / "etc/passwd").read_bytes() == passwd
        assert (shifted / "etc/passwd").read_bytes() == passwd
        assert not (plain / "etc/new-file").exists()
        assert not (shifted / "home/user/mine").exists()
        process.stdin.write("done\n")
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert list(state_dir.iterdir()) == []


ESCAPE_PROGRAM = r"""
import errno, json, os, socket, stat, sys
results = {}
def attempt(name, action):
    try:
        action()
    except OSError as exc:
        results[name] = errno.errorcode[exc.errno]
    else:
        results[name] = "ok"
socket_path, mountpoint = sys.argv[1], sys.argv[2]
attempt("mknod", lambda: os.mknod("/tmp/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
attempt("chmod_dev_null", lambda: os.chmod("/dev/null", 0o777))
attempt("socket_exists", lambda: os.stat(socket_path))
attempt("socket_connect", lambda: socket.socket(socket.AF_UNIX).connect(socket_path))
attempt("mountpoint_exists", lambda: os.stat(mountpoint))
attempt("proc_sys_write", lambda: open("/proc/sys/kernel/domainname", "w").write("x"))
print(json.dumps(results, sort_keys=True))
"""


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_cannot_escape(user_image, user_daemon, state_dir):
    _store, digest = user_image

    code, stdout, stderr = run_to_end(user_daemon, state_dir, digest, "python3", "-c", ESCAPE_PROGRAM,
                                      str(user_daemon.control_socket), str(user_daemon.mountpoint))

    assert code == 0, stderr
    assert json.loads(stdout) == {
        "mknod": "EPERM",
        "chmod_dev_null": "EPERM",
        "socket_exists": "ENOENT",
        "socket_connect": "ENOENT",
        "mountpoint_exists": "ENOENT",
        "proc_sys_write": "EROFS",
    }
    assert os.stat("/dev/null").st_mode == stat.S_IFCHR | 0o666


BIND_PROGRAM = r"""
import errno, json, os
results = {}
def attempt(name, action):
    try:
        action()
    except OSError as exc:
        results[name] = errno.errorcode[exc.errno]
    else:
        results[name] = "ok"
attempt("lower_write", lambda: open("/lower/etc/passwd", "a").write("x"))
attempt("lower_create", lambda: open("/lower/new", "w").close())
attempt("host_file_write", lambda: open("/host/file", "a").write("x"))
attempt("host_file_chmod", lambda: os.chmod("/host/file", 0o666))
attempt("host_dir_create", lambda: open("/host/new", "w").close())
print(json.dumps(results, sort_keys=True))
"""


class BindingRunc(Runc):
    """runc with extra bind mounts added to each bundle: a stand-in for volumes."""

    def __init__(self, mounts: list[dict], **kwargs):
        super().__init__(**kwargs)
        self.mounts = mounts

    def run(self, bundle: Path, container_id: str) -> int:
        spec = json.loads((bundle / "config.json").read_text())
        spec["mounts"].extend(self.mounts)
        (bundle / "config.json").write_text(json.dumps(spec))
        return super().run(bundle, container_id)


def bind_mount(source: Path, destination: str, mode: str) -> dict:
    return {"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", mode]}


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_bound_lower_needs_allow_other(user_image, user_daemon, state_dir):
    _store, digest = user_image
    shifted = user_daemon.mountpoint / "shifted" / f"{BASE}:{BASE}:65536" / digest
    runc = BindingRunc([bind_mount(shifted, "/lower", "ro")])
    request = ContainerRequest(image_dir=shifted, image_config={}, args=["true"], id_range=IdRange(BASE, BASE))

    # Without allow_other, FUSE refuses every request of the container's root,
    # so runc cannot even mount the view (the overlay reaches it as host root).
    with pytest.raises(ContainerStartError, match=r'to rootfs at "/lower": stat /proc/self/fd/\d+: permission denied'):
        run_container(request, state_dir, runc)

    assert list(state_dir.iterdir()) == []


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_bound_lower_and_host_files_read_only(user_image, state_dir, capfd,
                                                  tmp_path_factory: pytest.TempPathFactory):
    store, digest = user_image
    with running_daemon(directory=tmp_path_factory.mktemp("allow-other"), store_url=store.url,
                        allow_other=True) as daemon, searchable_directory(prefix="lazyfs-host-") as host:
        shifted = daemon.mountpoint / "shifted" / f"{BASE}:{BASE}:65536" / digest
        (host / "file").write_bytes(b"host data\n")
        os.chmod(host / "file", 0o644)
        # The FUSE mount itself is read-only. runc 1.1 cannot remount its bind
        # with "ro" in a user namespace (EPERM on the locked mount flags).
        runc = BindingRunc([bind_mount(shifted, "/lower", "rw"), bind_mount(host, "/host", "rw")])
        request = ContainerRequest(image_dir=shifted, image_config={}, args=["python3", "-c", BIND_PROGRAM],
                                   id_range=IdRange(BASE, BASE))

        code = run_container(request, state_dir, runc)

        output = capfd.readouterr()
        assert code == 0, output.err
        assert json.loads(output.out) == {
            "lower_write": "EROFS",
            "lower_create": "EROFS",
            "host_file_write": "EACCES",
            "host_file_chmod": "EPERM",
            "host_dir_create": "EACCES",
        }
        assert (host / "file").read_bytes() == b"host data\n"
        assert stat.S_IMODE(os.stat(host / "file").st_mode) == 0o644
        assert sorted(os.listdir(host)) == ["file"]
        assert (shifted / "etc/passwd").stat().st_size == (daemon.image(digest) / "etc/passwd").stat().st_size


@pytest.mark.image
@pytest.mark.fuse
@pytest.mark.runc
def test_run_state_dir_not_searchable(user_image, user_daemon, tmp_path: Path):
    _store, digest = user_image
    state_dir = tmp_path / "containers"

    code, stdout, stderr = run_to_end(user_daemon, state_dir, digest, "true")

    assert code == 125
    assert stdout == ""
    private = next(parent for parent in reversed(state_dir.parents) if not os.stat(parent).st_mode & stat.S_IXOTH)
    assert stderr == (
        f"lazyfs-run: error: container state directory {state_dir}: {private} is not searchable by host "
        f"uid {BASE}, the container's root: run chmod o+x {private}, choose another --state-dir, "
        "or pass --no-userns\n")


def test_image_path_of_old_daemon_response():
    assert image_path({"index": "ab" * 32}, shifted=False) == "images/" + "ab" * 32
    assert image_path({"index": "ab" * 32, "path": "shifted/1:1:65536/x"}, shifted=True) == "shifted/1:1:65536/x"
    with pytest.raises(LazyfsError, match="cannot shift owners"):
        image_path({"index": "ab" * 32}, shifted=True)
