"""Check blobs against their descriptors: SHA-256 digest and exact size.

``VerifyingReader`` wraps a raw blob stream and hashes and counts every byte
as it passes. A blob longer than its descriptor fails as soon as the extra
byte arrives. A shorter or different one fails when its reader reaches EOF, so
a consumer that reads to the end cannot miss a mismatch.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from ..errors import IntegrityError
from .errors import ImageError
from .streams import ReadStream

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


def check_digest(digest: object, label: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>``; raise ImageError otherwise.

    A well-formed digest of another algorithm (sha512, blake3) is rejected by
    name, since every blob has to be verified and only SHA-256 is implemented.
    """
    if not isinstance(digest, str):
        raise ImageError(f"{label}: digest must be a string, not {digest!r}")
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ImageError(f"{label}: invalid digest {digest!r}")
    algorithm, encoded = match.groups()
    if algorithm != "sha256":
        raise ImageError(
            f"{label}: digest {digest} uses algorithm {algorithm}; only sha256 digests can be verified")
    if not _SHA256_HEX.fullmatch(encoded):
        raise ImageError(f"{label}: invalid sha256 digest {digest!r}: expected 64 lowercase hex digits")
    return digest


def verify_bytes(data: bytes, digest: str, size: int | None, label: str) -> bytes:
    """Return ``data`` if it matches ``digest`` and ``size``; raise IntegrityError otherwise."""
    if size is not None and len(data) != size:
        raise IntegrityError(f"{label} is {len(data)} bytes, but its descriptor declares {size}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise IntegrityError(f"{label}: content has digest {actual}, not the digest that names it")
    return data


class VerifyingReader(ReadStream):
    """A read-only stream over ``raw`` that checks size and digest.

    ``size`` None means unknown, as for an uncompressed layer checked against
    its diff_id. ``label`` names the blob in error messages, e.g. "layer 2 of 3
    (sha256:…)". The reader does not close ``raw``.
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, label: str):
        super().__init__()
        self._raw = raw
        self.digest = digest
        self.size = size
        self.label = label
        self._hash = hashlib.sha256()
        self.count = 0
        self._verified = False
        # The first mismatch found; later reads raise it again instead of a
        # confusing follow-up error.
        self._failure: IntegrityError | None = None

    def read(self, size: int = -1) -> bytes:
        if self._failure is not None:
            raise self._failure
        if self._verified:
            return b""
        if size is None or size < 0:
            return self.readall()
        data = self._raw.read(size) if size else b""
        if size and not data:
            self._check_end()
            return b""
        self._update(data)
        return data

    def finish(self) -> None:
        """Read the rest of ``raw`` and check it; raise IntegrityError on a mismatch."""
        while self.read(1 << 20):
            pass

    @property
    def verified(self) -> bool:
        """Whether EOF was reached and the size and digest matched."""
        return self._verified

    def _update(self, data: bytes) -> None:
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            self._fail(f"{self.label} is longer than the {self.size} bytes its descriptor declares")
        self._hash.update(data)

    def _check_end(self) -> None:
        if self.size is not None and self.count != self.size:
            self._fail(f"{self.label} ended after {self.count} of the {self.size} bytes its descriptor declares")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self._fail(f"{self.label}: content has digest {actual}, not {self.digest}")
        self._verified = True

    def _fail(self, message: str) -> None:
        self._failure = IntegrityError(message)
        raise self._failure
