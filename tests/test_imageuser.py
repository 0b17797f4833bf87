"""Image users: names resolved in the image's own passwd and group files, never the host's."""

from __future__ import annotations

import os

import pytest

from lazyfs.errors import LazyfsError
from lazyfs.notebook.imageuser import MAX_TABLE_BYTES, ProcessUser, resolve_user

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\nstaff:x:50:app\napp:x:1000:\ndocker:x:999:app,other\n"


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def test_user_forms(rootfs):
    assert resolve_user(rootfs, "") == ProcessUser(0, 0, (), "/root")
    assert resolve_user(rootfs, "app") == ProcessUser(1000, 1000, (50, 999), "/home/app")
    assert resolve_user(rootfs, "1000") == ProcessUser(1000, 1000, (50, 999), "/home/app")
    assert resolve_user(rootfs, "app:staff") == ProcessUser(1000, 50, (999,), "/home/app")
    assert resolve_user(rootfs, "4242:4343") == ProcessUser(4242, 4343, (), "/")
    assert resolve_user(rootfs, "4242") == ProcessUser(4242, 0, (), "/")


def test_unknown_user_and_group(rootfs):
    with pytest.raises(LazyfsError, match="'nobody' is not in the image's /etc/passwd"):
        resolve_user(rootfs, "nobody")
    with pytest.raises(LazyfsError, match="'wheel' is not in the image's /etc/group"):
        resolve_user(rootfs, "app:wheel")


def test_symlinks_stay_in_image_root(rootfs, tmp_path):
    host_file = tmp_path / "host-passwd"
    host_file.write_text("app:x:4242:4343:host:/SECRET:/bin/sh\n")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "real").mkdir()
    (rootfs / "etc" / "real" / "passwd").write_text(PASSWD)

    # Absolute and climbing targets resolve inside the image, as in the container.
    for target in (str(host_file), "../../../../../../" + str(host_file)):
        os.symlink(target, rootfs / "etc" / "passwd")
        with pytest.raises(LazyfsError, match="'app' is not in the image's /etc/passwd"):
            resolve_user(rootfs, "app")
        os.unlink(rootfs / "etc" / "passwd")
    os.symlink("/etc/real/passwd", rootfs / "etc" / "passwd")
    assert resolve_user(rootfs, "app").uid == 1000


def test_special_files_rejected(rootfs):
    (rootfs / "etc" / "passwd").unlink()
    os.mkfifo(rootfs / "etc" / "passwd")

    with pytest.raises(LazyfsError, match="/etc/passwd in the image is not a regular file"):
        resolve_user(rootfs, "app")


def test_symlink_loop_and_oversized_file(rootfs):
    (rootfs / "etc" / "group").unlink()
    os.symlink("group", rootfs / "etc" / "group")
    with pytest.raises(LazyfsError, match="too many symlinks"):
        resolve_user(rootfs, "app")

    os.unlink(rootfs / "etc" / "group")
    (rootfs / "etc" / "group").write_bytes(b"#" * (MAX_TABLE_BYTES + 1))
    with pytest.raises(LazyfsError, match="larger than"):
        resolve_user(rootfs, "app")


def test_non_numeric_uid_is_error(rootfs):
    (rootfs / "etc" / "passwd").write_text("app:x:abc:1000::/home/app:/bin/sh\n")

    with pytest.raises(LazyfsError, match="invalid uid of user 'app' 'abc'"):
        resolve_user(rootfs, "app")
