"""Files of the daemon's local caches beside the disk tier: cached indexes and boot traces."""

from __future__ import annotations

import os
from pathlib import Path


def write_cache_file(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` so that a reader sees all of ``data`` or no file; raise OSError.

    The bytes go to a temporary name in the same directory, which is then
    renamed. The directory is created with mode 0700 if it is missing.
    """
    path = directory / name
    temporary = directory / f".{name}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
