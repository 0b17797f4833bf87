"""Store chunks concurrently, with bounded memory, skipping chunks already stored.

``Uploader.submit`` hands a chunk to a pool of worker threads and blocks
while ``max_pending`` chunks wait or are in flight, so memory holds at most
that many chunks beyond the callers' own. A worker checks whether the store
has the chunk (``Store.exists``). If not, it encodes the chunk
(``lazyfs.chunk.encode`` at ``zstd_level``) and puts it under
``lazyfs.refs.chunk_key``. A chunk submitted twice in one run is handled
once. Several threads may call ``submit`` at once.

The first worker error is raised by the next ``submit`` or by ``close``;
chunks still queued then are dropped.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..chunk import DEFAULT_ZSTD_LEVEL, encode
from ..refs import chunk_key
from ..store import Store

log = logging.getLogger(__name__)


@dataclass
class UploadStats:
    """Counts of distinct chunks: new ones were stored by this run, reused ones existed."""

    chunks_new: int = 0
    chunks_reused: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0


class Uploader:
    """Uploads chunks to one store; use as a context manager or call ``close``."""

    def __init__(self, store: Store, workers: int = 8, max_pending: int = 16,
                 zstd_level: int = DEFAULT_ZSTD_LEVEL):
        if workers < 1 or max_pending < workers:
            raise ValueError("need workers >= 1 and max_pending >= workers")
        self.store = store
        self.stats = UploadStats()
        self.zstd_level = zstd_level
        # Addresses of every chunk submitted so far.
        self.submitted: set[bytes] = set()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazyfs-upload")
        self._closed = False

    def submit(self, address: bytes, data: bytes) -> None:
        """Queue a chunk for upload; block while ``max_pending`` chunks are pending."""
        self._raise_error()
        with self._lock:
            if address in self.submitted:
                return
            self.submitted.add(address)
        self._slots.acquire()
        try:
            self._raise_error()
            future = self._executor.submit(self._upload, address, data)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _future: self._slots.release())

    def close(self) -> UploadStats:
        """Wait for every queued chunk; raise the first upload error, if any."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True)
        self._raise_error()
        return self.stats

    def abort(self) -> None:
        """Drop queued chunks and wait for the ones in flight."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Uploader":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _upload(self, address: bytes, data: bytes) -> None:
        if self._error is not None:
            return
        key = chunk_key(address)
        try:
            if self.store.exists(key):
                with self._lock:
                    self.stats.chunks_reused += 1
                return
            stored = encode(data, self.zstd_level)
            self.store.put(key, stored)
        except BaseException as exc:
            log.debug("upload of %s failed: %s", key, exc)
            with self._lock:
                if self._error is None:
                    self._error = exc
            return
        with self._lock:
            self.stats.chunks_new += 1
            self.stats.bytes_new += len(data)
            self.stats.bytes_stored += len(stored)
