"""Write real OCI image layouts from Python, for indexer tests.

Layers are built with ``tarfile`` from lists of ``Entry`` values (or given as
raw tar bytes), compressed with gzip, zstd or not at all, and stored as blobs
named by their SHA-256. ``write_image`` adds the config (with rootfs.diff_ids),
the manifest and an index.json entry with an
``org.opencontainers.image.ref.name`` annotation, so skopeo, umoci and
``lazyfs-index`` all read the result.

``gnu_tar`` runs GNU tar for what tarfile cannot write (sparse files), and
helpers write unusual but valid streams: several gzip members, gzip header
fields, a tar without its end-of-archive marker, empty device fields.

Bad input on purpose: ``Layer.blob`` replaces a layer's compressed bytes
before they are named (a truncated gzip stream whose digest matches), and
``replace_blob`` overwrites a blob after it is named (bytes that no longer
match their digest). ``TreeView`` reads an indexed image back from a store.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import random
import shutil
import stat
import struct
import subprocess
import tarfile
import zlib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from lazyfs.chunk import decode
from lazyfs.index import Index
from lazyfs.refs import chunk_key, index_key, resolve
from lazyfs.store import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"

_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


@dataclass
class Entry:
    """One tar entry. Names and targets may be bytes that are not UTF-8.

    ``mtime`` is whole seconds, or a decimal string such as
    "1700000000.123456789" that goes into a PAX record.
    """

    name: str | bytes
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int | str = 0
    target: str | bytes = ""
    major: int = 0
    minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def file(name: str | bytes, data: bytes = b"", mode: int = 0o644, **fields) -> Entry:
    return Entry(name, "file", data=data, mode=mode, **fields)


def directory(name: str | bytes, mode: int = 0o755, **fields) -> Entry:
    return Entry(name, "dir", mode=mode, **fields)


def symlink(name: str | bytes, target: str | bytes, **fields) -> Entry:
    return Entry(name, "symlink", target=target, **fields)


def hardlink(name: str | bytes, target: str | bytes, **fields) -> Entry:
    return Entry(name, "hardlink", target=target, **fields)


def device(name: str | bytes, kind: str, major: int, minor: int, mode: int = 0o600, **fields) -> Entry:
    return Entry(name, kind, major=major, minor=minor, mode=mode, **fields)


def fifo(name: str | bytes, mode: int = 0o644, **fields) -> Entry:
    return Entry(name, "fifo", mode=mode, **fields)


def whiteout(path: str) -> Entry:
    """The whiteout entry that removes ``path`` ("dir/name" -> "dir/.wh.name")."""
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory_path: str) -> Entry:
    """The opaque marker that hides the lower layers' content of a directory."""
    parent = directory_path.rstrip("/")
    return file(f"{parent}/.wh..wh..opq" if parent else ".wh..wh..opq")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def tar_bytes(entries: list[Entry], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """Return a tar archive of ``entries``, in order, exactly as given.

    ``tar_format`` is a tarfile format: PAX (the default) or GNU, which writes
    long names as ././@LongLink entries and large ids in base-256. GNU format
    has no PAX records, so its entries must not set a string mtime or xattrs.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for entry in entries:
            info = tarfile.TarInfo(_text(entry.name))
            info.type = _TAR_TYPES[entry.kind]
            info.mode = entry.mode if entry.mode is not None else _DEFAULT_MODES.get(entry.kind, 0o644)
            info.uid, info.gid = entry.uid, entry.gid
            info.uname = info.gname = ""
            pax = {}
            if isinstance(entry.mtime, str):
                info.mtime = int(entry.mtime.split(".")[0])
                pax["mtime"] = entry.mtime
            else:
                info.mtime = entry.mtime
            for name, value in entry.xattrs.items():
                pax["SCHILY.xattr." + _text(name)] = _text(value)
            info.pax_headers = pax
            if entry.kind in ("symlink", "hardlink"):
                info.linkname = _text(entry.target)
            if entry.kind in ("char", "block"):
                info.devmajor, info.devminor = entry.major, entry.minor
            if entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def gnu_tar(directory: Path, names: list[str], *options: str) -> bytes:
    """Return the tar archive GNU tar writes of ``names`` below ``directory``.

    Owners are written as numeric 0:0 and every mtime as 1700000000; ``options``
    choose the format, for example ``--format=gnu --sparse``.
    """
    command = ["tar", "--create", "--file=-", f"--directory={directory}", "--numeric-owner",
               "--owner=0", "--group=0", "--mtime=@1700000000", *options, "--", *names]
    return subprocess.run(command, check=True, stdout=subprocess.PIPE).stdout


def tar_end(tar: bytes) -> int:
    """Return the offset just after the data of the last entry of ``tar``."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        last = archive.getmembers()[-1]
    # A sparse member's size is its expanded size, so count its stored blocks instead.
    stored = sum(length for _offset, length in last.sparse) if last.sparse else last.size
    return last.offset_data + -(-stored // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def without_end_marker(tar: bytes) -> bytes:
    """Return ``tar`` cut after its last entry: no zero blocks, no end-of-archive marker."""
    return tar[:tar_end(tar)]


def with_empty_device_fields(tar: bytes, name: str) -> bytes:
    """Return ``tar`` with the devmajor and devminor fields of entry ``name`` all NUL bytes.

    A writer that leaves both fields empty for a fifo writes them so. The entry
    must have a plain ustar header (no PAX or GNU long-name header before it).
    """
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        offset = archive.getmember(name).offset
    header = bytearray(tar[offset:offset + tarfile.BLOCKSIZE])
    header[329:345] = bytes(16)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return tar[:offset] + bytes(header) + tar[offset + tarfile.BLOCKSIZE:]


def gzip_members(data: bytes, pieces: int) -> bytes:
    """Return ``data`` as ``pieces`` concatenated gzip members, as bgzip and ``cat a.gz b.gz`` write."""
    step = -(-len(data) // pieces)
    return b"".join(gzip.compress(data[start:start + step], mtime=0)
                    for start in range(0, len(data), step))


def gzip_with_header_fields(data: bytes, header_crc: bool = False) -> bytes:
    """Return one gzip member of ``data`` whose header has FEXTRA, FNAME and FCOMMENT.

    ``header_crc`` adds FHCRC, the CRC-16 of every header byte before it (RFC 1952).
    """
    extra = b"LZ" + struct.pack("<H", 4) + b"test"
    flags = 0x04 | 0x08 | 0x10 | (0x02 if header_crc else 0)
    header = (b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", 0)
              + b"\x00\x03" + struct.pack("<H", len(extra)) + extra + b"layer.tar\x00"
              + b"a comment\x00")
    if header_crc:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(data) + compressor.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    """One layer: ``entries`` or raw ``tar`` bytes, compressed as ``compression``.

    ``blob`` replaces the compressed bytes (they are still named by their own
    digest); ``media_type`` and ``diff_id`` replace what the manifest and the
    config declare.
    """

    entries: list[Entry] | None = None
    tar: bytes | None = None
    compression: str = "gzip"
    blob: bytes | None = None
    media_type: str | None = None
    diff_id: str | None = None
    tar_file: Path | None = None
    """An uncompressed tar on disk, moved into the layout; for layers too large for memory."""

    def tar_data(self) -> bytes:
        return self.tar if self.tar is not None else tar_bytes(self.entries or [])


@dataclass
class Image:
    """An image written into a layout; the digests name its blobs."""

    layout: Path
    tag: str | None
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]

    @property
    def source(self) -> str:
        return f"oci:{self.layout}:{self.tag}" if self.tag else f"oci:{self.layout}@{self.manifest_digest}"

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.layout, digest)


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, encoded = digest.partition(":")
    return layout / "blobs" / algorithm / encoded


def write_blob(layout: Path, data: bytes) -> str:
    """Store ``data`` as a blob of the layout and return its digest."""
    digest = digest_of(data)
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _move_file_blob(layout: Path, path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as stream:
        while piece := stream.read(1 << 20):
            hasher.update(piece)
            size += len(piece)
    digest = "sha256:" + hasher.hexdigest()
    target = blob_path(layout, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    return digest, size


class RandomStream(io.RawIOBase):
    """``size`` pseudo-random bytes from ``seed``, produced as they are read."""

    def __init__(self, size: int, seed: int):
        super().__init__()
        self._remaining = size
        self._random = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._remaining, 1 << 20)
        buffer[:count] = self._random.randbytes(count)
        self._remaining -= count
        return count


def write_large_file_tar(path: Path, name: str, size: int, seed: int = 0) -> None:
    """Write an uncompressed tar holding one file of ``size`` random bytes, streaming."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BufferedReader(RandomStream(size, seed), 1 << 20))


def replace_blob(layout: Path, digest: str, data: bytes) -> None:
    """Overwrite the blob named ``digest`` with other bytes, which then do not match it."""
    blob_path(layout, digest).write_bytes(data)


def init_layout(layout: Path) -> None:
    """Create an empty OCI image layout at ``layout`` unless one exists."""
    layout.mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)


def add_to_index(layout: Path, descriptor: dict, tag: str | None) -> None:
    """Append ``descriptor`` to index.json, annotated with ``tag`` as its ref name."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = dict(descriptor)
    if tag is not None:
        descriptor["annotations"] = {REF_NAME: tag}
    index["manifests"].append(descriptor)
    (layout / "index.json").write_text(json.dumps(index))


def write_image(layout: Path, layers: list[Layer], tag: str | None = "latest",
                config: dict | None = None, platform: tuple[str, str] = ("linux", "amd64"),
                docker: bool = False) -> Image:
    """Write an image into the layout at ``layout`` and tag it in index.json.

    ``config`` is the image config's "config" object (Cmd, Env, ...).
    ``docker`` uses Docker schema 2 media types instead of OCI ones. A ``tag``
    of None writes the blobs without an index.json entry.
    """
    init_layout(layout)
    layer_descriptors = []
    diff_ids = []
    for layer in layers:
        media_type = layer.media_type or (
            DOCKER_GZIP_LAYER if docker and layer.compression == "gzip"
            else LAYER_MEDIA_TYPES[layer.compression])
        if layer.tar_file is not None:
            if layer.compression != "none":
                raise ValueError("a layer from tar_file must be uncompressed")
            digest, size = _move_file_blob(layout, layer.tar_file)
            layer_descriptors.append({"mediaType": media_type, "digest": digest, "size": size})
            diff_ids.append(layer.diff_id or digest)
            continue
        tar = layer.tar_data()
        blob = layer.blob if layer.blob is not None else compress(tar, layer.compression)
        layer_descriptors.append({"mediaType": media_type, "digest": write_blob(layout, blob),
                                  "size": len(blob)})
        diff_ids.append(layer.diff_id or digest_of(tar))

    config_document = {
        "architecture": platform[1],
        "os": platform[0],
        "config": config if config is not None else {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "tests.support.oci"} for _ in layers],
    }
    config_bytes = json.dumps(config_document, sort_keys=True).encode()
    config_descriptor = {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                         "digest": write_blob(layout, config_bytes), "size": len(config_bytes)}
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {"schemaVersion": 2, "mediaType": manifest_type, "config": config_descriptor,
                "layers": layer_descriptors}
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = write_blob(layout, manifest_bytes)
    if tag is not None:
        add_to_index(layout, {"mediaType": manifest_type, "digest": manifest_digest,
                              "size": len(manifest_bytes)}, tag)
    return Image(layout, tag, manifest_digest, len(manifest_bytes), config_descriptor["digest"],
                 [d["digest"] for d in layer_descriptors], diff_ids)


def write_image_index(layout: Path, images: list[tuple[Image, dict]], tag: str) -> str:
    """Write an OCI image index over ``images`` (each with its platform object); return its digest."""
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
                       "size": image.manifest_size, "platform": platform}
                      for image, platform in images],
    }
    data = json.dumps(index, sort_keys=True).encode()
    digest = write_blob(layout, data)
    add_to_index(layout, {"mediaType": OCI_INDEX, "digest": digest, "size": len(data)}, tag)
    return digest


class TreeView:
    """An indexed image read back from a store, by path (bytes, no leading slash)."""

    def __init__(self, store: Store, reference: str):
        self.store = store
        self.digest = resolve(store, reference)
        self.index = Index(store.get(index_key(self.digest)), self.digest)
        self.inodes = {path: number for path, number in self.index.walk()}

    def paths(self) -> set[bytes]:
        """Every path except the root."""
        return {path for path in self.inodes if path}

    def inode(self, path: bytes):
        return self.index.inode(self.inodes[path])

    def listdir(self, path: bytes = b"") -> list[bytes]:
        return [name for _position, name, _inode in self.index.entries(self.inodes[path])]

    def file_type(self, path: bytes) -> int:
        return stat.S_IFMT(self.inode(path).mode)

    def read(self, path: bytes) -> bytes:
        """Return a regular file's bytes, decoded and verified from its chunks."""
        pieces = []
        for extent in self.index.extents(self.inodes[path]):
            address, _length = self.index.chunk(extent.chunk)
            chunk = self._chunk(address)
            pieces.append(chunk[extent.chunk_offset:extent.chunk_offset + extent.length])
        return b"".join(pieces)

    @functools.lru_cache(maxsize=32)
    def _chunk(self, address: bytes) -> bytes:
        return decode(self.store.get(chunk_key(address)), address)

    def extents(self, path: bytes):
        return self.index.extents(self.inodes[path])

    def readlink(self, path: bytes) -> bytes:
        return self.index.readlink(self.inodes[path])

    def xattrs(self, path: bytes) -> dict[bytes, bytes]:
        return self.index.xattrs(self.inodes[path])


@dataclass
class IndexerRun:
    """Exit code and output of one in-process ``lazyfs-index`` run."""

    code: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        """The ``--json`` output, parsed."""
        return json.loads(self.stdout)


def run_indexer(*args: str) -> IndexerRun:
    """Run ``lazyfs-index ARGS`` in this process and capture its exit code and output."""
    from lazyfs.indexer.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(list(args))
    return IndexerRun(code, stdout.getvalue(), stderr.getvalue())
