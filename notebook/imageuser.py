"""Resolve an image config's ``User`` against the image's own passwd and group files.

The OCI image spec allows ``user``, ``uid``, ``user:group``, ``uid:gid``,
``user:gid`` and ``uid:group``. Names are looked up in ``/etc/passwd`` and
``/etc/group`` of the image tree, never the host's: the files are opened with
their symlinks resolved inside the image root, must be regular files and are
read up to ``MAX_TABLE_BYTES``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError

MAX_TABLE_BYTES = 4 << 20
MAX_SYMLINKS = 40


@dataclass(frozen=True)
class ProcessUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def _resolve_in_root(root: Path, path: str) -> bytes | None:
    """Return the host path of ``path`` inside ``root`` with symlinks kept in the root.

    Absolute symlink targets and ``..`` are taken relative to the image root,
    as they resolve inside the container. Returns None when a component is missing.
    """
    base = os.fsencode(root)
    pending = [part for part in os.fsencode(path).split(b"/") if part]
    pending.reverse()
    resolved: list[bytes] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == b".":
            continue
        if part == b"..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(base, *resolved, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise LazyfsError(f"too many symlinks resolving {path} in the image")
            target = os.readlink(candidate)
            if target.startswith(b"/"):
                resolved = []
            pending.extend(reversed([p for p in target.split(b"/") if p]))
            continue
        resolved.append(part)
    return os.path.join(base, *resolved)


def _read_table(root: Path, path: str) -> list[list[str]]:
    host_path = _resolve_in_root(root, path)
    if host_path is None:
        return []
    try:
        fd = os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise LazyfsError(f"cannot open {path} in the image: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LazyfsError(f"{path} in the image is not a regular file")
        data = stream.read(MAX_TABLE_BYTES + 1)
    if len(data) > MAX_TABLE_BYTES:
        raise LazyfsError(f"{path} in the image is larger than {MAX_TABLE_BYTES} bytes")
    text = data.decode("utf-8", errors="replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _number(value: str, what: str) -> int:
    if not value.isdigit():
        raise LazyfsError(f"invalid {what} {value!r} in the image: expected a decimal number")
    return int(value)


def resolve_user(rootfs: Path, spec: str) -> ProcessUser:
    """Return the uid, gid, supplementary groups and home for an image ``User`` value."""
    spec = spec.strip() or "0"
    user_part, _, group_part = spec.partition(":")
    passwd = _read_table(rootfs, "/etc/passwd")
    groups = [fields for fields in _read_table(rootfs, "/etc/group") if len(fields) >= 3]

    entry = None
    for fields in passwd:
        if len(fields) >= 7 and (fields[0] == user_part or (user_part.isdigit() and fields[2] == user_part)):
            entry = fields
            break
    if user_part.isdigit():
        uid = int(user_part)
    elif entry is not None:
        uid = _number(entry[2], f"uid of user {user_part!r}")
    else:
        raise LazyfsError(f"image user {user_part!r} is not in the image's /etc/passwd")

    if group_part.isdigit():
        gid = int(group_part)
    elif group_part:
        match = next((fields for fields in groups if fields[0] == group_part), None)
        if match is None:
            raise LazyfsError(f"image group {group_part!r} is not in the image's /etc/group")
        gid = _number(match[2], f"gid of group {group_part!r}")
    else:
        gid = _number(entry[3], f"gid of user {entry[0]!r}") if entry is not None else 0

    name = entry[0] if entry is not None else None
    additional = sorted({int(fields[2]) for fields in groups
                         if len(fields) >= 4 and name and name in fields[3].split(",")
                         and fields[2].isdigit() and int(fields[2]) != gid})
    home = entry[5] if entry is not None and entry[5] else "/"
    return ProcessUser(uid, gid, tuple(additional), home)
