"""Tests of the test helpers themselves, against the real servers and tools."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import botocore.exceptions
import pytest

from tests.support import images, trees
from tests.support.net import ServerStartError, free_port, wait_for_port
from tests.support.registry import Registry
from tests.support.s3server import MotoServer

OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


# net


def test_wait_for_port_reports_exited_process() -> None:
    command = [sys.executable, "-c", "import sys; sys.stderr.write('bind failed'); sys.exit(3)"]
    with subprocess.Popen(command, stderr=subprocess.PIPE) as proc:
        with pytest.raises(ServerStartError) as raised:
            wait_for_port("127.0.0.1", free_port(), deadline_s=30, proc=proc)

    message = str(raised.value)
    assert "exited with code 3" in message
    assert "bind failed" in message


def test_wait_for_port_times_out() -> None:
    with pytest.raises(ServerStartError, match="did not accept connections within"):
        wait_for_port("127.0.0.1", free_port(), deadline_s=0.3)


# moto S3 server


def test_moto_put_get_object(s3_server: MotoServer, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="chunks/abc", Body=b"chunk bytes")

    body = client.get_object(Bucket=s3_bucket, Key="chunks/abc")["Body"].read()

    assert body == b"chunk bytes"
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


def test_moto_env_points_boto3_at_server(s3_server: MotoServer, s3_bucket: str) -> None:
    import boto3

    # No endpoint URL, credentials or region passed: all come from the fixtures.
    client = boto3.session.Session().client("s3")

    names = [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]

    assert s3_bucket in names


def test_moto_stop_refuses_then_restart_is_empty() -> None:
    with MotoServer() as server:
        endpoint_url = server.endpoint_url
        server.create_bucket("before-restart")
        client = server.client(retries={"total_max_attempts": 1})

        server.stop()
        assert not server.running
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            client.list_buckets()

        server.start()
        assert server.endpoint_url == endpoint_url
        assert client.list_buckets()["Buckets"] == []


def test_moto_pause_times_out_then_resume_keeps_state() -> None:
    with MotoServer() as server:
        server.create_bucket("kept")
        server.client().put_object(Bucket="kept", Key="k", Body=b"v")
        impatient = server.client(
            connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1}
        )

        server.pause()
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            impatient.get_object(Bucket="kept", Key="k")

        server.resume()
        assert impatient.get_object(Bucket="kept", Key="k")["Body"].read() == b"v"


def test_moto_exit_stops_paused_server() -> None:
    with MotoServer() as server:
        server.pause()
    assert not server.running


# registry


def _tiny_oci_layout(work: Path) -> tuple[Path, str]:
    """Build a one-layer OCI layout with a single file and return (layout, manifest digest)."""
    layout = work / "layout"
    bundle = work / "bundle"
    image = f"{layout}:v1"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", image], check=True)
    subprocess.run(["umoci", "unpack", *rootless, "--image", image, str(bundle)], check=True)
    (bundle / "rootfs" / "hello.txt").write_text("hello from a tiny image\n")
    subprocess.run(["umoci", "repack", "--image", image, str(bundle)], check=True)

    index = json.loads((layout / "index.json").read_text())
    (manifest,) = index["manifests"]
    return layout, manifest["digest"]


def test_registry_push_and_get_manifest(registry: Registry, tmp_path: Path) -> None:
    layout, layout_digest = _tiny_oci_layout(tmp_path)

    pushed_digest = registry.push(layout, "v1", "lazyfs/tiny", "first")

    request = urllib.request.Request(
        f"http://{registry.host}/v2/lazyfs/tiny/manifests/first",
        headers={"Accept": OCI_MANIFEST_TYPE},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        content_type = response.headers["Content-Type"]
        header_digest = response.headers["Docker-Content-Digest"]

    assert pushed_digest == layout_digest
    assert content_type == OCI_MANIFEST_TYPE
    assert header_digest == layout_digest
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layout_digest


def test_registry_host_is_loopback(registry: Registry) -> None:
    host, port = registry.host.rsplit(":", 1)

    assert host == "127.0.0.1"
    assert int(port) > 0


# trees


def _set_mtime(path: Path | bytes, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _set_user_xattr(path: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(path, name, value)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"{path.parent} does not support user.* xattrs")
        raise


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the tree fixture sets file owners, which needs root")
    root = tmp_path / "tree"
    root.mkdir()
    data = root / "data"
    data.mkdir()
    (data / "a").write_bytes(b"hello")
    os.link(data / "a", data / "b")
    (root / "tool").write_bytes(b"#!/bin/sh\n")
    os.symlink("data/a", root / "link")
    os.mkfifo(root / "fifo")
    (root / "tagged").write_bytes(b"")
    _set_user_xattr(root / "tagged", "user.lazyfs.test", b"\x00value")
    non_utf8 = os.fsencode(root) + b"/caf\xe9"
    with open(non_utf8, "wb") as file:
        file.write(b"latin-1 name")

    # Set owners before modes, because chown clears the setuid bit. Set times
    # last, children before parents, because creating an entry changes its
    # directory's mtime.
    paths = [root, data, data / "a", root / "tool", root / "link", root / "fifo",
             root / "tagged", non_utf8]
    for path in paths:
        os.chown(path, 1234, 5678, follow_symlinks=False)
    os.chmod(data / "a", 0o640)
    os.chmod(root / "tool", 0o4755)
    os.chmod(root / "fifo", 0o600)
    os.chmod(root / "tagged", 0o644)
    os.chmod(non_utf8, 0o644)
    os.chmod(data, 0o1750)
    os.chmod(root, 0o755)
    for path in paths[2:]:
        _set_mtime(path, 1_000_000_000_123_456_789)
    _set_mtime(data, 2_000_000_000_000_000_000)
    _set_mtime(root, 3_000_000_000_000_000_000)
    return root


def test_snapshot_records_exact_entries(small_tree: Path) -> None:
    t1 = 1_000_000_000_123_456_789
    file_fields = dict(uid=1234, gid=5678, target=None, rdev=None, mtime_ns=t1)
    hello = trees.Entry(
        type="file", mode=0o640, size=5, sha256=hashlib.sha256(b"hello").hexdigest(),
        xattrs={}, **file_fields,
    )
    expected = {
        b".": trees.Entry(
            type="dir", mode=0o755, uid=1234, gid=5678, size=None, sha256=None, target=None,
            rdev=None, xattrs={}, mtime_ns=3_000_000_000_000_000_000,
        ),
        b"caf\xe9": trees.Entry(
            type="file", mode=0o644, size=12,
            sha256=hashlib.sha256(b"latin-1 name").hexdigest(), xattrs={}, **file_fields,
        ),
        b"data": trees.Entry(
            type="dir", mode=0o1750, uid=1234, gid=5678, size=None, sha256=None, target=None,
            rdev=None, xattrs={}, mtime_ns=2_000_000_000_000_000_000,
        ),
        b"data/a": hello,
        b"data/b": hello,
        b"fifo": trees.Entry(
            type="fifo", mode=0o600, size=None, sha256=None, xattrs={}, **file_fields,
        ),
        b"link": trees.Entry(
            type="symlink", mode=0o777, uid=1234, gid=5678, size=6, sha256=None,
            target=b"data/a", rdev=None, xattrs={}, mtime_ns=t1,
        ),
        b"tagged": trees.Entry(
            type="file", mode=0o644, size=0, sha256=hashlib.sha256(b"").hexdigest(),
            xattrs={"user.lazyfs.test": b"\x00value"}, **file_fields,
        ),
        b"tool": trees.Entry(
            type="file", mode=0o4755, size=10,
            sha256=hashlib.sha256(b"#!/bin/sh\n").hexdigest(), xattrs={}, **file_fields,
        ),
    }

    snapshot = trees.snapshot(small_tree)

    assert not trees.diff(expected, snapshot)
    assert snapshot == expected


def test_snapshot_records_device_rdev(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))

    entry = trees.snapshot(tmp_path)[b"null"]

    assert entry.type == "char"
    assert entry.rdev == os.makedev(1, 3)
    assert entry.size is None


def test_hardlink_groups_pairs_linked_files(small_tree: Path) -> None:
    assert trees.hardlink_groups(small_tree) == {frozenset({b"data/a", b"data/b"})}


def test_diff_reports_changed_mode(small_tree: Path) -> None:
    before = trees.snapshot(small_tree)
    os.chmod(small_tree / "tool", 0o755)

    differences = trees.diff(before, trees.snapshot(small_tree))

    assert differences == ["tool: mode expected 0o4755, got 0o755"]


def test_diff_reports_missing_and_extra(small_tree: Path) -> None:
    before = trees.snapshot(small_tree)
    os.unlink(small_tree / "fifo")
    (small_tree / "new").write_bytes(b"")

    differences = trees.diff(before, trees.snapshot(small_tree), compare_mtime=False)

    assert differences == ["missing: fifo (fifo)", "extra: new (file)"]


def test_diff_mtime_and_ignore_options(small_tree: Path) -> None:
    before = trees.snapshot(small_tree)
    os.utime(small_tree / "tagged", ns=(5, 5))
    os.chmod(small_tree / "data" / "a", 0o600)
    after = trees.snapshot(small_tree)

    assert trees.diff(before, after, compare_mtime=False, ignore=[b"data"]) == []
    assert trees.diff(before, after, ignore_fields=["mtime_ns", "mode"]) == []
    assert trees.diff(before, after, ignore=[b"data"]) == [
        "tagged: mtime_ns expected 1000000000123456789, got 5"
    ]
    with pytest.raises(ValueError, match="unknown Entry fields"):
        trees.diff(before, after, ignore_fields=["mtime"])


# debootstrap image


@pytest.mark.image
def test_debootstrap_image_layers_and_config(debootstrap_image: tuple[Path, str]) -> None:
    layout, tag = debootstrap_image
    index = json.loads((layout / "index.json").read_text())
    (descriptor,) = [
        m for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    manifest = json.loads(_blob(layout, descriptor["digest"]))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))["config"]

    assert tag == "latest"
    assert len(manifest["layers"]) == 2
    assert config["Cmd"] == ["/usr/bin/python3"]
    assert config["WorkingDir"] == "/"
    assert any(env.startswith("PATH=") for env in config["Env"])
    assert not list(layout.parent.glob(f".build-{images.IMAGE_NAME}-*"))


@pytest.mark.image
def test_debootstrap_image_unpacks(debootstrap_image: tuple[Path, str], tmp_path: Path) -> None:
    layout, tag = debootstrap_image

    rootfs = images.umoci_unpack(layout, tag, tmp_path / "bundle")

    assert (rootfs / "usr/bin/python3").exists()
    assert (rootfs / "etc/debian_version").read_text().startswith("12.")
    assert stat.S_ISCHR((rootfs / "dev/null").lstat().st_mode)
    assert not (rootfs / "etc/resolv.conf").exists()
    assert not list((rootfs / "var/cache/apt/archives").glob("*.deb"))


def _blob(layout: Path, digest: str) -> bytes:
    algorithm, hex_digest = digest.split(":", 1)
    return (layout / "blobs" / algorithm / hex_digest).read_bytes()
