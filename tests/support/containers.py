"""Temporary directories for container state that a user namespace's root can search.

runc 1.1 mounts a container's root file system from inside its user
namespace, so every directory above the container's state must be searchable
by the host uid of the container's root. pytest's temporary directories are
private to root (mode 0700), so the tests of ``lazyfs-run`` keep their files in
a directory under /tmp with mode 0711 instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def mounts_under(path: Path) -> list[str]:
    """Return the mount points at or below ``path``."""
    prefix = str(path)
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [point for point in points if point == prefix or point.startswith(prefix + "/")]


@contextmanager
def searchable_directory(prefix: str = "lazyfs-containers-") -> Iterator[Path]:
    """Yield a new directory under /tmp with mode 0711; remove it afterwards unless a mount is left in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        # Removing files through a mount left by a failed test would reach the
        # mounted file system, so such a directory stays for inspection.
        if not mounts_under(path):
            shutil.rmtree(path, ignore_errors=True)
