"""Real mounts: ``lazyfs mount --foreground`` over /dev/fuse, read with ordinary system calls."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.chunk import encode
from lazyfs.config import DaemonConfig
from lazyfs.control import ControlClient
from lazyfs.daemon import is_mounted, mounted_filesystem, start_background, wait_for_exit as daemon_wait_for_exit
from lazyfs.errors import DaemonError
from lazyfs.refs import chunk_key, publish
from lazyfs.s3store import S3Store
from lazyfs.store import FileStore, StoreOptions
from tests.support import sample_image
from tests.support.daemon import DaemonProcess, cleanup, daemon_config, running_daemon, toml_text
from tests.support.s3server import MotoServer
from tests.support.sample_image import publish_sample_image, publish_single_file_image

pytestmark = pytest.mark.fuse


def lazyfs_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "lazyfs.cli", *arguments]


def file_path(root: Path, path: bytes) -> bytes:
    return os.fsencode(root) + b"/" + path


def read_file(path: bytes | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_os_error(caught: pytest.ExceptionInfo, expected: int) -> None:
    assert caught.value.errno == expected, f"{caught.value!r}, expected {errno.errorcode[expected]}"


# ---------------------------------------------------------------------------
# One daemon for the read-only tests of this module


class Published:
    """Images in the module's file store: the sample and a few special ones."""

    def __init__(self, store: FileStore):
        self.store = store
        self.sample = publish_sample_image(store, seed=1)
        self.hardlinks_fresh = publish_sample_image(store, seed=2)
        self.missing_chunk, self.missing_addresses = publish_single_file_image(
            store, sample_image.deterministic_bytes(3, 5000), store_chunks=False)
        corrupt_data = sample_image.deterministic_bytes(4, 70_000)
        self.corrupt_chunk, corrupt_addresses = publish_single_file_image(store, corrupt_data)
        store.put(chunk_key(corrupt_addresses[0]), encode(b"not the right bytes"))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return Published(FileStore(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def daemon(published: Published, tmp_path_factory: pytest.TempPathFactory):
    with running_daemon(directory=tmp_path_factory.mktemp("daemon"), store_url=published.store.url) as process:
        yield process


@pytest.fixture(scope="module")
def sample_root(daemon: DaemonProcess, published: Published) -> Path:
    return daemon.image(published.sample.digest)


# ---------------------------------------------------------------------------
# Namespace


def test_mount_root_lists_images(daemon: DaemonProcess):
    assert os.listdir(daemon.mountpoint) == ["images", "shifted"]
    root = os.stat(daemon.mountpoint)
    assert stat.S_ISDIR(root.st_mode)
    assert root.st_ino == 1


def test_mount_is_lazyfs_read_only(daemon: DaemonProcess):
    assert mounted_filesystem(daemon.mountpoint) == "fuse.lazyfs"
    options = os.statvfs(daemon.mountpoint)
    assert options.f_flag & os.ST_RDONLY


def test_mount_images_lists_attached(daemon: DaemonProcess, published: Published, sample_root: Path):
    os.stat(sample_root)

    assert published.sample.digest in os.listdir(daemon.mountpoint / "images")


def test_mount_unknown_image_enoent(daemon: DaemonProcess):
    requests_before = daemon.status()["store_requests"].get("get", 0)

    with pytest.raises(FileNotFoundError):
        os.stat(daemon.mountpoint / "images" / "not-a-digest")
    assert daemon.status()["store_requests"].get("get", 0) == requests_before

    with pytest.raises(FileNotFoundError):
        os.stat(daemon.mountpoint / "images" / ("0" * 64))
    assert daemon.status()["store_requests"]["get"] == requests_before + 1


def test_mount_file_attributes(sample_root: Path):
    info = os.stat(sample_root / "data" / "two_chunks.bin")

    size = sample_image.FIRST_CHUNK_BYTES + sample_image.SECOND_CHUNK_BYTES
    assert info.st_mode == stat.S_IFREG | 0o644
    assert info.st_size == size
    assert info.st_nlink == 1
    assert info.st_uid == sample_image.UID
    assert info.st_gid == sample_image.GID
    assert info.st_mtime_ns == sample_image.MTIME_NS
    assert info.st_atime_ns == sample_image.MTIME_NS
    assert info.st_ctime_ns == sample_image.MTIME_NS
    assert info.st_blocks == (size + 511) // 512
    assert info.st_blksize == 128 << 10


def test_mount_directory_attributes(sample_root: Path):
    root = os.stat(sample_root)
    deeper = os.stat(sample_root / "data" / "nested" / "deeper")

    assert root.st_mode == stat.S_IFDIR | 0o755
    assert root.st_nlink == 7
    assert deeper.st_mode == stat.S_IFDIR | 0o700
    assert deeper.st_nlink == 2
    assert deeper.st_mtime_ns == sample_image.MTIME_NS


def test_mount_lists_directories(sample_root: Path):
    assert sorted(os.listdir(sample_root)) == ["bin", "data", "dev", "links", "names", "xattrs"]
    assert sorted(os.listdir(sample_root / "data")) == ["empty", "nested", "small.txt", "two_chunks.bin"]
    assert os.listdir(sample_root / "data" / "nested" / "deeper") == []


def test_mount_readdir_inodes_match_stat(sample_root: Path, published: Published):
    for directory in published.sample.directories:
        path = file_path(sample_root, directory) if directory else os.fsencode(sample_root)
        with os.scandir(path) as entries:
            for entry in entries:
                info = os.lstat(entry.path)
                assert entry.inode() == info.st_ino, entry.path
                assert entry.is_dir(follow_symlinks=False) == stat.S_ISDIR(info.st_mode)
                assert entry.is_symlink() == stat.S_ISLNK(info.st_mode)


def test_mount_hardlinks_on_first_stat(daemon: DaemonProcess, published: Published):
    # This image is looked up by no other test, so these are the first stats.
    links = daemon.image(published.hardlinks_fresh.digest) / "links"

    second = os.stat(links / "hard2")

    assert second.st_nlink == 3
    first = os.stat(links / "hard1")
    third = os.stat(links / "hard3")
    assert first.st_ino == second.st_ino == third.st_ino
    assert first.st_nlink == third.st_nlink == 3
    with os.scandir(links) as entries:
        listed = {entry.name: entry.inode() for entry in entries}
    assert listed["hard1"] == listed["hard2"] == listed["hard3"] == second.st_ino
    assert read_file(links / "hard3") == sample_image.HARDLINK_DATA


def test_mount_symlinks(sample_root: Path, published: Published):
    for path, target in published.sample.symlinks.items():
        full = file_path(sample_root, path)
        assert os.readlink(full) == target
        info = os.lstat(full)
        assert stat.S_ISLNK(info.st_mode)
        assert info.st_size == len(target)


def test_mount_dangling_and_looping_symlinks(sample_root: Path):
    with pytest.raises(FileNotFoundError):
        os.stat(sample_root / "links" / "dangling")
    with pytest.raises(OSError) as caught:
        os.stat(sample_root / "links" / "self")
    assert_os_error(caught, errno.ELOOP)


def test_mount_readlink_of_file_einval(sample_root: Path):
    with pytest.raises(OSError) as caught:
        os.readlink(sample_root / "data" / "small.txt")

    assert_os_error(caught, errno.EINVAL)


def test_mount_xattrs(sample_root: Path):
    path = sample_root / "xattrs"

    assert sorted(os.listxattr(path)) == sorted(name.decode() for name in sample_image.XATTRS)
    for name, value in sample_image.XATTRS.items():
        assert os.getxattr(path, name) == value
    assert os.listxattr(sample_root / "data" / "small.txt") == []


def test_mount_missing_xattr_enodata(sample_root: Path):
    with pytest.raises(OSError) as caught:
        os.getxattr(sample_root / "xattrs", "user.absent")

    assert_os_error(caught, errno.ENODATA)


def test_mount_device_and_fifo(sample_root: Path):
    device = os.lstat(sample_root / "dev" / "null")
    fifo = os.lstat(sample_root / "dev" / "fifo")

    assert device.st_mode == stat.S_IFCHR | 0o666
    assert device.st_rdev == sample_image.DEVICE_RDEV
    assert os.major(device.st_rdev) == 1
    assert os.minor(device.st_rdev) == 3
    assert fifo.st_mode == stat.S_IFIFO | 0o644
    assert fifo.st_rdev == 0


def test_mount_non_utf8_names(sample_root: Path):
    names = os.fsencode(sample_root / "names")

    assert sorted(os.listdir(names)) == [b"caf\xe9", b"\xff\xfe"]
    assert read_file(names + b"/caf\xe9") == sample_image.LATIN1_DATA
    assert read_file(names + b"/\xff\xfe") == sample_image.INVALID_UTF8_DATA


def test_mount_statfs(daemon: DaemonProcess, sample_root: Path):
    os.stat(sample_root)
    status = daemon.status()

    totals = os.statvfs(daemon.mountpoint)

    file_bytes = sum(image["size_bytes"] for image in status["images"].values())
    inodes = sum(image["inodes"] for image in status["images"].values())
    assert totals.f_bsize == 4096
    assert totals.f_frsize == 4096
    assert totals.f_blocks == -(-file_bytes // 4096)
    assert totals.f_blocks > 0
    assert totals.f_bfree == 0
    assert totals.f_bavail == 0
    assert totals.f_files == 2 + inodes
    assert totals.f_namemax == 255


# ---------------------------------------------------------------------------
# Reads


def test_mount_reads_every_file(sample_root: Path, published: Published):
    for path, data in published.sample.files.items():
        assert read_file(file_path(sample_root, path)) == data, path


def test_mount_two_chunk_file_ranges(sample_root: Path, published: Published):
    data = published.sample.files[b"data/two_chunks.bin"]
    boundary = sample_image.FIRST_CHUNK_BYTES
    fd = os.open(sample_root / "data" / "two_chunks.bin", os.O_RDONLY)
    try:
        for offset, size in [(0, 4096), (boundary - 100, 200), (boundary, 1), (boundary - 1, 2),
                             (len(data) - 10, 10), (12345, 700_000)]:
            assert os.pread(fd, size, offset) == data[offset:offset + size], (offset, size)
    finally:
        os.close(fd)


def test_mount_reads_at_and_past_eof(sample_root: Path, published: Published):
    data = published.sample.files[b"data/two_chunks.bin"]
    fd = os.open(sample_root / "data" / "two_chunks.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, len(data)) == b""
        assert os.pread(fd, 4096, len(data) + 1_000_000) == b""
        assert os.pread(fd, 100, len(data) - 3) == data[-3:]
    finally:
        os.close(fd)
    empty = sample_root / "data" / "empty"
    assert os.stat(empty).st_size == 0
    assert read_file(empty) == b""


def test_mount_cat_output(sample_root: Path, published: Published):
    result = subprocess.run(["cat", str(sample_root / "data" / "two_chunks.bin")], capture_output=True,
                            check=True)

    assert result.stdout == published.sample.files[b"data/two_chunks.bin"]


def test_mount_page_cache_kept(daemon: DaemonProcess, sample_root: Path, published: Published):
    path = sample_root / "data" / "small.txt"
    assert read_file(path) == sample_image.SMALL_DATA
    reads_before = daemon.status()["images"][published.sample.digest]["reads"]

    assert read_file(path) == sample_image.SMALL_DATA

    assert daemon.status()["images"][published.sample.digest]["reads"] == reads_before


def test_mount_missing_chunk_eio(daemon: DaemonProcess, published: Published):
    path = daemon.image(published.missing_chunk) / "file.bin"
    assert os.stat(path).st_size == 5000

    for _ in range(2):
        with pytest.raises(OSError) as caught:
            read_file(path)
        assert_os_error(caught, errno.EIO)

    status = daemon.status()
    assert status["images"][published.missing_chunk]["read_errors"] >= 1
    assert status["tiers"]["store"]["not_found"] == 1
    assert status["chain"]["failed_fast"] >= 1
    log = daemon.log_text()
    assert f"image {published.missing_chunk}, chunk {published.missing_addresses[0].hex()}" in log


def test_mount_corrupt_chunk_eio(daemon: DaemonProcess, published: Published):
    path = daemon.image(published.corrupt_chunk) / "file.bin"

    with pytest.raises(OSError) as caught:
        read_file(path)

    assert_os_error(caught, errno.EIO)
    status = daemon.status()
    assert status["tiers"]["store"]["integrity_errors"] == 1
    assert status["images"][published.corrupt_chunk]["bytes_read"] == 0


# ---------------------------------------------------------------------------
# Writes


WRITE_ATTEMPTS = {
    "open for writing": lambda root: open(root / "data" / "small.txt", "r+b"),
    "open write-only": lambda root: os.open(root / "data" / "small.txt", os.O_WRONLY),
    "truncate on open": lambda root: os.open(root / "data" / "small.txt", os.O_RDONLY | os.O_TRUNC),
    "create": lambda root: open(root / "data" / "new.txt", "wb"),
    "mkdir": lambda root: os.mkdir(root / "data" / "newdir"),
    "rmdir": lambda root: os.rmdir(root / "data" / "nested" / "deeper"),
    "unlink": lambda root: os.unlink(root / "data" / "small.txt"),
    "rename": lambda root: os.rename(root / "data" / "small.txt", root / "data" / "moved.txt"),
    "symlink": lambda root: os.symlink("target", root / "data" / "newlink"),
    "link": lambda root: os.link(root / "data" / "small.txt", root / "data" / "hardlink"),
    "mknod": lambda root: os.mkfifo(root / "data" / "newfifo"),
    "setxattr": lambda root: os.setxattr(root / "xattrs", "user.comment", b"changed"),
    "removexattr": lambda root: os.removexattr(root / "xattrs", "user.comment"),
    "chmod": lambda root: os.chmod(root / "data" / "small.txt", 0o600),
    "chown": lambda root: os.chown(root / "data" / "small.txt", 0, 0),
    "touch": lambda root: os.utime(root / "data" / "small.txt"),
    "truncate": lambda root: os.truncate(root / "data" / "small.txt", 0),
    "mkdir in images/": lambda root: os.mkdir(root.parent / "new"),
    "mkdir in the mount root": lambda root: os.mkdir(root.parent.parent / "new"),
}


@pytest.mark.parametrize("attempt", list(WRITE_ATTEMPTS))
def test_mount_write_erofs(sample_root: Path, attempt: str):
    with pytest.raises(OSError) as caught:
        WRITE_ATTEMPTS[attempt](sample_root)

    assert_os_error(caught, errno.EROFS)


def test_mount_touch_command_erofs(sample_root: Path):
    result = subprocess.run(["touch", str(sample_root / "data" / "small.txt")], capture_output=True,
                            text=True)

    assert result.returncode == 1
    assert "Read-only file system" in result.stderr


def test_mount_unchanged_after_writes(sample_root: Path):
    assert read_file(sample_root / "data" / "small.txt") == sample_image.SMALL_DATA
    assert os.getxattr(sample_root / "xattrs", "user.comment") == sample_image.XATTRS[b"user.comment"]


# ---------------------------------------------------------------------------
# Control socket and command line


def test_status_shape(daemon: DaemonProcess, sample_root: Path, published: Published):
    read_file(sample_root / "data" / "small.txt")

    status = daemon.status()

    assert status["mountpoint"] == str(daemon.mountpoint)
    assert status["store_url"] == published.store.url
    assert status["pid"] == daemon.pid
    assert set(status["tiers"]) == {"ram", "disk", "store"}
    assert status["tiers"]["store"]["requests"] >= 1
    assert status["tiers"]["store"]["bytes"] > 0
    image = status["images"][published.sample.digest]
    assert image["inodes"] == 21
    assert image["bytes_read"] > 0


def test_control_socket_permissions(daemon: DaemonProcess):
    assert stat.S_IMODE(os.stat(daemon.control_socket).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(daemon.control_socket).st_mode)
    assert stat.S_IMODE(os.stat(daemon.control_socket.parent).st_mode) == 0o700


def test_control_unknown_op(daemon: DaemonProcess):
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.control_socket))
        sock.sendall(b'{"op": "reboot"}\nnot json\n')
        with sock.makefile("rb") as reader:
            first = json.loads(reader.readline())
            second = json.loads(reader.readline())

    assert first == {"error": "unknown op 'reboot'; supported: status, image, resolve, sync, trace_save"}
    assert second["error"].startswith("invalid JSON request")


def test_cli_status_json(daemon: DaemonProcess):
    result = subprocess.run(lazyfs_command("status", "--socket", str(daemon.control_socket), "--json"),
                            capture_output=True, text=True, check=True)

    assert json.loads(result.stdout)["pid"] == daemon.pid


def test_cli_status_text(daemon: DaemonProcess):
    result = subprocess.run(lazyfs_command("status", "--socket", str(daemon.control_socket)),
                            capture_output=True, text=True, check=True)

    assert f"mount point   {daemon.mountpoint}" in result.stdout
    assert "  store " in result.stdout


def test_cli_status_without_daemon(tmp_path: Path):
    result = subprocess.run(lazyfs_command("status", "--socket", str(tmp_path / "absent.sock")),
                            capture_output=True, text=True)

    assert result.returncode == 5
    assert result.stderr == (f"lazyfs status: no control socket at {tmp_path / 'absent.sock'}: "
                             "is the lazyfs daemon running?\n")


def test_cli_resolve(published: Published):
    digest = published.sample.digest
    publish(published.store, digest, "sha256:" + "e" * 64, ["registry.test/sample:1"])

    by_name = subprocess.run(lazyfs_command("resolve", "--store", published.store.url,
                                            "registry.test/sample:1"),
                             capture_output=True, text=True, check=True)
    by_digest = subprocess.run(lazyfs_command("resolve", "--store", str(published.store.root), digest),
                               capture_output=True, text=True, check=True)

    assert by_name.stdout == digest + "\n"
    assert by_digest.stdout == digest + "\n"


def test_cli_resolve_unknown(published: Published):
    result = subprocess.run(lazyfs_command("resolve", "--store", published.store.url, "nothing:here"),
                            capture_output=True, text=True)

    assert result.returncode == 5
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("lazyfs resolve: no image named 'nothing:here'")


@pytest.mark.parametrize("reference, message", [
    ("sha256:0000", "invalid manifest digest 'sha256:0000'"),
    ("", "invalid image name ''"),
])
def test_cli_resolve_invalid_reference_usage_error(published: Published, reference: str, message: str):
    result = subprocess.run(lazyfs_command("resolve", "--store", published.store.url, reference),
                            capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"lazyfs resolve: {message}")


def test_cli_mount_bad_config(tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text("ram_cache_bytes = -1\n")

    result = subprocess.run(lazyfs_command("mount", "--config", str(config), str(tmp_path / "mnt")),
                            capture_output=True, text=True)

    assert result.returncode == 3
    assert result.stderr == f"lazyfs mount: {config}: key 'ram_cache_bytes' must be >= 0, not -1\n"


# ---------------------------------------------------------------------------
# Daemon lifecycle


def test_sigterm_unmounts_cleanly(published: Published, tmp_path: Path):
    with running_daemon(directory=tmp_path, store_url=published.store.url) as process:
        assert is_mounted(process.mountpoint)
        read_file(process.image(published.sample.digest) / "data" / "small.txt")

        code = process.stop()

        assert code == 0
        assert not is_mounted(process.mountpoint)
        assert str(process.mountpoint) not in Path("/proc/self/mountinfo").read_text()
        assert not process.control_socket.exists()


def test_sigint_unmounts_cleanly(published: Published, tmp_path: Path):
    with running_daemon(directory=tmp_path, store_url=published.store.url) as process:
        process.process.send_signal(signal.SIGINT)

        assert process.wait() == 0
        assert not is_mounted(process.mountpoint)


def process_state(pid: int) -> str | None:
    """Return the state letter of a process from /proc (R, S, Z, ...), or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    # The command name in parentheses may contain spaces; the state follows it.
    return text.rsplit(")", 1)[1].split()[0]


def test_cli_unmount_ends_daemon(published: Published, tmp_path: Path):
    with running_daemon(directory=tmp_path, store_url=published.store.url) as process:
        result = subprocess.run(lazyfs_command("unmount", str(process.mountpoint)),
                                capture_output=True, text=True)

        assert result.returncode == 0, result.stderr
        assert process.wait() == 0
        assert not is_mounted(process.mountpoint)


def test_second_daemon_on_live_mount_rejected(daemon: DaemonProcess, published: Published, tmp_path: Path):
    config = daemon_config(tmp_path, published.store.url, mountpoint=str(daemon.mountpoint))

    with pytest.raises(RuntimeError, match="is already mounted"):
        with running_daemon(config, directory=tmp_path):
            pass

    assert is_mounted(daemon.mountpoint)
    assert os.listdir(daemon.mountpoint) == ["images", "shifted"]


def test_stale_mount_recovered(published: Published, tmp_path: Path):
    config = daemon_config(tmp_path, published.store.url)
    with running_daemon(config, directory=tmp_path) as crashed:
        crashed.kill()
        assert is_mounted(config.mountpoint)
        with pytest.raises(OSError) as caught:
            os.stat(config.mountpoint)
        assert_os_error(caught, errno.ENOTCONN)

        with running_daemon(config, directory=tmp_path) as restarted:
            path = restarted.image(published.sample.digest) / "data" / "small.txt"
            assert read_file(path) == sample_image.SMALL_DATA
            assert "stale mount" in restarted.log_text()


def test_cold_s3_then_warm_restart_from_disk(tmp_path: Path):
    with MotoServer() as server:
        bucket = server.create_bucket("lazyfs-warm-restart")
        store = S3Store(bucket, "images", StoreOptions(endpoint_url=server.endpoint_url))
        sample = publish_sample_image(store)
        store.close()
        config = daemon_config(tmp_path, f"s3://{bucket}/images", s3_endpoint_url=server.endpoint_url,
                               store_max_attempts=2, store_connect_timeout_s=1.0,
                               store_read_timeout_s=2.0, fetch_timeout_s=5.0)

        with running_daemon(config, directory=tmp_path) as cold:
            for path, data in sample.files.items():
                assert read_file(file_path(cold.image(sample.digest), path)) == data
            ControlClient(cold.control_socket).request({"op": "sync"})
            status = cold.status()
            assert status["tiers"]["store"]["requests"] == 3
            assert status["tiers"]["disk"]["puts"] == 3
            assert status["indexes"]["index_fetches"] == 1
            assert cold.stop() == 0

        server.stop()

        with running_daemon(config, directory=tmp_path) as warm:
            for path, data in sample.files.items():
                assert read_file(file_path(warm.image(sample.digest), path)) == data
            ControlClient(warm.control_socket).request({"op": "sync"})
            status = warm.status()
            log_text = warm.log_text()
            # The only store request is the boot trace lookup of the default
            # trace_replay, retried once and failed; readers never wait for it.
            assert status["store_requests"] == {"get": 1}
            assert status["store_results"] == {"get": {"unavailable": 1}}
            assert status["traces"][sample.digest]["state"] == "none"
            assert f"cannot load the boot trace of image {sample.digest}" in log_text
            assert status["tiers"]["store"]["requests"] == 0
            assert status["tiers"]["disk"]["hits"] == 3
            assert status["tiers"]["disk"]["corrupt"] == 0
            assert status["indexes"] == {"index_fetches": 0, "index_cache_hits": 1}
            assert status["images"][sample.digest]["fetched_bytes"] == 0


# ---------------------------------------------------------------------------
# Background mode


def wait_for_exit(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until a process that is not our child exits."""
    assert daemon_wait_for_exit(pid, timeout_s), f"process {pid} still runs after {timeout_s} s"


def test_start_background_serves(published: Published, tmp_path: Path):
    config = daemon_config(tmp_path, published.store.url)
    pid = None
    try:
        pid = start_background(config, timeout_s=60)

        assert pid != os.getpid()
        assert is_mounted(config.mountpoint)
        assert ControlClient(config.control_socket).status()["pid"] == pid
        assert os.getsid(pid) != os.getsid(0)
        path = Path(config.mountpoint) / "images" / published.sample.digest / "data" / "small.txt"
        assert read_file(path) == sample_image.SMALL_DATA
        os.kill(pid, signal.SIGTERM)
        wait_for_exit(pid)
        stopped, pid = pid, None
        assert not is_mounted(config.mountpoint)
        last_line = Path(config.log_path).read_text().splitlines()[-1]
        assert last_line.endswith(f"lazyfs daemon {stopped} stopped")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for_exit(pid)
        cleanup(None, config)


def test_start_background_failure_has_log(published: Published, tmp_path: Path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config: DaemonConfig = daemon_config(tmp_path, published.store.url, mountpoint=str(blocker))

    try:
        with pytest.raises(DaemonError) as caught:
            start_background(config, timeout_s=60)
    finally:
        cleanup(None, config, detach=False)

    message = str(caught.value)
    assert message.startswith(f"the lazyfs daemon exited with status 6 before serving {blocker}")
    assert f"cannot create mount point {blocker}" in message


def test_busy_control_socket_rejected(daemon: DaemonProcess, published: Published, tmp_path: Path):
    config = daemon_config(tmp_path, published.store.url, control_socket=str(daemon.control_socket))
    config_path = tmp_path / "second.toml"
    config_path.write_text(toml_text(config))

    result = subprocess.run(lazyfs_command("mount", "--foreground", "--config", str(config_path)),
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 6
    assert result.stderr.splitlines()[-1] == (
        f"lazyfs mount: another daemon is serving the control socket {daemon.control_socket}")
    assert not is_mounted(config.mountpoint)
    assert daemon.status()["pid"] == daemon.pid


def test_cli_mount_background_then_unmount(published: Published, tmp_path: Path):
    config = daemon_config(tmp_path, published.store.url)
    config_path = tmp_path / "background.toml"
    config_path.write_text(toml_text(config))
    try:
        result = subprocess.run(lazyfs_command("mount", "--background", "--config", str(config_path)),
                                capture_output=True, text=True, timeout=120)

        assert result.returncode == 0, result.stderr
        words = result.stdout.split()
        assert words[:2] == ["lazyfs", "daemon"]
        assert words[3:] == ["serves", config.mountpoint]
        pid = int(words[2])
        assert is_mounted(config.mountpoint)

        unmounted = subprocess.run(lazyfs_command("unmount", "--config", str(config_path)),
                                   capture_output=True, text=True, timeout=60)

        assert unmounted.returncode == 0, unmounted.stderr
        # lazyfs unmount returns only after the daemon has exited: it is gone or a zombie.
        assert process_state(pid) in (None, "Z")
        assert not is_mounted(config.mountpoint)
    finally:
        cleanup(None, config)


def test_cli_unmount_nothing_mounted(tmp_path: Path):
    result = subprocess.run(lazyfs_command("unmount", str(tmp_path)), capture_output=True, text=True)

    assert result.returncode == 6
    assert result.stderr == f"lazyfs unmount: nothing is mounted at {tmp_path}\n"


def test_cli_unmount_leaves_other_filesystems(tmp_path: Path):
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "lazyfs-test-tmpfs", str(target)], check=True)
    try:
        (target / "precious").write_bytes(b"keep")

        result = subprocess.run(lazyfs_command("unmount", str(target)), capture_output=True, text=True)

        assert result.returncode == 6
        assert result.stderr == f"lazyfs unmount: {target} is a tmpfs mount, not a lazyfs mount; not unmounting it\n"
        assert (target / "precious").read_bytes() == b"keep"
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.mark.parametrize("url", ["ftp://host/store", "http://127.0.0.1:1/store"])
def test_cli_mount_rejects_unsupported_store_url(tmp_path: Path, url: str):
    result = subprocess.run(lazyfs_command("mount", "--store", url, str(tmp_path / "mnt")),
                            capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stderr.endswith(f"lazyfs mount: error: argument --store: unsupported store URL {url!r}: "
                                  "use s3://BUCKET/PREFIX, file:///DIR or a directory path\n")
    assert not (tmp_path / "mnt").exists()
