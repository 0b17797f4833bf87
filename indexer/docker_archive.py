"""A ``docker save`` archive as an image source: ``docker-archive:PATH[:REPO:TAG]``.

The archive is a tar with a ``manifest.json`` at its root: a list of images,
each with ``Config`` (the member holding the image config), ``RepoTags`` and
``Layers`` (the layer members, bottom first). Older Docker versions write
``<id>.json`` and ``<id>/layer.tar``; Docker 25 and later write
``blobs/sha256/<hex>`` members. Layers are uncompressed tars, or gzip or
zstd streams, which the first bytes of each member tell apart.

There is no registry manifest in the archive, so the source builds an OCI
image manifest from the config and the layers. Its bytes depend only on the
config and the layer contents, so the same image gives the same manifest
digest, and the same index, every time. A layer's digest comes from its
``blobs/sha256/<hex>`` name, or for an uncompressed layer from its diff_id in
the config. A compressed layer under any other name is hashed once while
the source resolves. The pipeline then checks every layer against that
digest and its config diff_id as it streams.

Members are read in place: ``tarfile`` lists them once, and each member
stream reads its byte range with ``pread``, so the pipeline's layer threads
read different members at once without sharing a file offset. Nothing is
extracted to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import tarfile
from typing import Any, BinaryIO

from . import mediatypes
from .errors import ImageError, SourceError, UsageError
from .manifest import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Descriptor, load_json, parse_config
from .source import RootDocument, Source
from .streams import ReadStream
from .tarheaders import CheckedTarInfo

PREFIX = "docker-archive:"
MANIFEST_MEMBER = "manifest.json"

_LAYER_TYPES = {
    mediatypes.UNCOMPRESSED: "application/vnd.oci.image.layer.v1.tar",
    mediatypes.GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    mediatypes.ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HASH_READ_BYTES = 1 << 20
MAX_LINK_HOPS = 8


def parse_archive_reference(text: str) -> tuple[str, str | None]:
    """Split "docker-archive:PATH[:REPO:TAG]" into (PATH, "REPO:TAG" or None).

    PATH is the longest prefix that names an existing file, so a path may
    contain ':'. A reference must name a tag: "PATH:REPO" alone is rejected.
    """
    body = text.removeprefix(PREFIX)
    if os.path.isfile(body):
        return body, None
    if os.path.exists(body):
        raise SourceError(f"{PREFIX}{body}: not a regular file; give the archive file docker save wrote")
    for position in range(len(body) - 1, 0, -1):
        if body[position] != ":" or not os.path.isfile(body[:position]):
            continue
        reference = body[position + 1:]
        repository, colon, tag = reference.rpartition(":")
        if not colon or not repository or not tag or "/" in tag:
            raise UsageError(f"invalid source {text!r}: the image reference {reference!r} needs the form "
                             "REPO:TAG (docker-archive:PATH[:REPO:TAG])")
        return body[:position], reference
    raise UsageError(f"invalid source {text!r}: no such archive file (docker-archive:PATH[:REPO:TAG])")


class DockerArchiveSource(Source):
    """One image of a ``docker save`` archive."""

    def __init__(self, path: str, reference: str | None):
        self.path = path
        self.reference = reference
        self.label = PREFIX + path + (f":{reference}" if reference else "")
        self._file = self._open_file(path)
        try:
            members = self._list_members()
        except BaseException:
            self._file.close()
            raise
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            self._members[posixpath.normpath(member.name)] = member
        self._blobs: dict[str, tarfile.TarInfo] = {}
        self._manifest: bytes | None = None
        self.names = [reference] if reference else []

    def _open_file(self, path: str) -> BinaryIO:
        """Open the archive, which must be a regular file. O_NONBLOCK keeps a FIFO from blocking the open."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"{self.label}: the archive file is missing") from None
        except OSError as exc:
            raise SourceError(f"{self.label}: opening the archive failed: {exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SourceError(f"{self.label}: not a regular file; give the archive file docker save wrote")
        return os.fdopen(fd, "rb")

    def _list_members(self) -> list[tarfile.TarInfo]:
        """Read every member header, checked as the layer reader checks a layer's headers."""
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:", tarinfo=CheckedTarInfo)
        except tarfile.TarError as exc:
            raise ImageError(f"{self.label}: not an uncompressed tar archive ({exc}); give the file "
                             "docker save wrote, decompressed") from None
        except OSError as exc:
            raise SourceError(f"{self.label}: reading the archive failed: {exc}") from None
        try:
            return self._tar.getmembers()
        except tarfile.TarError as exc:
            raise ImageError(f"{self.label}: the archive is truncated or damaged ({exc}); write it "
                             "again with docker save") from None
        except OSError as exc:
            raise SourceError(f"{self.label}: reading the archive failed: {exc}") from None

    def resolve(self) -> RootDocument:
        entries = self._read_archive_manifest()
        for entry in entries:
            self._check_repo_tags(entry.get("RepoTags"))
        entry = self._select_image(entries)
        if self.reference is None:
            self.names = list(entry.get("RepoTags") or [])
        config_member = self._member(self._string(entry.get("Config"), "Config"), "the config")
        config_data = self._read_member(config_member, MAX_CONFIG_BYTES, "the image config")
        config_digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
        named_digest = _digest_from_blob_name(config_member.name)
        if named_digest is not None and named_digest != config_digest:
            raise ImageError(f"{self.label}: the image config {config_member.name} has digest {config_digest}, "
                             f"not {named_digest}")
        self._blobs[config_digest] = config_member
        config = parse_config(config_data, f"{self.label}: image config {config_member.name}")

        layer_names = entry.get("Layers")
        if not isinstance(layer_names, list):
            raise ImageError(f"{self.label}: manifest.json: Layers must be a list")
        if len(layer_names) != len(config.diff_ids):
            raise ImageError(f"{self.label}: manifest.json lists {len(layer_names)} layers, but the image "
                             f"config has {len(config.diff_ids)} rootfs.diff_ids")
        layers = [self._layer_descriptor(self._string(name, f"Layers[{i}]"), diff_id)
                  for i, (name, diff_id) in enumerate(zip(layer_names, config.diff_ids))]
        manifest = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": config_digest, "size": len(config_data)},
            "layers": layers,
        }
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        self._manifest = data
        return RootDocument(mediatypes.OCI_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), data)

    def read_manifest(self, descriptor: Descriptor) -> bytes:
        raise ImageError(f"{self.label}: a docker archive contains no manifest {descriptor.digest}")

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        member = self._blobs.get(descriptor.digest)
        if member is None:
            raise SourceError(f"{self.label}: blob {descriptor.digest} is not in the archive")
        return self._open_member(member)

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def _check_repo_tags(self, tags: object) -> None:
        # null means the image has no tags.
        if tags is not None and not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
            raise ImageError(f"{self.label}: manifest.json: RepoTags must be a list of strings or null, "
                             f"not {tags!r}")

    def _read_archive_manifest(self) -> list[dict[str, Any]]:
        member = self._members.get(MANIFEST_MEMBER)
        if member is None:
            raise ImageError(f"{self.label}: manifest.json is missing; is this a docker save archive?")
        document = load_json(self._read_member(member, MAX_MANIFEST_BYTES, "manifest.json"),
                             f"{self.label}: manifest.json")
        if not isinstance(document, list) or not all(isinstance(entry, dict) for entry in document):
            raise ImageError(f"{self.label}: manifest.json must be a list of objects")
        if not document:
            raise ImageError(f"{self.label}: manifest.json lists no images")
        return document

    def _select_image(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        tags_of = [entry.get("RepoTags") or [] for entry in entries]
        listed = ", ".join(sorted({tag for tags in tags_of for tag in tags if isinstance(tag, str)})) or "none"
        if self.reference is None:
            if len(entries) == 1:
                return entries[0]
            raise UsageError(f"{self.label} contains {len(entries)} images; choose one with "
                             f"docker-archive:PATH:REPO:TAG (tags: {listed})")
        matches = [entry for entry, tags in zip(entries, tags_of) if self.reference in tags]
        if not matches:
            raise SourceError(f"{self.label}: tag {self.reference!r} not found in manifest.json (tags: {listed})")
        if len(matches) > 1:
            raise ImageError(f"{self.label}: tag {self.reference!r} names {len(matches)} images in manifest.json")
        return matches[0]

    def _layer_descriptor(self, name: str, diff_id: str) -> dict[str, Any]:
        member = self._member(name, f"layer {name}")
        with self._open_member(member) as stream:
            magic = stream.read(len(_ZSTD_MAGIC))
        if magic.startswith(_GZIP_MAGIC):
            compression = mediatypes.GZIP
        elif magic == _ZSTD_MAGIC:
            compression = mediatypes.ZSTD
        else:
            compression = mediatypes.UNCOMPRESSED
        digest = _digest_from_blob_name(name)
        if digest is None:
            digest = diff_id if compression == mediatypes.UNCOMPRESSED else self._hash_member(member)
        # Two layers with the same content share a digest; either member serves both.
        self._blobs.setdefault(digest, member)
        return {"mediaType": _LAYER_TYPES[compression], "digest": digest, "size": member.size}

    def _string(self, value: object, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise ImageError(f"{self.label}: manifest.json: {field} must be a non-empty string, not {value!r}")
        return value

    def _member(self, name: str, role: str) -> tarfile.TarInfo:
        """Return the regular file ``name`` names, following symbolic links inside the archive.

        An archive that keeps the legacy ``<id>/layer.tar`` names next to
        ``blobs/`` may make them links.
        """
        path = name
        for _hop in range(MAX_LINK_HOPS + 1):
            member = None
            if not path.startswith("/") and ".." not in path.split("/"):
                member = self._members.get(posixpath.normpath(path))
            if member is None:
                raise ImageError(f"{self.label}: {role}: member {path!r} is missing from the archive")
            if member.isfile():
                return member
            if not member.issym():
                raise ImageError(f"{self.label}: {role}: member {path!r} is not a regular file")
            path = posixpath.normpath(posixpath.join(posixpath.dirname(posixpath.normpath(path)),
                                                     member.linkname))
        raise ImageError(f"{self.label}: {role}: more than {MAX_LINK_HOPS} links from member {name!r}")

    def _open_member(self, member: tarfile.TarInfo) -> BinaryIO:
        if not member.isfile():
            raise ImageError(f"{self.label}: member {member.name!r} is not a regular file")
        if member.sparse is not None:
            raise ImageError(f"{self.label}: member {member.name!r} is a sparse file, which a "
                             "docker-archive source does not read")
        return _MemberStream(self._file.fileno(), member.offset_data, member.size, self.label, member.name)

    def _read_member(self, member: tarfile.TarInfo, limit: int, role: str) -> bytes:
        if member.size > limit:
            raise ImageError(f"{self.label}: {role} ({member.name}) is {member.size} bytes, more than the "
                             f"{limit} allowed")
        with self._open_member(member) as stream:
            return stream.read()

    def _hash_member(self, member: tarfile.TarInfo) -> str:
        hasher = hashlib.sha256()
        with self._open_member(member) as stream:
            while piece := stream.read(_HASH_READ_BYTES):
                hasher.update(piece)
        return "sha256:" + hasher.hexdigest()


class _MemberStream(ReadStream):
    """The bytes of one archive member, read with ``pread`` from the archive's descriptor.

    ``tarfile``'s own member streams seek the archive's one file object
    before each read, so two threads reading two members interleave their
    seeks and read each other's bytes.
    """

    def __init__(self, fd: int, start: int, size: int, label: str, name: str):
        super().__init__()
        self._fd = fd
        self._position = start
        self._end = start + size
        self._label = label
        self._name = name

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            # One pread may return less than asked, so read all in a loop.
            return self.readall()
        left = self._end - self._position
        size = min(size, left)
        if size == 0:
            return b""
        try:
            data = os.pread(self._fd, size, self._position)
        except OSError as exc:
            raise SourceError(f"{self._label}: reading member {self._name!r} failed: {exc}") from None
        if not data:
            raise ImageError(f"{self._label}: the archive ends inside member {self._name!r}; was it "
                             "truncated while it was read?")
        self._position += len(data)
        return data


def _digest_from_blob_name(name: str) -> str | None:
    """Return "sha256:<hex>" for a member named blobs/sha256/<hex>, None for other names."""
    parts = posixpath.normpath(name).split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256" and len(parts[2]) == 64 \
            and all(c in "0123456789abcdef" for c in parts[2]):
        return "sha256:" + parts[2]
    return None
