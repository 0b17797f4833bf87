"""Read one layer blob into a ``LayerRecord``: verify, decompress, parse the tar, chunk.

Layers are independent until the flattener applies them, so ``read_layer``
may run for several layers at once on worker threads. Each call has its own
``Chunker``, so small-file packs close at the end of every layer, and a
layer's chunks and record do not depend on the layers around it. The
uncompressed byte limit and the declared file byte limit are shared by all
layers of an image (``SharedLimits``).

Within a layer, the reader stack of ``layers.LayerStream`` runs on a
``Readahead`` thread while this thread parses tar headers and chunks file
data. The flattener validates entry names and types later, when it applies
the record.
"""

from __future__ import annotations

import logging
import stat
import tarfile
import threading
from typing import BinaryIO, Callable

from ..errors import IntegrityError
from ..index import Node
from .chunker import Chunker, ChunkingParams, Emit
from .errors import ImageError
from .layercache import LayerRecord, encode_member
from .layers import ByteBudget, LayerStream
from .manifest import Descriptor
from .readahead import Readahead
from .source import Source
from .streams import ReadStream
from .tarheaders import CheckedTarInfo

log = logging.getLogger(__name__)

# tarfile's stream reader copies the rest of its buffer on every read, so a
# larger buffer makes each 512-byte header read slower.
TAR_BUFFER_BYTES = 64 << 10
# Tar headers handed to the flattener at once.
MEMBER_BATCH = 512


class LayerReadCancelled(Exception):
    """Another layer failed, so this one stopped early."""


class SharedLimits(ByteBudget):
    """The per-image limits on uncompressed layer bytes and declared file bytes, for all threads."""

    def __init__(self, limit: int | None):
        super().__init__(limit)
        self._lock = threading.Lock()
        self.file_bytes = 0

    def consume(self, count: int, label: str) -> None:
        with self._lock:
            super().consume(count, label)

    def add_file(self, size: int, label: str) -> None:
        with self._lock:
            # Declared sizes count too: a sparse entry can claim exabytes of holes.
            self.file_bytes += size
            if self.limit is not None and self.file_bytes > self.limit:
                raise ImageError(f"{label}: file data exceeds the limit of {self.limit} bytes "
                                 "per image (--max-image-bytes)")


class _CountingReader(ReadStream):
    """Passes reads through and reports the byte count of each to ``on_read``."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None]):
        super().__init__()
        self._raw = raw
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._on_read(len(data))
        return data


def read_layer(source: Source, descriptor: Descriptor, diff_id: str, label: str,
               limits: SharedLimits, params: ChunkingParams, emit: Emit,
               on_read: Callable[[int], None], cancelled: threading.Event,
               on_members: Callable[[list[tarfile.TarInfo]], None]) -> LayerRecord:
    """Read, check and chunk one layer blob; return its record.

    ``emit(address, data)`` receives each chunk, ``on_read`` the size of each
    read of the compressed blob, ``on_members`` the tar headers in batches of
    up to ``MEMBER_BATCH`` as they are parsed. Raises ImageError or IntegrityError for an
    invalid layer (a blob digest mismatch wins over the decoding or tar error
    it causes), SourceError when the source fails, and LayerReadCancelled
    soon after ``cancelled`` is set.
    """
    with source.open_blob(descriptor) as raw:
        layer = LayerStream(_CountingReader(raw, on_read), descriptor, diff_id, label, limits)
        reader = Readahead(layer.content, layer.finish, name=f"lazyfs-layer-{descriptor.digest[7:19]}")
        try:
            record = _read_entries(reader, source.label, descriptor.digest, diff_id, limits, params,
                                   emit, cancelled, on_members)
            reader.drain()
        except (ImageError, IntegrityError):
            reader.close()
            # A blob that does not match its digest explains any decoding, tar
            # or diff_id error it causes, so that is the error to report.
            blob_error = layer.blob_error()
            if blob_error is not None:
                raise blob_error from None
            raise
        finally:
            reader.close()
    record.content_bytes = layer.content.count
    log.info("%s: %d entries, %d bytes uncompressed, %d chunks", label, len(record.members),
             record.content_bytes, len(record.chunk_sizes))
    return record


def _read_entries(stream: BinaryIO, image: str, layer: str, diff_id: str, limits: SharedLimits,
                  params: ChunkingParams, emit: Emit, cancelled: threading.Event,
                  on_members: Callable[[list[tarfile.TarInfo]], None]) -> LayerRecord:
    record = LayerRecord(diff_id=diff_id)
    chunker = Chunker(emit, params)
    files: dict[int, Node] = {}
    handed_over = 0
    try:
        archive = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",
                               errors="surrogateescape", bufsize=TAR_BUFFER_BYTES,
                               tarinfo=CheckedTarInfo)
        while (member := archive.next()) is not None:
            # TarFile keeps every header it has read; in stream mode nothing
            # needs them again, and an image has millions in the worst case.
            archive.members.clear()
            if cancelled.is_set():
                raise LayerReadCancelled(layer)
            record.members.append(member)
            record.member_rows.append(encode_member(member))
            if len(record.members) - handed_over >= MEMBER_BATCH:
                on_members(record.members[handed_over:])
                handed_over = len(record.members)
            if member.isreg():
                name = member.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                file_label = f"{image} layer {layer}: entry {name!r}"
                limits.add_file(member.size, file_label)
                node = Node(mode=stat.S_IFREG, size=member.size)
                chunker.add_file(node, archive.extractfile(member), file_label)
                files[len(record.members) - 1] = node
    except tarfile.TarError as exc:
        raise ImageError(f"{image} layer {layer}: invalid tar stream: {exc}") from None
    on_members(record.members[handed_over:])
    chunker.finish()
    record.extents = {position: node.extents for position, node in files.items()}
    record.chunk_sizes = chunker.chunk_sizes
    return record
