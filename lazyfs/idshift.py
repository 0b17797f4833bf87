"""Id ranges of shifted image views: owners moved into a user namespace's host ids.

A container in a user namespace maps its ids 0..count-1 to host ids
base..base+count-1. ``IdShift`` translates an image's owners for such a
view: a uid N below ``count`` becomes ``uid base + N``, a gid likewise, and an
id at or above ``count`` becomes OVERFLOW_ID, which the namespace does not map.
The owner ids inside ``security.capability`` and POSIX ACL xattrs move the
same way. ``lazyfs.tree`` serves the views.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The id that ids outside a shifted view's range show as: the kernel's
# default overflowuid and overflowgid.
OVERFLOW_ID = 65534
# The largest valid uid or gid; (uid_t) -1 means "no id" in chown(2).
MAX_ID = 2**32 - 2
_ID_SHIFT_NAME = re.compile(rb"(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9}):([1-9][0-9]{0,9})")

# Extended attributes that contain owner ids (linux/capability.h, linux/posix_acl_xattr.h).
CAPABILITY_XATTR = b"security.capability"
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_1 = 0x01000000
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_ACL_XATTR_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08


@dataclass(frozen=True)
class IdShift:
    """The id range of a shifted view: id N below ``count`` shows as base + N, others as OVERFLOW_ID."""

    uid_base: int
    gid_base: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"invalid id range: count must be at least 1, not {self.count}")
        for kind, base in (("uid", self.uid_base), ("gid", self.gid_base)):
            if base < 0 or base + self.count - 1 > MAX_ID:
                raise ValueError(f"invalid id range: {kind} base {base} with count {self.count} "
                                 f"leaves 0..{MAX_ID}")

    @property
    def name(self) -> str:
        """The range directory's name under shifted/: ``<uid base>:<gid base>:<count>``."""
        return f"{self.uid_base}:{self.gid_base}:{self.count}"

    @classmethod
    def from_name(cls, name: bytes) -> IdShift | None:
        """Return the range a directory name under shifted/ stands for, or None if it is not canonical."""
        match = _ID_SHIFT_NAME.fullmatch(name)
        if match is None:
            return None
        try:
            return cls(*(int(group) for group in match.groups()))
        except ValueError:
            return None

    def uid(self, uid: int) -> int:
        return self.uid_base + uid if uid < self.count else OVERFLOW_ID

    def gid(self, gid: int) -> int:
        return self.gid_base + gid if gid < self.count else OVERFLOW_ID

    def xattr(self, name: bytes, value: bytes) -> bytes:
        """Return an extended attribute's value with the owner ids in it shifted.

        A file capability of revision 1 or 2 has the implied root id 0, so it
        becomes revision 3 with the shifted root id. The kernel applies such a
        capability only in the user namespace whose root is that id. Values
        that do not parse are returned unchanged.
        """
        if name == CAPABILITY_XATTR:
            return self._capability(value)
        if name in ACL_XATTRS:
            return self._acl(value)
        return value

    def _capability(self, value: bytes) -> bytes:
        if len(value) < 4:
            return value
        magic = int.from_bytes(value[:4], "little")
        revision = magic & _VFS_CAP_REVISION_MASK
        flags = magic & ~_VFS_CAP_REVISION_MASK
        if revision == _VFS_CAP_REVISION_1 and len(value) == 12:
            data, root = value[4:12] + bytes(8), 0
        elif revision == _VFS_CAP_REVISION_2 and len(value) == 20:
            data, root = value[4:20], 0
        elif revision == _VFS_CAP_REVISION_3 and len(value) == 24:
            data, root = value[4:20], int.from_bytes(value[20:24], "little")
        else:
            return value
        header = (_VFS_CAP_REVISION_3 | flags).to_bytes(4, "little")
        return header + data + self.uid(root).to_bytes(4, "little")

    def _acl(self, value: bytes) -> bytes:
        if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != _ACL_XATTR_VERSION:
            return value
        result = bytearray(value)
        for offset in range(4, len(value), 8):
            tag = int.from_bytes(value[offset:offset + 2], "little")
            shift = {_ACL_USER: self.uid, _ACL_GROUP: self.gid}.get(tag)
            if shift is not None:
                owner = int.from_bytes(value[offset + 4:offset + 8], "little")
                result[offset + 4:offset + 8] = shift(owner).to_bytes(4, "little")
        return bytes(result)
