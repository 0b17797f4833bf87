"""Cut file data into chunks while it streams past, with bounded memory.

Two kinds of chunk:

- A file of at least ``large_file_bytes`` is cut with content-defined
  boundaries (FastCDC through the ``fastcdc`` package's Cython core), so an
  insertion early in a file moves only nearby boundaries and the other chunks
  still deduplicate. The file is read in windows of ``window_bytes``. FastCDC
  picks a boundary by looking only at the bytes from the chunk's start up to
  ``max_chunk_bytes``, so every chunk but the last of a window is final. The
  last one is carried into the next window, and the result equals cutting the
  whole file at once.
- Smaller files are packed, in the order they arrive, into shared chunks of
  up to ``pack_bytes``. A small file never straddles two chunks, so reading it
  takes exactly one chunk fetch. A pack is closed when the next file would not
  fit.

A file's bytes are a list of (chunk address, offset in chunk, length)
extents that cover it exactly. An empty file has no extents and no chunk is
ever empty. Chunks are handed to ``emit(address, data)`` in stream order;
addresses are ``lazyfs.chunk.address_of`` (SHA-256 of the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable

# The Cython core directly: the package falls back to a pure-Python version
# about a hundred times slower when the extension is missing.
from fastcdc.fastcdc_cy import fastcdc_cy as fastcdc

from ..chunk import address_of
from ..index import Node
from .errors import ImageError

Emit = Callable[[bytes, bytes], None]

# Size of each read from a file's stream.
READ_BYTES = 1 << 20


@dataclass(frozen=True)
class ChunkingParams:
    """Chunk sizes in bytes; see the module docstring for what each one governs.

    ``benchmarks/chunk_sizes.py`` compared packs and chunks of 256 KiB to 2 MiB
    on the fat test image's cold boot: smaller ones fetch fewer bytes and make
    more requests, and no setting beat these defaults by more than the noise.
    """

    large_file_bytes: int = 256 << 10
    min_chunk_bytes: int = 256 << 10
    avg_chunk_bytes: int = 1 << 20
    max_chunk_bytes: int = 4 << 20
    pack_bytes: int = 1 << 20
    window_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if not 0 < self.min_chunk_bytes <= self.avg_chunk_bytes <= self.max_chunk_bytes:
            raise ValueError("chunk sizes must satisfy 0 < min <= avg <= max")
        # Each window must leave room for new data after a carried-over chunk.
        if self.window_bytes < 2 * self.max_chunk_bytes:
            raise ValueError("window_bytes must be at least twice max_chunk_bytes")
        # A small file has to fit into one pack.
        if not 0 < self.large_file_bytes <= self.pack_bytes:
            raise ValueError("large_file_bytes must be positive and at most pack_bytes")


class Chunker:
    """Chunks the regular files of an image, in stream order."""

    def __init__(self, emit: Emit, params: ChunkingParams = ChunkingParams()):
        self.params = params
        self._emit_chunk = emit
        self.chunk_sizes: dict[bytes, int] = {}
        self._pack = bytearray()
        self._packed: list[tuple[Node, int, int]] = []
        self._window: bytearray | None = None

    def add_file(self, node: Node, stream: BinaryIO, label: str) -> None:
        """Read ``node.size`` bytes from ``stream`` and set ``node.extents``.

        A packed file's extents are set when its pack closes: at the latest
        in ``finish``. ``label`` names the file in errors.
        """
        node.extents = []
        if node.size == 0:
            return
        if node.size >= self.params.large_file_bytes:
            self._add_large(node, stream, label)
        else:
            self._add_small(node, stream, label)

    def finish(self) -> None:
        """Close the last pack; call once after the last file."""
        self._close_pack()

    def _emit(self, data: bytes) -> bytes:
        address = address_of(data)
        self.chunk_sizes[address] = len(data)
        self._emit_chunk(address, data)
        return address

    def _add_small(self, node: Node, stream: BinaryIO, label: str) -> None:
        data = _read_exactly(stream, node.size, label, 0, node.size)
        if len(self._pack) + len(data) > self.params.pack_bytes:
            self._close_pack()
        self._packed.append((node, len(self._pack), len(data)))
        self._pack += data

    def _close_pack(self) -> None:
        if not self._pack:
            return
        address = self._emit(bytes(self._pack))
        for node, offset, length in self._packed:
            node.extents = [(address, offset, length)]
        self._pack = bytearray()
        self._packed = []

    def _add_large(self, node: Node, stream: BinaryIO, label: str) -> None:
        params = self.params
        if self._window is None:
            # One buffer for the whole run: freeing a window-sized block after
            # every file would make glibc raise its mmap threshold and keep
            # freed chunk copies in the heap, growing the RSS.
            self._window = bytearray(params.window_bytes)
        window = memoryview(self._window)
        remaining = node.size
        filled = 0
        try:
            while True:
                # Fill the window in small reads: one large read would hold several
                # transient copies of the whole window in tarfile's stream buffers.
                while filled < params.window_bytes and remaining:
                    size = min(params.window_bytes - filled, remaining, READ_BYTES)
                    piece = _read_exactly(stream, size, label, node.size - remaining, node.size)
                    window[filled:filled + size] = piece
                    filled += size
                    remaining -= size
                cuts = list(fastcdc(window[:filled], params.min_chunk_bytes, params.avg_chunk_bytes,
                                    params.max_chunk_bytes))
                last = len(cuts) if remaining == 0 else len(cuts) - 1
                for cut in cuts[:last]:
                    address = self._emit(bytes(window[cut.offset:cut.offset + cut.length]))
                    node.extents.append((address, 0, cut.length))
                if remaining == 0:
                    return
                carried = cuts[-1]
                window[:carried.length] = bytes(window[carried.offset:filled])
                filled = carried.length
        finally:
            window.release()


def _read_exactly(stream: BinaryIO, size: int, label: str, file_offset: int, file_size: int) -> bytes:
    """Read ``size`` bytes of a file whose first ``file_offset`` bytes are already read."""
    data = stream.read(size)
    if len(data) == size:
        return data
    pieces = [data]
    received = len(data)
    while received < size:
        piece = stream.read(size - received)
        if not piece:
            raise ImageError(f"{label}: file data ends after {file_offset + received} of "
                             f"{file_size} bytes")
        pieces.append(piece)
        received += len(piece)
    return b"".join(pieces)
