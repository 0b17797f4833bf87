"""Read a stream ahead on a background thread, so decoding overlaps its consumer.

A layer's reader stack (blob digest, decompression, diff_id digest) spends its
time in hashlib and the ISA-L and zstd decoders, which release the GIL, while
tar parsing and chunking hold it. ``Readahead`` runs the stack on its own
thread and hands over pieces through a bounded queue, so at most ``depth``
pieces of ``READ_SIZE`` bytes wait in memory.

The producer reads to EOF and then calls ``at_eof`` (the layer's digest
checks). An exception on the producer thread, from reading or from
``at_eof``, is raised by the consumer's next ``read`` once the pieces before
it are consumed.
"""

from __future__ import annotations

import queue
import threading
from typing import BinaryIO, Callable

from .streams import READ_SIZE, ReadStream

_EOF = object()


class Readahead(ReadStream):
    """A read-only stream over ``source`` that a background thread fills."""

    def __init__(self, source: BinaryIO, at_eof: Callable[[], None], name: str, depth: int = 8):
        super().__init__()
        self._source = source
        self._at_eof = at_eof
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._piece = b""
        self._offset = 0
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def read(self, size: int = -1) -> bytes:
        while self._offset >= len(self._piece):
            if self._done:
                return b""
            item = self._queue.get()
            if item is _EOF:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._piece, self._offset = item, 0
        start = self._offset
        if size is None or size < 0 or size >= len(self._piece) - start:
            self._offset = len(self._piece)
            # A whole piece is handed over as it is, without a copy.
            return self._piece if start == 0 else self._piece[start:]
        self._offset = start + size
        return self._piece[start:start + size]

    def drain(self) -> None:
        """Read and drop everything up to EOF, raising the producer's error if any."""
        self._piece, self._offset = b"", 0
        while not self._done:
            item = self._queue.get()
            if item is _EOF:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item

    def close(self) -> None:
        """Stop the producer and wait for it; pieces not yet read are dropped."""
        self._stop.set()
        while self._thread.is_alive():
            # Taking items frees the producer if it waits on a full queue.
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        super().close()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                piece = self._source.read(READ_SIZE)
                if not piece:
                    self._at_eof()
                    self._queue.put(_EOF)
                    return
                self._queue.put(piece)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)
