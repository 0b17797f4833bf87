"""Layer records: what indexing one layer produced, kept in the store by diff_id.

Indexing a layer reads its tar stream once and yields a ``LayerRecord``: the
tar headers in stream order (without file data) and, for each regular file
entry by its position in that order, the chunk extents of its bytes. The flattener applies records, not
tar streams, so a layer can be read and chunked on any thread while the tree
is still built bottom layer first. A stored record lets a later run skip the
layer blob entirely. Applying a record gives the same tree as applying the tar
stream it came from, because whiteouts and opaque markers are tar entries of
the record like any other.

Store layout: ``layers/<diff_id hex>/<chunking tag>`` contains one record as a
zstd-compressed JSON object::

    {"version": 1, "diff_id": "sha256:...", "chunking": {ChunkingParams fields},
     "bytes": uncompressed tar bytes, "chunks": [[address hex, size], ...],
     "entries": [[name, type, mode, uid, gid, mtime, linkname, devmajor,
                  devminor, size, {pax key: value}], ...],
     "extents": [[entry position, [[chunk number, offset, length], ...]], ...]}

``chunking tag`` is the first 16 hex digits of the SHA-256 of the record
version and the chunking parameters, so a change of chunk sizes never reuses
records cut with the old ones. Names and PAX values are ``str`` as tarfile
decodes them (UTF-8 with surrogateescape); JSON keeps lone surrogates as
``\\udcXX`` escapes, so any byte string survives. Only the PAX keys that the
flattener reads (``mtime`` and ``SCHILY.xattr.*``) are kept.

A record is written only after every chunk it references is in the store, so
a reader that finds a record finds its chunks. NOTE: nothing deletes chunks
today; a future chunk garbage collector must delete the records that
reference a chunk together with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import zstandard

from ..errors import BucketNotFound, LazyfsError, ObjectNotFound, StoreError
from ..index import Node
from ..store import Store
from .chunker import ChunkingParams
from .errors import ImageError

log = logging.getLogger(__name__)

RECORD_VERSION = 1
PAX_KEYS_KEPT = ("mtime",)
XATTR_PREFIX = "SCHILY.xattr."

# A record is a few hundred bytes per tar entry; this bounds what a corrupt or
# hostile store object can make the loader allocate.
MAX_RECORD_BYTES = 1 << 30


Extent = tuple[bytes, int, int]


@dataclass
class LayerRecord:
    """The tar headers of one layer and the chunk extents of its regular files."""

    diff_id: str
    members: list[tarfile.TarInfo] = field(default_factory=list)
    # Extents of each regular file entry, by its position in ``members``.
    extents: dict[int, list[Extent]] = field(default_factory=dict)
    chunk_sizes: dict[bytes, int] = field(default_factory=dict)
    content_bytes: int = 0
    # ``members`` in their stored form, filled while the layer is read so that
    # encoding the record at its end is quick.
    member_rows: list[list] = field(default_factory=list)


def chunking_tag(params: ChunkingParams) -> str:
    """Return the 16 hex digits that tie a record to its record version and chunk sizes."""
    text = json.dumps({"version": RECORD_VERSION, "chunking": asdict(params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_key(diff_id: str, params: ChunkingParams) -> str:
    """Return the store key of the record of the layer with ``diff_id``."""
    algorithm, _, encoded = diff_id.partition(":")
    if algorithm != "sha256" or not encoded:
        raise ValueError(f"invalid diff_id {diff_id!r}: expected sha256:<hex>")
    return f"layers/{encoded}/{chunking_tag(params)}"


def encode_record(record: LayerRecord, params: ChunkingParams) -> bytes:
    """Return the stored form of ``record``: zstd-compressed JSON."""
    numbers: dict[bytes, int] = {}
    chunks = []
    for address, size in record.chunk_sizes.items():
        numbers[address] = len(chunks)
        chunks.append([address.hex(), size])
    document = {
        "version": RECORD_VERSION,
        "diff_id": record.diff_id,
        "chunking": asdict(params),
        "bytes": record.content_bytes,
        "chunks": chunks,
        "entries": (record.member_rows if len(record.member_rows) == len(record.members)
                    else [encode_member(member) for member in record.members]),
        "extents": [[position, [[numbers[address], offset, length]
                                for address, offset, length in extents]]
                    for position, extents in record.extents.items()],
    }
    text = json.dumps(document, separators=(",", ":"))
    return zstandard.ZstdCompressor(level=3).compress(text.encode("ascii"))


def decode_record(data: bytes, diff_id: str, params: ChunkingParams) -> LayerRecord:
    """Parse a stored record; raise ImageError when it is malformed or for another layer."""
    try:
        text = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_RECORD_BYTES)
        document = json.loads(text)
        if document["version"] != RECORD_VERSION or document["diff_id"] != diff_id:
            raise ValueError("version or diff_id does not match")
        if document["chunking"] != asdict(params):
            raise ValueError("chunking parameters do not match")
        addresses = [bytes.fromhex(address) for address, _size in document["chunks"]]
        record = LayerRecord(diff_id=diff_id, content_bytes=int(document["bytes"]))
        record.chunk_sizes = {address: int(size)
                              for address, (_hex, size) in zip(addresses, document["chunks"])}
        record.members = [_decode_member(entry) for entry in document["entries"]]
        record.extents = {int(position): [(addresses[number], int(offset), int(length))
                                          for number, offset, length in extents]
                          for position, extents in document["extents"]}
    except (zstandard.ZstdError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ImageError(f"layer record for {diff_id} is invalid: {exc}") from None
    regular_files = {position for position, member in enumerate(record.members) if member.isreg()}
    if regular_files != set(record.extents):
        raise ImageError(f"layer record for {diff_id} is invalid: its extent lists do not match "
                         "its regular file entries")
    return record


def load_record(store: Store, diff_id: str, params: ChunkingParams) -> LayerRecord | None:
    """Return the stored record of a layer, or None when there is none or it is unusable.

    An unusable or unreadable record is logged and ignored, so the layer is
    read again and its record rewritten: a record only saves time.
    """
    key = record_key(diff_id, params)
    try:
        data = store.get(key)
    except ObjectNotFound:
        return None
    except BucketNotFound:
        # No later store request can succeed either.
        raise
    except StoreError as exc:
        log.warning("reading the layer instead of its record %s: %s", key, exc)
        return None
    try:
        return decode_record(data, diff_id, params)
    except ImageError as exc:
        log.warning("ignoring %s and reading the layer again: %s", key, exc)
        return None


def save_record(store: Store, diff_id: str, params: ChunkingParams, encoded: bytes) -> None:
    """Write a record that ``encode_record`` returned; call only after its chunks are stored."""
    store.put(record_key(diff_id, params), encoded)


class RecordedExtents:
    """Stands in for the chunker while the flattener applies records.

    Feed the flattener through ``members``: ``add_file`` then notes which
    entry each regular file node came from, and ``finish`` sets the nodes'
    extents from the layer's complete record. Extents of packed small files
    are known only when their pack closes, which can be after the flattener
    has applied the entry.
    """

    def __init__(self) -> None:
        self._position = -1
        self._files: list[tuple[int, Node]] = []

    def members(self, members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
        self._files = []
        for self._position, member in enumerate(members):
            yield member

    def add_file(self, node: Node, _stream: object, _label: str) -> None:
        self._files.append((self._position, node))

    def finish(self, record: LayerRecord) -> None:
        """Set the extents of every regular file node of the layer just applied."""
        for position, node in self._files:
            extents = record.extents.get(position)
            if extents is None:
                raise LazyfsError(f"the layer record of {record.diff_id} has no extents for entry "
                                  f"{position}")
            node.extents = list(extents)
        self._files = []


def encode_member(member: tarfile.TarInfo) -> list:
    """Return the stored form of one tar header.

    NOTE: these are the header fields that ``flatten.Flattener`` reads. When it
    reads another one, store it here too and raise RECORD_VERSION, or records
    written before would give a different tree.
    """
    pax = {key: value for key, value in member.pax_headers.items()
           if key in PAX_KEYS_KEPT or key.startswith(XATTR_PREFIX)}
    return [member.name, member.type.decode("latin-1"), member.mode, member.uid, member.gid,
            member.mtime, member.linkname, member.devmajor, member.devminor, member.size, pax]


def _decode_member(entry: list) -> tarfile.TarInfo:
    name, entry_type, mode, uid, gid, mtime, linkname, devmajor, devminor, size, pax = entry
    member = tarfile.TarInfo(name)
    member.type = entry_type.encode("latin-1")
    member.mode = int(mode)
    member.uid = int(uid)
    member.gid = int(gid)
    member.mtime = mtime
    member.linkname = linkname
    member.devmajor = int(devmajor)
    member.devminor = int(devminor)
    member.size = int(size)
    member.pax_headers = dict(pax)
    return member
