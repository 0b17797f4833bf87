"""The container root: overlayfs over a read-only lower directory."""

from __future__ import annotations

import os
import stat

import pytest

from lazyfs.daemon import is_mounted
from lazyfs.notebook.overlay import OverlayRoot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")


def test_overlay_root_lifecycle(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "file").write_bytes(b"lower")
    state = tmp_path / "state" / "container"
    state.parent.mkdir()

    with OverlayRoot(lower, state) as root:
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert is_mounted(root.rootfs)
        assert (root.rootfs / "file").read_bytes() == b"lower"
        (root.rootfs / "file").write_bytes(b"upper")
        (root.rootfs / "new").write_bytes(b"new")

    assert not is_mounted(state / "rootfs")
    assert (lower / "file").read_bytes() == b"lower"
    assert not (lower / "new").exists()
    assert (state / "upper" / "file").read_bytes() == b"upper"
    assert (state / "upper" / "new").read_bytes() == b"new"


def test_overlay_root_existing_state_rejected(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    state = tmp_path / "state"
    state.mkdir()

    with pytest.raises(FileExistsError):
        with OverlayRoot(lower, state):
            pass


def test_overlay_root_owner(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "file").write_bytes(b"lower")
    os.chown(lower, 100000, 100000)
    state = tmp_path / "state"

    with OverlayRoot(lower, state, owner=(100000, 100001)) as root:
        for directory in (state, root.upper, root.work, root.rootfs):
            info = os.stat(directory)
            assert (info.st_uid, info.st_gid) == (100000, 100001), directory
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(root.upper).st_mode) == 0o755
        (root.rootfs / "new").write_bytes(b"new")

    info = os.stat(state / "upper" / "new")
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert (state / "upper" / "new").read_bytes() == b"new"
