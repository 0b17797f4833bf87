"""Boot traces in the daemon: record an image's first reads, replay them as background prefetch.

``BootTraces`` follows every attached image when ``trace_record`` or
``trace_replay`` is on (replay is on by default, recording off). On attach it starts recording at
once, so that no early read is missed, and loads ``traces/<index digest>``
from the store in a background task (format in ``lazyfs.trace``):

- A valid trace ends the recording. A daemon with a disk tier keeps valid
  traces in ``<disk_cache_path>/traces`` and loads them from there on later
  attaches, with no store request. With ``trace_replay`` the trace's chunks
  are fetched in trace order through the tier chain, ``trace_replay_concurrency``
  at a time, so they land in the LMDB tier and, where the RAM tier has free
  room, in RAM.
- A missing or invalid trace (one log line, never an error for a reader) lets
  the recording continue, if ``trace_record`` is on. It records each chunk
  address on the first demand read (read-ahead prefetches are not reads),
  in first-read order.

A recording ends at the first of: a ``trace_save`` control request
(``lazyfs trace save IMAGE``, and ``lazyfs-run`` sends one when its command
exits), ``trace_window_s`` seconds after the attach, or ``trace_max_chunks``
distinct chunks. Its trace is then written unless a valid one already exists
in the store. A recording that none of these ended before the daemon stops is
dropped. A recording with no chunks writes nothing.

Priority: a replayed chunk is fetched inside ``background_fetches()``. The
store tier gives such fetches a worker pool of their own, separate from the
``fetch_concurrency`` slots of demand reads, so a demand read never waits for
a store request slot that a prefetch holds. A demand read of a chunk that a
prefetch is fetching joins that fetch (the chain allows one fetch per chunk).
A background fetch fills the RAM tier only while it has free room, so a
replay never evicts chunks that readers put there.
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .errors import LazyfsError, StoreError
from .logutil import image_context
from .refs import is_index_digest
from .store import Store
from .trace import TraceRecorder, encode_trace, load_trace, save_trace, write_cached_trace

if TYPE_CHECKING:
    from .index import Index
    from .tiers import TierChain
    from .tree import Image, Tree

log = logging.getLogger(__name__)

_background = contextvars.ContextVar("lazyfs_background_fetch", default=False)


def in_background() -> bool:
    """Return whether the current task fetches for a prefetch rather than for a reader."""
    return _background.get()


@contextmanager
def background_fetches() -> Iterator[None]:
    """Mark the fetches of the current task, inside the block, as background prefetches."""
    token = _background.set(True)
    try:
        yield
    finally:
        _background.reset(token)


class _ImageTrace:
    """Trace state of one attached image."""

    def __init__(self, image: Image, recorder: TraceRecorder | None, started_at: float):
        self.image = image
        self.recorder = recorder
        self.started_at = started_at
        # loading, recording, replaying, replayed, present (replay off), none,
        # saved, exists (another trace was there), empty, save failed.
        self.state = "loading"
        # True from the moment a save of the recording is due until it starts.
        self.saving = False
        self.counters: Counter[str] = Counter()

    def status(self) -> dict[str, Any]:
        result = {"state": self.state, "recording_chunks": 0, "trace_chunks": 0, "saved_chunks": 0,
                  "replay_fetched": 0, "replay_cached": 0, "replay_skipped": 0, "replay_errors": 0}
        result.update(self.counters)
        if self.recorder is not None:
            result["recording_chunks"] = len(self.recorder)
        return result


class BootTraces:
    """Recording and replay of boot traces for every image of one tree; see the module docstring."""

    def __init__(self, store: Store, chain: TierChain, *, record: bool, replay: bool, window_s: float,
                 max_chunks: int, concurrency: int, store_timeout_s: float, cache_dir: Path | None = None):
        self.store = store
        # Local copies of valid traces (lazyfs.trace); None keeps none.
        self.cache_dir = cache_dir
        self.chain = chain
        self.record = record
        self.replay = replay
        self.window_s = window_s
        self.max_chunks = max_chunks
        self.concurrency = concurrency
        self.store_timeout_s = store_timeout_s
        self._images: dict[str, _ImageTrace] = {}
        self._busy = 0
        self._idle = trio.Event()
        self._idle.set()

    def attach_to(self, tree: Tree) -> None:
        """Follow the attaches and reads of ``tree``."""
        tree.on_attach = self.on_attach
        tree.on_chunks_read = self.on_chunks_read

    # -- tree hooks -------------------------------------------------------------

    def on_attach(self, image: Image) -> None:
        """Start recording and load the stored trace in the background (called in trio)."""
        if not (self.record or self.replay):
            return
        recorder = TraceRecorder(self.max_chunks) if self.record else None
        entry = _ImageTrace(image, recorder, trio.current_time())
        self._images[image.digest] = entry
        self._start_task(self._load_and_replay, entry, name=f"lazyfs boot trace {image.digest}")

    def on_chunks_read(self, image: Image, numbers: list[int]) -> None:
        """Record the chunks of one demand read, in order."""
        entry = self._images.get(image.digest)
        if entry is None or entry.recorder is None or entry.saving:
            return
        for number in numbers:
            entry.recorder.record(image.index.chunk(number)[0])
        if entry.recorder.full:
            # Saved in a counted task, so a sync request waits for the write.
            entry.saving = True
            self._start_task(self._save_quietly, image.digest, f"{self.max_chunks} chunks recorded",
                             name=f"lazyfs boot trace save {image.digest}")

    # -- background tasks -------------------------------------------------------

    def _start_task(self, function, *args, name: str) -> None:
        self._busy += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        trio.lowlevel.spawn_system_task(self._run_counted, function, *args, name=name)

    async def _run_counted(self, function, *args) -> None:
        # A system task: an exception escaping it would end the whole trio run.
        try:
            await function(*args)
        except Exception:
            log.exception("boot trace task %s failed", function.__name__)
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no trace is being loaded, replayed, or saved because its recording is full."""
        while self._busy:
            await self._idle.wait()

    async def _load_and_replay(self, entry: _ImageTrace) -> None:
        digest = entry.image.digest
        try:
            with trio.fail_after(self.store_timeout_s):
                addresses = await trio.to_thread.run_sync(load_trace, self.store, digest, self.cache_dir,
                                                          abandon_on_cancel=True)
        except (StoreError, trio.TooSlowError) as exc:
            # The store may respond later, and a trace saved then is kept.
            log.warning("cannot load the boot trace of image %s from %s: %s",
                        digest, self.store.url, exc or "timed out")
            addresses = None
        if addresses is None:
            if entry.recorder is not None:
                entry.state = "recording"
                self._start_window(entry)
            elif entry.state == "loading":
                entry.state = "none"
            return
        entry.recorder = None
        entry.counters["trace_chunks"] = len(addresses)
        if not self.replay:
            entry.state = "present"
            return
        entry.state = "replaying"
        await self._replay(entry, addresses)
        entry.state = "replayed"

    def _start_window(self, entry: _ImageTrace) -> None:
        trio.lowlevel.spawn_system_task(self._end_window, entry, name="lazyfs boot trace window")

    async def _end_window(self, entry: _ImageTrace) -> None:
        await trio.sleep_until(entry.started_at + self.window_s)
        await self._save_quietly(entry.image.digest, f"the boot window of {self.window_s:g} s ended")

    async def _save_quietly(self, digest: str, reason: str) -> None:
        # A system task: a failed save is logged by save() and ends here.
        try:
            await self.save(digest, reason)
        except LazyfsError:
            pass
        except Exception:
            log.exception("saving the boot trace of image %s failed", digest)

    async def _replay(self, entry: _ImageTrace, addresses: list[bytes]) -> None:
        image = entry.image
        known = await trio.to_thread.run_sync(_chunk_addresses, image.index)
        listed = [address for address in addresses if address in known]
        skipped = len(addresses) - len(listed)
        if skipped:
            entry.counters["replay_skipped"] = skipped
            log.warning("boot trace of image %s lists %d chunks that its index does not; skipping them",
                        image.digest, skipped)
        started = trio.current_time()
        slots = trio.Semaphore(self.concurrency)
        async with trio.open_nursery() as nursery:
            for address in listed:
                await slots.acquire()
                # Like read-ahead, a replay waits for the disk fills instead of
                # outrunning them, which would make the chain drop fills.
                await self.chain.wait_for_fill_room()
                nursery.start_soon(self._prefetch, entry, address, slots)
        counters = entry.counters
        log.info("replayed the boot trace of image %s in %.2f s: %d chunks fetched, %d already cached, "
                 "%d failed", image.digest, trio.current_time() - started, counters["replay_fetched"],
                 counters["replay_cached"], counters["replay_errors"])

    async def _prefetch(self, entry: _ImageTrace, address: bytes, slots: trio.Semaphore) -> None:
        try:
            with background_fetches(), image_context(entry.image.digest):
                fetched = await self.chain.fetch_ahead(address)
            if fetched is None:
                entry.counters["replay_errors"] += 1
            elif fetched.remote and not fetched.joined:
                entry.counters["replay_fetched"] += 1
                entry.image.count_prefetch(fetched)
            else:
                entry.counters["replay_cached"] += 1
        finally:
            slots.release()

    # -- control requests --------------------------------------------------------

    async def save(self, digest: str, reason: str = "a trace_save request") -> dict[str, Any]:
        """End the image's recording and write its trace unless a valid one exists.

        Returns {"index", "saved", "chunks", "state"}. Raises StoreError when
        the store cannot be read or written.
        """
        entry = self._images.get(digest)
        if entry is None:
            return {"index": digest, "saved": False, "chunks": 0, "state": "not attached"}
        recorder, entry.recorder = entry.recorder, None
        entry.saving = False
        if recorder is None:
            return {"index": digest, "saved": False, "chunks": 0, "state": entry.state}
        addresses = recorder.addresses
        if not addresses:
            entry.state = "empty"
            log.info("boot trace of image %s ended by %s: no chunks were read; writing nothing",
                     digest, reason)
            return {"index": digest, "saved": False, "chunks": 0, "state": entry.state}
        log.info("boot trace of image %s ended by %s with %d chunks", digest, reason, len(addresses))
        try:
            with trio.fail_after(self.store_timeout_s):
                written = await trio.to_thread.run_sync(save_trace, self.store, digest, addresses,
                                                        abandon_on_cancel=True)
        except (StoreError, trio.TooSlowError) as exc:
            entry.state = "save failed"
            message = str(exc) or f"timed out after {self.store_timeout_s:g} s"
            log.warning("saving the boot trace of image %s to %s failed: %s", digest, self.store.url, message)
            raise StoreError(f"saving the boot trace of image {digest} failed: {message}") from None
        if written and self.cache_dir is not None:
            await trio.to_thread.run_sync(write_cached_trace, self.cache_dir, digest,
                                          encode_trace(digest, addresses))
        entry.state = "saved" if written else "exists"
        entry.counters["saved_chunks"] = len(addresses) if written else 0
        return {"index": digest, "saved": written, "chunks": len(addresses), "state": entry.state}

    def control_handlers(self) -> dict[str, Any]:
        """Return the control socket's ``trace_save`` handler."""

        async def trace_save(request: dict[str, Any]) -> dict[str, Any]:
            digest = request.get("index")
            if not isinstance(digest, str) or not is_index_digest(digest):
                raise LazyfsError(f"trace_save needs 'index', a 64-digit hex index digest, not {digest!r}")
            return await self.save(digest)

        return {"trace_save": trace_save}

    def status(self) -> dict[str, dict[str, Any]]:
        """Return each followed image's trace state and counters, keyed by index digest."""
        return {digest: entry.status() for digest, entry in self._images.items()}


def _chunk_addresses(index: Index) -> set[bytes]:
    return {index.chunk(number)[0] for number in range(index.chunk_count)}
