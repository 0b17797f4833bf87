"""A writable root over a read-only image directory: overlayfs mounted with mount(2).

The image directory on the lazyfs mount is the lower layer. The upper and work
directories live in the container's state directory on a local filesystem,
because overlayfs refuses a FUSE upper layer. For a container in a user
namespace, the lower layer is the daemon's view with shifted owners and the
state directory, upper and work belong to the host ids of the container's
root, so that root owns the root directory and can write through the overlay.
Overlayfs reaches the lower layer with the credentials of its mounter (host
root), which is why the FUSE mount needs no ``allow_other`` for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

from lazyfs.errors import LazyfsError

log = logging.getLogger(__name__)

MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _escape(path: Path) -> str:
    # overlayfs splits its options on "," and lowerdir on ":".
    text = str(path)
    for char in ("\\", ",", ":"):
        text = text.replace(char, "\\" + char)
    return text


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    """Mount an overlayfs at ``target``; raise LazyfsError with the kernel's errno on failure."""
    options = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)}"
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        code = ctypes.get_errno()
        raise LazyfsError(f"mounting overlayfs at {target} (lower {lower}) failed: {os.strerror(code)}")


def unmount(target: Path) -> None:
    """Unmount ``target``; fall back to a lazy unmount when it is busy."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return
    if code == errno.EBUSY and _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        log.warning("overlay %s was busy; detached it lazily", target)
        return
    raise LazyfsError(f"unmounting {target} failed: {os.strerror(code)}")


class OverlayRoot:
    """Context manager: ``state/{upper,work,rootfs}`` with the overlay mounted on rootfs.

    ``owner`` (uid, gid) owns the state directory, upper and work; host root
    when None.
    """

    def __init__(self, lower: Path, state: Path, owner: tuple[int, int] | None = None):
        self.lower = lower
        self.state = state
        self.owner = owner
        self.upper = state / "upper"
        self.work = state / "work"
        self.rootfs = state / "rootfs"
        self._mounted = False

    def __enter__(self) -> "OverlayRoot":
        # Owner-only: the rootfs under it has the image's setuid files and
        # devices, which other host users must not reach while it is mounted.
        self.state.mkdir(mode=0o700)
        os.chmod(self.state, 0o700)
        for directory in (self.upper, self.work, self.rootfs):
            directory.mkdir(mode=0o755)
        if self.owner is not None:
            for directory in (self.state, self.upper, self.work):
                os.chown(directory, *self.owner)
        mount_overlay(self.lower, self.upper, self.work, self.rootfs)
        self._mounted = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._mounted:
            unmount(self.rootfs)
            self._mounted = False
