"""Boot traces: the order in which a run first read an image's chunks.

A trace lives in the store beside the index it belongs to, at
``traces/<index digest>``. Stored object, version 1, integers big-endian::

    magic     8 bytes   b"LZFSTRC\\0"
    version   u16       FORMAT_VERSION
    flags     u16       0
    count     u32       number of chunk addresses, at most MAX_TRACE_CHUNKS
    index     32 bytes  the index digest (SHA-256) the trace was recorded for
    chunks    count x 32 bytes, chunk addresses in first-read order, no repeats
    checksum  32 bytes  SHA-256 of every byte before it

The same addresses in the same order give the same bytes. A trace is not
content-addressed like chunks and indexes, so it carries its own checksum and
the digest of its index: ``decode_trace`` rejects a truncated, altered or
misplaced trace with TraceFormatError. Replaying a trace fetches only chunks
that the index lists, and every chunk is verified against its address as
always, so even a well-formed trace with foreign addresses costs requests at
worst, never wrong bytes.

``TraceRecorder`` collects addresses in first-read order, bounded by
``max_chunks``. ``load_trace`` and ``save_trace`` are blocking, like the
store; the daemon runs them in worker threads (``lazyfs.prefetch``).

A daemon with a disk tier keeps each valid trace it loaded or wrote in a
local cache directory, ``<cache_dir>/<index digest>``. It reads the trace from
there on later attaches, so a restart over a filled disk tier makes no store
request for it. A cached trace stays valid, because ``save_trace`` never
replaces a valid stored trace. Two saves at the same moment can write two
different valid traces, and either one serves. A missing trace is not
cached, so a trace recorded later is found on the next attach.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path

from .cachefiles import load_cache_file, write_cache_file
from .errors import LazyfsError, ObjectNotFound
from .store import Store

log = logging.getLogger(__name__)

MAGIC = b"LZFSTRC\0"
FORMAT_VERSION = 1
# 65,536 addresses are 2 MiB of trace and, with chunks of about 1 MiB, cover
# about 64 GiB of image data.
MAX_TRACE_CHUNKS = 1 << 16

_HEADER = struct.Struct(">8sHHI32s")
_ADDRESS_BYTES = 32
_CHECKSUM_BYTES = 32
# Length of the largest valid trace; a longer cached file is not read.
MAX_TRACE_BYTES = _HEADER.size + MAX_TRACE_CHUNKS * _ADDRESS_BYTES + _CHECKSUM_BYTES


class TraceFormatError(LazyfsError):
    """Stored trace bytes are not a valid trace of the expected index."""


def trace_key(index_digest: str) -> str:
    """Return the store key of an image's trace."""
    return f"traces/{index_digest}"


def encode_trace(index_digest: str, addresses: list[bytes]) -> bytes:
    """Return the stored bytes of a trace; raise ValueError on invalid input."""
    if len(addresses) > MAX_TRACE_CHUNKS:
        raise ValueError(f"a trace contains at most {MAX_TRACE_CHUNKS} chunks, not {len(addresses)}")
    if len(set(addresses)) != len(addresses):
        raise ValueError("a trace lists each chunk address once")
    for address in addresses:
        if len(address) != _ADDRESS_BYTES:
            raise ValueError(f"invalid chunk address {address.hex()}: expected {_ADDRESS_BYTES} bytes")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(addresses), bytes.fromhex(index_digest))
    body = header + b"".join(addresses)
    return body + hashlib.sha256(body).digest()


def decode_trace(data: bytes, index_digest: str) -> list[bytes]:
    """Return the chunk addresses of a stored trace; raise TraceFormatError."""
    name = trace_key(index_digest)
    if len(data) < _HEADER.size + _CHECKSUM_BYTES:
        raise TraceFormatError(f"{name}: truncated ({len(data)} bytes)")
    body, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != checksum:
        raise TraceFormatError(f"{name}: checksum does not match")
    magic, version, _flags, count, digest = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise TraceFormatError(f"{name}: not a lazyfs trace (bad magic)")
    if version != FORMAT_VERSION:
        raise TraceFormatError(
            f"{name}: format version {version} is not supported (this lazyfs reads {FORMAT_VERSION})")
    if digest.hex() != index_digest:
        raise TraceFormatError(f"{name}: recorded for index {digest.hex()}")
    if count > MAX_TRACE_CHUNKS or len(body) != _HEADER.size + count * _ADDRESS_BYTES:
        raise TraceFormatError(f"{name}: {count} addresses do not match the length of {len(data)} bytes")
    addresses = [body[offset:offset + _ADDRESS_BYTES]
                 for offset in range(_HEADER.size, len(body), _ADDRESS_BYTES)]
    if len(set(addresses)) != count:
        raise TraceFormatError(f"{name}: lists a chunk address twice")
    return addresses


class TraceRecorder:
    """Chunk addresses of one image in first-read order, at most ``max_chunks`` of them."""

    def __init__(self, max_chunks: int = MAX_TRACE_CHUNKS):
        if not 1 <= max_chunks <= MAX_TRACE_CHUNKS:
            raise ValueError(f"max_chunks must be 1 to {MAX_TRACE_CHUNKS}, not {max_chunks}")
        self.max_chunks = max_chunks
        # A dict keeps insertion order and finds repeats in constant time.
        self._seen: dict[bytes, None] = {}

    def record(self, address: bytes) -> None:
        """Add an address on its first read; later reads and reads past the bound add nothing."""
        if len(self._seen) < self.max_chunks:
            self._seen.setdefault(address, None)

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def full(self) -> bool:
        return len(self._seen) >= self.max_chunks

    @property
    def addresses(self) -> list[bytes]:
        return list(self._seen)


def load_trace(store: Store, index_digest: str, cache_dir: Path | None = None) -> list[bytes] | None:
    """Return an image's trace, or None when it is missing or invalid.

    With ``cache_dir``, a valid cached copy is used without asking the store,
    and a valid trace from the store is cached. A missing or invalid trace
    logs one line, because a trace only speeds a boot up and a reader never
    depends on it. Store errors other than a missing object propagate.
    """
    if cache_dir is not None:
        cached = _read_cached_trace(cache_dir, index_digest)
        if cached is not None:
            return cached
    key = trace_key(index_digest)
    try:
        data = store.get(key)
    except ObjectNotFound:
        log.info("no boot trace %s in %s", key, store.url)
        return None
    try:
        addresses = decode_trace(data, index_digest)
    except TraceFormatError as exc:
        log.warning("ignoring invalid boot trace in %s: %s", store.url, exc)
        return None
    if cache_dir is not None:
        write_cached_trace(cache_dir, index_digest, data)
    return addresses


def _read_cached_trace(cache_dir: Path, index_digest: str) -> list[bytes] | None:
    return load_cache_file(cache_dir, index_digest, MAX_TRACE_BYTES, lambda data: decode_trace(data, index_digest),
                           TraceFormatError, log, "cached boot trace", "loading it from the store")


def write_cached_trace(cache_dir: Path, index_digest: str, data: bytes) -> None:
    """Keep a valid trace in ``cache_dir``; a failure is logged, because the cache is optional."""
    try:
        write_cache_file(cache_dir, index_digest, data)
    except OSError as exc:
        log.warning("cannot cache boot trace %s at %s: %s", index_digest, cache_dir / index_digest, exc.strerror)


def save_trace(store: Store, index_digest: str, addresses: list[bytes]) -> bool:
    """Write a trace unless a valid one exists; return whether it was written.

    An invalid stored trace is replaced. Two daemons that save at the same
    moment can both write. The object stays a whole, valid trace either way,
    because a store put is atomic.
    """
    key = trace_key(index_digest)
    try:
        decode_trace(store.get(key), index_digest)
    except ObjectNotFound:
        pass
    except TraceFormatError as exc:
        log.info("replacing invalid boot trace in %s: %s", store.url, exc)
    else:
        log.info("boot trace %s exists in %s; keeping it", key, store.url)
        return False
    store.put(key, encode_trace(index_digest, addresses))
    log.info("saved boot trace %s with %d chunks to %s", key, len(addresses), store.url)
    return True
