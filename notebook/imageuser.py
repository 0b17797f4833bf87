"""Resolve an image config's ``User`` against the image's own passwd and group files.

The OCI image spec allows ``user``, ``uid``, ``user:group``, ``uid:gid``,
``user:gid`` and ``uid:group``. Names are looked up in ``/etc/passwd`` and
``/etc/group`` of the image tree, never the host's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError


@dataclass(frozen=True)
class ProcessUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def _read_table(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(rootfs: Path, spec: str) -> ProcessUser:
    """Return the uid, gid, supplementary groups and home for an image ``User`` value."""
    spec = spec.strip()
    if not spec:
        spec = "0"
    user_part, _, group_part = spec.partition(":")
    passwd = _read_table(rootfs / "etc/passwd")
    groups = _read_table(rootfs / "etc/group")

    entry = None
    for fields in passwd:
        if len(fields) >= 7 and (fields[0] == user_part or (user_part.isdigit() and fields[2] == user_part)):
            entry = fields
            break
    if user_part.isdigit():
        uid = int(user_part)
    elif entry is not None:
        uid = int(entry[2])
    else:
        raise LazyfsError(f"image user {user_part!r} is not in the image's /etc/passwd")

    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = next((g for g in groups if len(g) >= 3 and g[0] == group_part), None)
            if match is None:
                raise LazyfsError(f"image group {group_part!r} is not in the image's /etc/group")
            gid = int(match[2])
    else:
        gid = int(entry[3]) if entry is not None else 0

    name = entry[0] if entry is not None else None
    additional = sorted({int(g[2]) for g in groups
                         if len(g) >= 4 and name and name in g[3].split(",") and int(g[2]) != gid})
    home = entry[5] if entry is not None and entry[5] else "/"
    return ProcessUser(uid, gid, tuple(additional), home)
