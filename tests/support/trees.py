"""Record a directory tree's metadata and contents, and compare two records.

Tests use this to check that a mounted image shows exactly the tree that
``umoci unpack`` of the same image produces. Paths are bytes relative to the
root, so names that are not valid UTF-8 survive. The walk uses ``lstat`` and
never follows symlinks.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

ROOT = b"."

_READ_BLOCK_BYTES = 1 << 20
_MAX_DIFF_LINES = 50


@dataclasses.dataclass(frozen=True)
class Entry:
    """Metadata and content digest of one path in a tree.

    ``size`` is set for regular files and symlinks, and ``sha256`` for regular
    files only. ``target`` is set for symlinks and ``rdev`` for character and
    block devices. Each of these is None for the other types. ``nlink`` is
    recorded only on request, and never for directories, whose link count
    depends on the file system.
    """

    type: str
    mode: int
    uid: int
    gid: int
    size: int | None
    sha256: str | None
    target: bytes | None
    rdev: int | None
    xattrs: dict[str, bytes]
    mtime_ns: int
    nlink: int | None = None


_TYPE_NAMES = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


def snapshot(root: Path, *, with_nlink: bool = False) -> dict[bytes, Entry]:
    """Record every path under ``root``, keyed by its bytes path relative to ``root``.

    ``root`` itself is recorded under ``b"."``. ``with_nlink`` records the link
    count of every path that is not a directory.
    """
    root_bytes = os.fsencode(root)
    tree = {ROOT: _entry(root_bytes, with_nlink)}
    for relative, absolute in _walk(root_bytes, b""):
        tree[relative] = _entry(absolute, with_nlink)
    return tree


def hardlink_groups(root: Path) -> set[frozenset[bytes]]:
    """Return the sets of paths under ``root`` that share one inode.

    Only non-directories with more than one link inside the tree form a group.
    A hardlink to a symlink or a device is a group too.
    """
    by_inode: dict[tuple[int, int], set[bytes]] = {}
    for relative, absolute in _walk(os.fsencode(root), b""):
        st = os.lstat(absolute)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            by_inode.setdefault((st.st_dev, st.st_ino), set()).add(relative)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def diff(
    expected: Mapping[bytes, Entry],
    actual: Mapping[bytes, Entry],
    ignore: Collection[bytes] = (),
    *,
    compare_mtime: bool = True,
    ignore_fields: Collection[str] = (),
) -> list[str]:
    """Return human-readable differences between two snapshots, or [] if they are equal.

    ``ignore`` lists paths to skip together with everything below them.
    ``ignore_fields`` names Entry fields to skip, and ``compare_mtime=False``
    skips ``mtime_ns``. At most 50 lines are returned, the last one counting
    the rest.
    """
    skipped_fields = set(ignore_fields)
    unknown = skipped_fields - {field.name for field in dataclasses.fields(Entry)}
    if unknown:
        raise ValueError(f"unknown Entry fields in ignore_fields: {sorted(unknown)}")
    if not compare_mtime:
        skipped_fields.add("mtime_ns")

    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        if _is_ignored(path, ignore):
            continue
        if path not in actual:
            lines.append(f"missing: {_show_path(path)} ({expected[path].type})")
        elif path not in expected:
            lines.append(f"extra: {_show_path(path)} ({actual[path].type})")
        else:
            lines.extend(_entry_diff(path, expected[path], actual[path], skipped_fields))

    if len(lines) > _MAX_DIFF_LINES:
        rest = len(lines) - (_MAX_DIFF_LINES - 1)
        lines = lines[: _MAX_DIFF_LINES - 1] + [f"... and {rest} more differences"]
    return lines


def _walk(root: bytes, relative: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(relative path, absolute path)`` below a directory, depth first, sorted."""
    directory = os.path.join(root, relative) if relative else root
    with os.scandir(directory) as entries:
        names = sorted(entry.name for entry in entries)
    for name in names:
        child = os.path.join(relative, name) if relative else name
        absolute = os.path.join(root, child)
        yield child, absolute
        if stat.S_ISDIR(os.lstat(absolute).st_mode):
            yield from _walk(root, child)


def _entry(path: bytes, with_nlink: bool) -> Entry:
    st = os.lstat(path)
    kind = _type_name(st.st_mode)
    return Entry(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind in ("file", "symlink") else None,
        sha256=_file_sha256(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=st.st_rdev if kind in ("char", "block") else None,
        xattrs=_xattrs(path),
        mtime_ns=st.st_mtime_ns,
        nlink=st.st_nlink if with_nlink and kind != "dir" else None,
    )


def _type_name(mode: int) -> str:
    for is_type, name in _TYPE_NAMES:
        if is_type(mode):
            return name
    raise ValueError(f"unknown file type in mode {mode:#o}")


def _file_sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_READ_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        # Some file systems (and symlinks on some of them) support no xattrs.
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in sorted(names)}


def _is_ignored(path: bytes, ignore: Collection[bytes]) -> bool:
    return any(path == prefix or path.startswith(prefix + b"/") for prefix in ignore)


def _entry_diff(path: bytes, expected: Entry, actual: Entry, skipped: set[str]) -> list[str]:
    lines = []
    for field in dataclasses.fields(Entry):
        if field.name in skipped:
            continue
        want = getattr(expected, field.name)
        got = getattr(actual, field.name)
        if want != got:
            lines.append(
                f"{_show_path(path)}: {field.name} expected {_show_value(field.name, want)}, "
                f"got {_show_value(field.name, got)}"
            )
    return lines


def _show_path(path: bytes) -> str:
    return path.decode("utf-8", errors="backslashreplace")


def _show_value(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:#o}"
    if field == "rdev" and isinstance(value, int):
        return f"{os.major(value)}:{os.minor(value)}"
    return repr(value)
