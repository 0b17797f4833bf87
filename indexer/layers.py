"""Layer streams: verify, decompress and hash one layer blob as it is read.

The reader stack of a layer, bottom up::

    raw blob (file or HTTP body)
    -> VerifyingReader    size and digest of the blob, from the manifest
    -> decompressor       by media type: gzip (ISA-L igzip), zstd, or none
    -> VerifyingReader    digest of the uncompressed tar, the config's diff_id
    -> tarfile            in stream mode

Each level reads fixed-size pieces, so memory stays bounded however large
the layer is. The media type decides the decompressor, and the first bytes of
the blob must carry its magic number. A mismatch is an error, not a guess.
"""

from __future__ import annotations

from typing import BinaryIO

import isal.igzip
import isal.isal_zlib
import zstandard

from . import mediatypes
from .errors import ImageError
from .manifest import Descriptor
from .verify import VerifyingReader
from .streams import READ_SIZE, ReadStream

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Errors of the decoders on bad input: gzip raises BadGzipFile (an OSError)
# or EOFError, ISA-L's inflate IsalError, zstandard ZstdError.
DECODE_ERRORS = (OSError, EOFError, isal.isal_zlib.error, zstandard.ZstdError)


class _PrefixedReader(ReadStream):
    """Bytes already read (the magic number) followed by the rest of a stream."""

    def __init__(self, prefix: bytes, rest: BinaryIO):
        super().__init__()
        self._prefix = prefix
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size is None or size < 0:
                data, self._prefix = self._prefix + self._rest.read(), b""
                return data
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._rest.read(size)


class ByteBudget:
    """A limit on the uncompressed bytes of all layers of one image, against decompression bombs."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.used = 0

    def consume(self, count: int, label: str) -> None:
        self.used += count
        if self.limit is not None and self.used > self.limit:
            raise ImageError(f"{label}: uncompressed layers exceed the limit of {self.limit} bytes "
                             "per image (--max-image-bytes)")


class _DecodeErrorReader(ReadStream):
    """Turns decoder errors into an ImageError naming the layer, and counts bytes against a budget."""

    def __init__(self, decoder: BinaryIO, compression: str, label: str, budget: ByteBudget):
        super().__init__()
        self._decoder = decoder
        self._compression = compression
        self._label = label
        self._budget = budget

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._decoder.read(size)
        except DECODE_ERRORS as exc:
            raise ImageError(f"{self._label}: invalid {self._compression} data: {exc}") from None
        self._budget.consume(len(data), self._label)
        return data


class LayerStream:
    """The uncompressed tar stream of one layer, with both checks attached.

    ``content`` is what tarfile reads. ``finish`` must run after tarfile
    stops: it reads the rest of both levels to EOF, so the diff_id and the
    blob digest cover every byte, trailing padding included.
    """

    def __init__(self, raw: BinaryIO, descriptor: Descriptor, diff_id: str, label: str,
                 budget: ByteBudget | None = None):
        self.label = label
        self.compression = mediatypes.LAYERS[descriptor.media_type]
        self.blob = VerifyingReader(raw, descriptor.digest, descriptor.size, label)
        magic = _read_exactly(self.blob, 4)
        _check_magic(magic, self.compression, label)
        compressed = _PrefixedReader(magic, self.blob)
        if self.compression == mediatypes.GZIP:
            decoder = isal.igzip.IGzipFile(fileobj=compressed, mode="rb")
        elif self.compression == mediatypes.ZSTD:
            # Bounded output per read; a truncated frame yields a short stream
            # here, which the diff_id check below reports.
            decoder = zstandard.ZstdDecompressor().stream_reader(
                compressed, read_size=READ_SIZE, read_across_frames=True, closefd=False)
        else:
            decoder = compressed
        decoded = _DecodeErrorReader(decoder, self.compression, label, budget or ByteBudget(None))
        self.content = VerifyingReader(
            decoded, diff_id, None, f"{label}: uncompressed content (diff_id {diff_id})")

    def finish(self) -> None:
        """Read both levels to EOF and check the diff_id and the blob digest."""
        self.content.finish()
        self.blob.finish()

    def blob_error(self) -> Exception | None:
        """Return the blob's size or digest error, if any, reading it to EOF.

        Called after a decoding error, so that a corrupt or truncated blob is
        reported as such instead of as whatever the decoder stumbled on.
        """
        try:
            self.blob.finish()
        except Exception as exc:  # the caller decides which error to raise
            return exc
        return None


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            break
        data += piece
    return data


def _check_magic(magic: bytes, compression: str, label: str) -> None:
    if not magic:
        raise ImageError(f"{label}: the layer blob is empty")
    if compression == mediatypes.GZIP and not magic.startswith(GZIP_MAGIC):
        raise ImageError(f"{label}: the media type declares gzip, but the blob does not start with the gzip magic number")
    if compression == mediatypes.ZSTD and magic != ZSTD_MAGIC:
        raise ImageError(f"{label}: the media type declares zstd, but the blob does not start with the zstd magic number")
    if compression == mediatypes.UNCOMPRESSED and (magic.startswith(GZIP_MAGIC) or magic == ZSTD_MAGIC):
        kind = "gzip" if magic.startswith(GZIP_MAGIC) else "zstd"
        raise ImageError(f"{label}: the media type declares an uncompressed tar, but the blob is {kind}-compressed")
