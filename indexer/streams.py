"""A base class for the indexer's read-only byte streams."""

from __future__ import annotations

import io

READ_SIZE = 1 << 20


class ReadStream(io.RawIOBase):
    """A readable raw stream whose subclass implements only ``read(size)``."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        pieces = []
        while piece := self.read(READ_SIZE):
            pieces.append(piece)
        return b"".join(pieces)
