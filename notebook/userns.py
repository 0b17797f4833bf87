"""The user namespace of a container: the host ids that its ids 0..65535 stand for.

Root in such a container is the host id ``base``, so it has no privileges
over host files and cannot create device nodes. The range is chosen in this
order:

1. ``--userns-base BASE``: uids and gids BASE..BASE+65535.
2. The entry of user root (by name or as uid 0) in /etc/subuid and
   /etc/subgid, when both have one: the first 65536 ids of each. An entry
   with fewer ids is an error.
3. DEFAULT_BASE (100000) for uids and gids.

Every container of the host shares that range. Debian's useradd gives the
first user it creates subordinate ids from 100000 too, so on a host with such
users, give root its own entry (for example ``root:1000000000:65536`` in both
files) to keep their rootless containers apart from these.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError
from lazyfs.idshift import MAX_ID, IdShift

CONTAINER_IDS = 65536
DEFAULT_BASE = 100000
SUBUID_PATH = Path("/etc/subuid")
SUBGID_PATH = Path("/etc/subgid")


@dataclass(frozen=True)
class IdRange:
    """Host uids and gids that a container's ids 0..count-1 map to."""

    uid_base: int
    gid_base: int
    count: int = CONTAINER_IDS

    def __post_init__(self) -> None:
        for kind, base in (("uid", self.uid_base), ("gid", self.gid_base)):
            if base < 1 or base + self.count - 1 > MAX_ID:
                raise LazyfsError(f"invalid user namespace {kind} base {base}: "
                                  f"expected 1 to {MAX_ID - self.count + 1}")

    @property
    def shift(self) -> str:
        """The name of the daemon's view whose owners are shifted into this range."""
        return IdShift(self.uid_base, self.gid_base, self.count).name

    def mappings(self) -> dict[str, list[dict[str, int]]]:
        """Return the runtime spec's uidMappings and gidMappings."""
        return {
            "uidMappings": [{"containerID": 0, "hostID": self.uid_base, "size": self.count}],
            "gidMappings": [{"containerID": 0, "hostID": self.gid_base, "size": self.count}],
        }


def host_id_range(base: int | None = None, subuid: Path = SUBUID_PATH,
                  subgid: Path = SUBGID_PATH) -> IdRange:
    """Return the host id range for containers; see the module docstring for the order."""
    if base is not None:
        return IdRange(base, base)
    uid_base = _root_entry(subuid)
    gid_base = _root_entry(subgid)
    if uid_base is not None and gid_base is not None:
        return IdRange(uid_base, gid_base)
    return IdRange(DEFAULT_BASE, DEFAULT_BASE)


def _root_entry(path: Path) -> int | None:
    """Return the first id of root's entry in a subordinate id file, or None if it has none."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LazyfsError(f"cannot read {path}: {exc.strerror}") from None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in ("root", "0"):
            continue
        if not (fields[1].isdigit() and fields[2].isdigit()):
            raise LazyfsError(f"invalid entry {line.strip()!r} in {path}: expected root:FIRST:COUNT")
        if int(fields[2]) < CONTAINER_IDS:
            raise LazyfsError(f"the root entry of {path} has {fields[2]} ids, but containers need "
                              f"{CONTAINER_IDS}: enlarge it or pass --userns-base")
        return int(fields[1])
    return None


def check_searchable(path: Path, uid: int, gid: int) -> None:
    """Raise unless host ``uid``/``gid`` may search every directory from / down to ``path``.

    runc 1.1 mounts the container's root directory from inside the user
    namespace, where root is ``uid``, so the path there must be searchable
    for it, not only for host root.
    """
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            info = os.stat(current)
        except FileNotFoundError:
            return
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            raise LazyfsError(
                f"container state directory {path}: {current} is not searchable by host uid {uid}, "
                f"the container's root: run chmod o+x {current}, choose another --state-dir, "
                "or pass --no-userns")
