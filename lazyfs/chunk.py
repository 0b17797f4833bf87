"""Chunk addresses and the stored chunk object format.

A chunk is named by the SHA-256 of its uncompressed bytes, so compression
settings never change its identity. The object stored under
``chunks/<sha256 hex>`` is one codec byte followed by the payload:

- ``0x00``: the payload is the chunk itself (compression did not shrink it);
- ``0x01``: the payload is one zstd frame that records its content size.

Every chunk that arrives from a store is decoded and verified here before any
tier caches it.
"""

import hashlib
import threading

import zstandard

from .errors import IntegrityError

CODEC_RAW = 0
CODEC_ZSTD = 1

ADDRESS_BYTES = 32

# Upper bound for one decoded chunk: the chunker cuts at most a few MiB, so a
# frame that claims more is corrupt or hostile and is not decompressed.
MAX_CHUNK_BYTES = 64 << 20

DEFAULT_ZSTD_LEVEL = 3

_local = threading.local()


def address_of(data: bytes | memoryview) -> bytes:
    """Return the 32-byte SHA-256 address of uncompressed chunk bytes."""
    return hashlib.sha256(data).digest()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard contexts are not safe to share between threads.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def encode(data: bytes | memoryview, level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """Return the stored object for chunk bytes: zstd when that is smaller, else raw."""
    compressed = _compressor(level).compress(data)
    if len(compressed) < len(data):
        return bytes((CODEC_ZSTD,)) + compressed
    return bytes((CODEC_RAW,)) + bytes(data)


def decode(stored: bytes | memoryview, address: bytes) -> bytes:
    """Decode a stored chunk object and verify it against its address.

    Raises IntegrityError when the object is malformed or its bytes do not
    hash to ``address``.
    """
    data = unpack(stored, address)
    if hashlib.sha256(data).digest() != address:
        raise IntegrityError(f"chunk {address.hex()}: SHA-256 of the decoded bytes does not match the address")
    return data


def unpack(stored: bytes | memoryview, address: bytes) -> bytes:
    """Return the chunk bytes of a stored object without hashing them.

    For a copy that ``decode`` verified once and that a checksum of its own
    guards since (the LMDB tier). Raises IntegrityError when the object is
    malformed.
    """
    name = address.hex()
    if not len(stored):
        raise IntegrityError(f"chunk {name}: empty object")
    codec = stored[0]
    if codec == CODEC_RAW:
        return bytes(stored[1:])
    if codec == CODEC_ZSTD:
        return _decompress(stored, name)
    raise IntegrityError(f"chunk {name}: unknown codec byte 0x{codec:02x}")


def _decompress(stored: bytes | memoryview, name: str) -> bytes:
    payload = memoryview(stored)[1:]
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {name}: invalid zstd frame header: {exc}") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size > MAX_CHUNK_BYTES:
        raise IntegrityError(f"chunk {name}: zstd frame declares no or an oversized content size")
    try:
        return _decompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {name}: zstd decompression failed: {exc}") from None
