"""Apply layer tar streams, bottom layer first, onto one in-memory tree.

The result is what applying the layers in order onto one empty directory
gives, as Docker's layer applier and ``umoci unpack`` do:

- ``DIR/.wh.NAME`` removes ``DIR/NAME`` and everything below it, whichever
  layer added it, if it exists at that point of the stream. (The OCI image
  spec says a whiteout applies only to lower layers; Docker removes a same-layer
  entry that comes earlier in the stream too, and so does this module.)
- ``DIR/.wh..wh..opq`` removes everything below DIR that the current layer has
  not added: a path stays when the layer has an entry for it or below it,
  before or after the marker. Other ``.wh..wh.`` names, and everything below a
  top-level one, are AUFS bookkeeping and are skipped.
- A file, symlink, hardlink, device or fifo replaces whatever is at its path;
  other names of a replaced hardlinked inode keep the old inode.
- A directory over a directory keeps the children and takes the new
  attributes; over anything else it replaces it, empty.
- A missing parent directory is created with mode 0755, owner 0:0, mtime 0.
  A whiteout creates its missing parents too, as Docker and containerd do
  (umoci 0.4.7 skips such a whiteout). Docker gives a created parent the time
  of the unpack, but mtime 0 keeps the index of an image the same on every run.
- An xattr with an empty value is kept, as Docker and containerd keep it
  (umoci 0.4.7 drops it).
- Of two entries for one path in one layer the later wins.
- A hardlink shares the inode (``Node``) of its target, which must exist at
  that point and must not be a directory.

Entry names are bytes: tarfile decodes them as UTF-8 with surrogateescape and
this module encodes them back the same way, so any byte string survives. A
leading "./" (and any "." or empty component) is dropped. Names that are
absolute, contain "..", or lead through a symlink or a non-directory are
rejected, as are such hardlink targets: nothing can land outside the image
root or be written through a link.
"""

from __future__ import annotations

import decimal
import logging
import os
import stat
import tarfile
from collections.abc import Iterable
from typing import BinaryIO

from ..index import Node
from .chunker import Chunker
from .errors import ImageError
from .tarheaders import CheckedTarInfo

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
AUFS_METADATA_PREFIX = b".wh..wh."
XATTR_PREFIX = "SCHILY.xattr."

# tarfile's stream reader copies the rest of its buffer on every read, so a
# larger buffer makes each 512-byte header read slower.
TAR_BUFFER_BYTES = 64 << 10

_U32 = 1 << 32
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_NANOSECONDS = decimal.Decimal(10) ** 9

Path = tuple[bytes, ...]


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _display(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


# Linux's NAME_MAX: the kernel rejects longer names, so the mount could not show them.
NAME_MAX_BYTES = 255
# Linux's PATH_MAX. It also bounds the depth of a path, and with it the
# per-entry work of tracking ancestors for opaque markers.
PATH_MAX_BYTES = 4096


class Flattener:
    """Builds the flattened tree of one image; ``root`` is the result."""

    def __init__(self, chunker: Chunker, image: str, max_image_bytes: int | None = None):
        self.root = Node(mode=stat.S_IFDIR | 0o755)
        self.chunker = chunker
        self.image = image
        self.max_image_bytes = max_image_bytes
        self.file_bytes = 0
        self.entries = 0
        self._layer = ""
        # Paths with an entry in the current layer, and all their ancestors,
        # for opaque markers.
        self._layer_paths: set[Path] = set()

    def apply_layer(self, stream: BinaryIO, layer: str) -> int:
        """Apply the uncompressed tar ``stream`` of one layer; return its entry count.

        Reads up to the end-of-archive marker (or EOF); the caller drains the
        stream after that. ``layer`` names the layer in errors.
        """
        self._layer = layer
        self._layer_paths = set()
        count = 0
        try:
            archive = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",
                                   errors="surrogateescape", bufsize=TAR_BUFFER_BYTES,
                                   tarinfo=CheckedTarInfo)
            while (member := archive.next()) is not None:
                self._apply(member, archive)
                # TarFile keeps every header it has read; in stream mode nothing
                # needs them again, and an image has millions in the worst case.
                archive.members.clear()
                count += 1
        except tarfile.TarError as exc:
            raise ImageError(f"{self.image} layer {layer}: invalid tar stream: {exc}") from None
        self.entries += count
        return count

    def apply_members(self, members: Iterable[tarfile.TarInfo], layer: str) -> int:
        """Apply the tar headers of one layer, read earlier; return their count.

        The chunker gets None instead of a file data stream, so it must know
        each regular file's extents already (``layercache.RecordedExtents``).
        """
        self._layer = layer
        self._layer_paths = set()
        count = 0
        for member in members:
            self._apply(member, None)
            count += 1
        self.entries += count
        return count

    # -- entries -------------------------------------------------------------

    def _apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile | None) -> None:
        name = _encode(member.name)
        path = self._split(name, name, "the name")
        if not path:
            self._apply_root(member, name)
            return
        if path[0].startswith(AUFS_METADATA_PREFIX) and path != (OPAQUE_MARKER,):
            log.debug("%s layer %s: skipping AUFS metadata entry %s", self.image, self._layer,
                      _display(name))
            return
        parent_path, base = path[:-1], path[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._apply_whiteout(parent_path, base, name)
            return
        parent = self._directory(parent_path, name, create=True)
        self._mark(path)

        if member.islnk():
            node = self._link_target(member, name)
        elif member.isdir():
            existing = parent.children.get(base)
            if existing is not None and existing.is_dir:
                self._set_attributes(existing, member, name, stat.S_IFDIR)
                return
            node = self._new_node(member, name, stat.S_IFDIR)
        elif member.isreg():
            # Declared sizes count too: a sparse entry can claim exabytes of holes.
            self.file_bytes += member.size
            if self.max_image_bytes is not None and self.file_bytes > self.max_image_bytes:
                raise self._error(name, f"file data exceeds the limit of {self.max_image_bytes} bytes "
                                        "per image (--max-image-bytes)")
            node = self._new_node(member, name, stat.S_IFREG)
            node.size = member.size
            data = archive.extractfile(member) if archive is not None else None
            self.chunker.add_file(node, data, self._label(name))
        elif member.issym():
            node = self._new_node(member, name, stat.S_IFLNK)
            # Linux ignores a symlink's permission bits and always shows 0777.
            node.mode = stat.S_IFLNK | 0o777
            node.target = _encode(member.linkname)
            if not node.target:
                raise self._error(name, "symlink has an empty target")
            if len(node.target) >= PATH_MAX_BYTES:
                # The daemon rejects such an index too: Linux cannot hold this symlink.
                raise self._error(name, f"symlink target is longer than {PATH_MAX_BYTES - 1} bytes")
        elif member.ischr() or member.isblk():
            node = self._new_node(member, name, stat.S_IFCHR if member.ischr() else stat.S_IFBLK)
            node.rdev = os.makedev(member.devmajor, member.devminor)
        elif member.isfifo():
            node = self._new_node(member, name, stat.S_IFIFO)
        else:
            entry_type = member.type.decode("ascii", "backslashreplace")
            raise self._error(name, f"unsupported tar entry type '{entry_type}'")
        parent.children[base] = node

    def _apply_root(self, member: tarfile.TarInfo, name: bytes) -> None:
        if not member.isdir():
            raise self._error(name, "the entry for the image root is not a directory")
        self._set_attributes(self.root, member, name, stat.S_IFDIR)

    def _apply_whiteout(self, parent_path: Path, base: bytes, name: bytes) -> None:
        parent = self._directory(parent_path, name, create=True)
        self._mark(parent_path)
        if base == OPAQUE_MARKER:
            self._clear_opaque(parent, parent_path)
            return
        if base.startswith(AUFS_METADATA_PREFIX):
            log.debug("%s layer %s: skipping AUFS metadata entry %s", self.image, self._layer,
                      _display(name))
            return
        target = base[len(WHITEOUT_PREFIX):]
        if target in (b"", b".", b".."):
            raise self._error(name, "whiteout names no entry")
        parent.children.pop(target, None)

    def _clear_opaque(self, directory: Node, path: Path) -> None:
        """Remove everything below ``directory`` that the current layer has not added."""
        stack = [(directory, path)]
        while stack:
            node, node_path = stack.pop()
            for child_name in list(node.children):
                child_path = node_path + (child_name,)
                child = node.children[child_name]
                if child_path not in self._layer_paths:
                    del node.children[child_name]
                elif child.is_dir:
                    stack.append((child, child_path))

    def _link_target(self, member: tarfile.TarInfo, name: bytes) -> Node:
        linkname = _encode(member.linkname)
        target_path = self._split(linkname, name, f"hardlink target {_display(linkname)!r}")
        if not target_path:
            raise self._error(name, "hardlink to the image root")
        directory = self._directory(target_path[:-1], name, create=False, subject="hardlink target")
        target = directory.children.get(target_path[-1]) if directory is not None else None
        if target is None:
            raise self._error(name, f"hardlink target {_display(linkname)!r} does not exist")
        if target.is_dir:
            raise self._error(name, f"hardlink target {_display(linkname)!r} is a directory")
        return target

    # -- paths ---------------------------------------------------------------

    def _split(self, raw: bytes, name: bytes, subject: str) -> Path:
        """Return the components of a tar path; reject absolute paths, '..' and NUL bytes."""
        if raw.startswith(b"/"):
            raise self._error(name, f"{subject} is an absolute path")
        if len(raw) > PATH_MAX_BYTES:
            raise self._error(name, f"{subject} is longer than {PATH_MAX_BYTES} bytes")
        if b"\0" in raw:
            raise self._error(name, f"{subject} contains a NUL byte")
        parts = tuple(part for part in raw.split(b"/") if part not in (b"", b"."))
        if b".." in parts:
            raise self._error(name, f"{subject} contains a '..' component")
        if any(len(part) > NAME_MAX_BYTES for part in parts):
            raise self._error(name, f"{subject} has a component longer than {NAME_MAX_BYTES} bytes")
        return parts

    def _directory(self, path: Path, name: bytes, create: bool, subject: str = "entry") -> Node | None:
        """Return the directory at ``path``, creating missing ones if ``create``.

        Returns None for a missing directory when not creating. Raises an
        ImageError when the path leads through a symlink or a non-directory.
        """
        node = self.root
        for depth, part in enumerate(path):
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = Node(mode=stat.S_IFDIR | 0o755)
                node.children[part] = child
            elif stat.S_ISLNK(child.mode):
                parent = _display(b"/".join(path[:depth + 1]))
                raise self._error(name, f"{subject} leads through the symlink {parent!r}")
            elif not child.is_dir:
                parent = _display(b"/".join(path[:depth + 1]))
                raise self._error(name, f"{subject} leads through {parent!r}, which is not a directory")
            node = child
        return node

    def _mark(self, path: Path) -> None:
        while path and path not in self._layer_paths:
            self._layer_paths.add(path)
            path = path[:-1]

    # -- attributes ------------------------------------------------------------

    def _new_node(self, member: tarfile.TarInfo, name: bytes, file_type: int) -> Node:
        node = Node(mode=file_type)
        self._set_attributes(node, member, name, file_type)
        return node

    def _set_attributes(self, node: Node, member: tarfile.TarInfo, name: bytes, file_type: int) -> None:
        for field in ("uid", "gid"):
            value = getattr(member, field)
            if not 0 <= value < _U32:
                raise self._error(name, f"{field} {value} is out of range")
        node.mode = file_type | (member.mode & 0o7777)
        node.uid = member.uid
        node.gid = member.gid
        node.mtime_ns = self._mtime_ns(member, name)
        node.xattrs = self._xattrs(member, name)

    def _mtime_ns(self, member: tarfile.TarInfo, name: bytes) -> int:
        """Return the mtime in ns: exact from a PAX record, else whole seconds from the header.

        tarfile turns a PAX mtime into a float, which loses the nanoseconds.
        """
        text = member.pax_headers.get("mtime")
        try:
            seconds = decimal.Decimal(text) if text is not None else decimal.Decimal(int(member.mtime))
        except (decimal.InvalidOperation, ValueError):
            raise self._error(name, f"invalid mtime {text!r}") from None
        if not seconds.is_finite():
            raise self._error(name, f"invalid mtime {text!r}")
        nanoseconds = int((seconds * _NANOSECONDS).to_integral_value(rounding=decimal.ROUND_FLOOR))
        if not _I64_MIN <= nanoseconds <= _I64_MAX:
            raise self._error(name, f"mtime {text or member.mtime} is out of range")
        return nanoseconds

    def _xattrs(self, member: tarfile.TarInfo, name: bytes) -> dict[bytes, bytes]:
        xattrs = {}
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PREFIX):
                xattr_name = _encode(key[len(XATTR_PREFIX):])
                if not xattr_name or b"\0" in xattr_name:
                    raise self._error(name, "extended attribute with an empty name or a NUL byte")
                xattrs[xattr_name] = _encode(value)
        return xattrs

    # -- errors --------------------------------------------------------------

    def _label(self, name: bytes) -> str:
        return f"{self.image} layer {self._layer}: entry {_display(name)!r}"

    def _error(self, name: bytes, message: str) -> ImageError:
        return ImageError(f"{self._label(name)}: {message}")
