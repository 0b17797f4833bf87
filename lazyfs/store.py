"""Object stores: a local directory (``file://``) and S3 (``s3://``).

A store is a flat namespace of immutable objects:

- ``chunks/<sha256 hex>``   one stored chunk object (see ``lazyfs.chunk``)
- ``indexes/<sha256 hex>``  one image index, named by the SHA-256 of its bytes
- ``refs/<kind>/<name>``    a small JSON record naming an index (see ``lazyfs.refs``)
- ``layers/<diff_id hex>/<chunking tag>``  what indexing one layer produced, so
  that the indexer can skip that layer later (see ``lazyfs.indexer.layercache``)

Every ``put`` is atomic: a reader sees the whole object or none. Stores are
blocking and thread-safe; the daemon calls them through worker threads.

The retry policy lives here. A temporary failure (timeout, reset connection,
HTTP 5xx, 429 or SlowDown) is retried with jittered exponential backoff up to
``max_attempts``; a definite result (404, 403, a bad request) is not retried.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import ObjectNotFound, StoreError, StoreUnavailable
from .logutil import RateLimitedLog, image_phrase

log = logging.getLogger(__name__)
# Retry lines repeat when the same object fails again and again; see ``retry``.
_retry_log = RateLimitedLog(log)

# Results counted per request by ``Store.result_counts``.
RESULT_OK = "ok"
RESULT_NOT_FOUND = "not_found"
RESULT_UNAVAILABLE = "unavailable"
RESULT_ERROR = "error"


@dataclass(frozen=True)
class StoreOptions:
    """Connection settings shared by every store kind."""

    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    max_attempts: int = 5
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    max_connections: int = 32


class Store:
    """Interface of an object store; see the module docstring for the layout."""

    url: str

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.results: Counter[tuple[str, str]] = Counter()
        self.retries: Counter[str] = Counter()

    def _count(self, what: str) -> None:
        with self._stats_lock:
            self.requests[what] += 1

    def _count_result(self, operation: str, result: str) -> None:
        with self._stats_lock:
            self.results[operation, result] += 1

    def _count_retry(self, operation: str) -> None:
        with self._stats_lock:
            self.retries[operation] += 1

    def request_counts(self) -> dict[str, int]:
        """Return a snapshot of the request counters by operation (get, put, head, list)."""
        with self._stats_lock:
            return dict(self.requests)

    def result_counts(self) -> dict[str, dict[str, int]]:
        """Return finished requests by operation and result (ok, not_found, unavailable, error).

        A request counts once, after its retries: ``unavailable`` means the
        retries ran out, ``error`` a definite failure other than not found.
        """
        with self._stats_lock:
            result: dict[str, dict[str, int]] = {}
            for (operation, outcome), count in sorted(self.results.items()):
                result.setdefault(operation, {})[outcome] = count
            return result

    def retry_counts(self) -> dict[str, int]:
        """Return the retries of temporary failures by operation."""
        with self._stats_lock:
            return dict(self.retries)

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFound or StoreError."""
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        """Write the object atomically, replacing any object of that key."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Return whether the object exists."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Return the keys that start with ``prefix``, sorted."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """Open a store from its URL: ``file:///dir``, a plain path, or ``s3://bucket/prefix``."""
    options = options or StoreOptions()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"invalid store URL {url!r}: missing bucket name (s3://BUCKET/PREFIX)")
        from .s3store import S3Store

        return S3Store(parsed.netloc, parsed.path.strip("/"), options)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"invalid store URL {url!r}: file URLs take no host (file:///path)")
        return FileStore(Path(urllib.parse.unquote(parsed.path)))
    if parsed.scheme == "":
        return FileStore(Path(url).resolve())
    raise StoreError(f"unsupported store URL {url!r}: use file:///DIR or s3://BUCKET/PREFIX")


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")


class FileStore(Store):
    """A store in a local directory; objects are files named by their keys.

    Writes go to ``tmp/`` in the same directory tree, are fsynced, then renamed
    into place, so a crash leaves either the old state or the whole object.
    """

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.url = root.as_uri()
        self._tmp = root / "tmp"

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def get(self, key: str) -> bytes:
        self._count("get")
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            self._count_result("get", RESULT_NOT_FOUND)
            raise ObjectNotFound(key) from None
        except OSError as exc:
            self._count_result("get", RESULT_ERROR)
            raise StoreError(f"reading {key} from {self.url} failed: {exc.strerror}") from exc
        self._count_result("get", RESULT_OK)
        return data

    def put(self, key: str, data: bytes) -> None:
        self._count("put")
        path = self._path(key)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp / f"{os.getpid()}.{threading.get_ident()}.{random.getrandbits(64):016x}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            self._count_result("put", RESULT_ERROR)
            raise StoreError(f"writing {key} to {self.url} failed: {exc.strerror}") from exc
        self._count_result("put", RESULT_OK)

    def exists(self, key: str) -> bool:
        self._count("head")
        self._count_result("head", RESULT_OK)
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        self._count("list")
        self._count_result("list", RESULT_OK)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                key = os.path.relpath(os.path.join(dirpath, name), self.root)
                if key.startswith(prefix) and not key.startswith("tmp/"):
                    keys.append(key)
        return sorted(keys)


def backoff_delay(attempt: int, options: StoreOptions) -> float:
    """Return a full-jitter exponential backoff delay for a 1-based retry attempt."""
    cap = min(options.backoff_max_s, options.backoff_base_s * (2 ** (attempt - 1)))
    return random.uniform(0, cap)


def retry(operation: str, key: str, options: StoreOptions, call, is_temporary, on_retry=None):
    """Run ``call`` until it succeeds, a definite error occurs or attempts run out.

    ``is_temporary(exc)`` classifies an exception; temporary ones are retried
    with backoff, logged at INFO on the first retry and WARNING after that,
    and reported to ``on_retry()`` when given. The line names the image of
    the current ``lazyfs.logutil.image_context``. The same attempt of the same
    key is logged once a minute at most, with a count of the repeats.
    """
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_temporary(exc):
                raise
            if attempt >= options.max_attempts:
                raise StoreUnavailable(
                    f"{operation} {key} failed after {attempt} attempts: {exc}"
                ) from exc
            delay = backoff_delay(attempt, options)
            if on_retry is not None:
                on_retry()
            level = logging.INFO if attempt == 1 else logging.WARNING
            _retry_log.log(level, (operation, key, attempt),
                           "%s %s%s failed (attempt %d of %d), retrying in %.2fs: %s",
                           operation, key, image_phrase("for"), attempt, options.max_attempts,
                           delay, exc)
            time.sleep(delay)
            attempt += 1
