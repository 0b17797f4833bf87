"""Files of the daemon's local caches beside the disk tier: cached indexes and boot traces.

The files live on a node's disk, where a crash, a full or read-only file
system or an operator can leave anything at their names. So a read opens
without following symlinks and without blocking (a FIFO never hangs it),
takes only a regular file, and reads at most the largest valid object. A
write goes to a fresh temporary file in the same directory, which is then
renamed over the name, so a reader sees all of the bytes or none, and a file
planted at a temporary name is never written through.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

Parsed = TypeVar("Parsed")


def read_cache_file(directory: Path, name: str, max_bytes: int) -> bytes | None:
    """Return the bytes of ``directory/name``, or None when there is no such file.

    Raises OSError when the name is a symlink or not a regular file, when the
    file is longer than ``max_bytes``, or when it cannot be read.
    """
    try:
        descriptor = os.open(directory / name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"longer than the {max_bytes} bytes of the largest valid file")
    return data


def write_cache_file(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` so that a reader sees all of ``data`` or no file; raise OSError.

    The directory is created with mode 0700 if it is missing.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, directory / name)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_cache_file(directory: Path, name: str, max_bytes: int, parse: Callable[[bytes], Parsed],
                    invalid: type[Exception], log: logging.Logger, kind: str, fallback: str) -> Parsed | None:
    """Read and parse ``directory/name``; return None when it is missing, unreadable or invalid.

    ``parse`` raises ``invalid`` for bytes that are not a valid object, and
    such a file is removed. Each failure logs one warning on ``log`` that
    names the ``kind`` of file and the ``fallback`` the caller takes instead.
    """
    path = directory / name
    try:
        data = read_cache_file(directory, name, max_bytes)
    except OSError as exc:
        log.warning("cannot read %s %s: %s; %s", kind, path, exc.strerror, fallback)
        return None
    if data is None:
        return None
    try:
        return parse(data)
    except invalid as exc:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("%s %s is invalid (%s); removing it failed (%s), %s",
                        kind, path, exc, error.strerror, fallback)
        else:
            log.warning("%s %s is invalid (%s); removing it and %s", kind, path, exc, fallback)
        return None
