"""Index one image: resolve, verify, read layers, flatten, upload, then publish.

``index_image`` runs the steps in this order:

1. Resolve the source reference to a manifest, through an image index by
   platform if need be, and read the image config. Every document is
   checked against the digest that names it.
2. For each layer, load its record from the store (``layercache``, keyed by
   the config's diff_id). The layers without one are read on up to
   ``layer_workers`` threads at once (``layerread``): each blob streams
   through its checks, tar parsing and chunking, and its chunks go to the
   store concurrently (``upload``). The blob is read to EOF, so the blob
   digest and the diff_id cover every byte.
3. Meanwhile this thread applies the layers' tar headers to the flattener,
   bottom layer first, as the workers parse them. A layer's file extents are
   set once its worker has finished the layer.
4. Wait for every chunk upload, store the records of the layers read in this
   run, write the index (``lazyfs.index.write_index``) and put it under
   ``indexes/<sha256>``.
5. Publish the refs (``lazyfs.refs.publish``): by manifest digest and by name.

An error in any step raises before step 4, so a failed run leaves no index,
no record and no ref, only chunks that a later run reuses. The index depends
on the image alone. Its config part contains the runtime settings and the
source digests, never a path, a name or a time. Every layer is chunked on its
own, so one image always gives one index digest, however many threads read it
and whichever layers came from records.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ..index import Node, write_index
from ..errors import InvalidReference
from ..refs import check_name, index_key, publish
from ..store import Store
from .chunker import ChunkingParams, Emit
from .errors import ImageError
from .flatten import Flattener
from .layercache import LayerRecord, RecordedExtents, encode_record, load_record, save_record
from .layerread import LayerReadCancelled, SharedLimits, read_layer
from .manifest import (MAX_CONFIG_BYTES, Descriptor, ImageConfig, ImageIndex, Manifest, Platform,
                       parse_config, parse_manifest_document, select_manifest)
from .progress import Progress
from .source import Source
from .upload import Uploader, UploadStats
from .verify import VerifyingReader, verify_bytes

log = logging.getLogger(__name__)

# Ends the batches of tar headers that a layer's worker hands to the flattener.
_END_OF_LAYER = object()

# zstd level of new chunks, measured on the fat image of benchmarks/index_fat.py
# (1.28 GB of file data, 2-core AMD EPYC). Level 1 compressed 1 MiB chunks at
# about 630 MB/s and stored 420.3 MB. Level 2 ran at about 530 MB/s and stored
# 396.9 MB, level 3 at about 430 MB/s and 377.8 MB. casync make stored 414.8 MB
# of the same tree, so level 2 is the fastest level that stores less.
# Multithreaded zstd made no difference, because a 1 MiB chunk is one job.
DEFAULT_INDEXER_ZSTD_LEVEL = 2

# Image indexes may nest; real ones go one level deep.
MAX_INDEX_DEPTH = 4


# Far above real images (tens of GB at most), far below what a few MB of
# crafted gzip can expand to.
DEFAULT_MAX_IMAGE_BYTES = 64 << 30


@dataclass(frozen=True)
class IndexOptions:
    """Settings of one indexing run.

    ``platform`` None selects the host's platform from an image index and
    accepts a single-platform image of any platform. An explicit platform
    must match the image config too. ``names`` None publishes the source's
    default names (the registry reference, or the layout tag).
    """

    platform: Platform | None = None
    names: tuple[str, ...] | None = None
    upload_workers: int = 8
    max_pending_chunks: int = 16
    chunking: ChunkingParams = ChunkingParams()
    # Limit on the uncompressed layer bytes, and on the declared file bytes, of one image.
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
    # Layers read at once. None means one per CPU core, at most one per layer.
    layer_workers: int | None = None
    zstd_level: int = DEFAULT_INDEXER_ZSTD_LEVEL
    # Load layer records from the store and skip the layers they describe.
    layer_records: bool = True
    progress: Progress | None = None


@dataclass
class IndexResult:
    """Summary of one run, the object ``lazyfs-index --json`` prints.

    ``entries`` counts the tar entries of all layers. ``files`` and
    ``file_bytes`` count the regular-file inodes of the flattened tree and
    their sizes. ``chunks`` is the size of the index's chunk table. Of this
    run's distinct chunks, ``chunks_new`` were stored (``bytes_new``
    uncompressed, ``bytes_stored`` as written) and ``chunks_reused`` were
    already in the store, counting every chunk of a layer taken from its
    stored record. ``refs`` lists the ref keys written, and is empty when
    every ref already named this index. ``layer_seconds`` is 0 for a layer
    taken from its record.
    """

    index_digest: str
    manifest_digest: str
    names: list[str]
    refs: list[str]
    layers: int
    entries: int
    files: int
    file_bytes: int
    chunks: int
    chunks_new: int
    chunks_reused: int
    bytes_new: int
    bytes_stored: int
    index_bytes: int
    seconds: float = 0.0
    platform: str = ""
    layer_seconds: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def index_image(source: Source, store: Store, options: IndexOptions = IndexOptions()) -> IndexResult:
    """Index the image ``source`` names into ``store`` and publish its refs.

    Raises ImageError or IntegrityError for an invalid image, SourceError
    when the source fails, StoreError when the store does.
    """
    started = time.monotonic()
    manifest_digest, manifest = _resolve_manifest(source, options.platform)
    config = _read_config(source, manifest, manifest_digest)
    if options.platform is not None and not options.platform.matches(config.platform):
        raise ImageError(f"{source.label}: the image is for {config.platform}, not {options.platform}")
    names = list(options.names if options.names is not None else source.names)
    # A name the store cannot take fails here, before anything is uploaded.
    for name in names:
        try:
            check_name(name)
        except InvalidReference as exc:
            raise ImageError(f"{source.label}: {exc}") from None
    log.info("indexing %s: manifest %s, %d layers, platform %s",
             source.label, manifest_digest, len(manifest.layers), config.platform)

    progress = options.progress or Progress.disabled()
    progress.start(len(manifest.layers), sum(layer.size for layer in manifest.layers))
    try:
        layers = _LayerReader(source, store, manifest, config, options, progress)
        flattener, stats = _flatten_layers(layers, source, store, options)
        for diff_id, encoded in layers.new_records:
            save_record(store, diff_id, options.chunking, encoded)

        index_config = _index_config(manifest_digest, manifest, config)
        index_bytes = write_index(flattener.root, index_config, layers.chunk_sizes)
        index_digest = hashlib.sha256(index_bytes).hexdigest()
        key = index_key(index_digest)
        if not store.exists(key):
            store.put(key, index_bytes)
        refs = publish(store, index_digest, manifest_digest, names)
    finally:
        # Ends the bar's line on a terminal, also before an error message.
        progress.finish()

    files, file_bytes, chunk_addresses = _tree_totals(flattener.root)
    result = IndexResult(
        index_digest=index_digest, manifest_digest=manifest_digest, names=names, refs=refs,
        layers=len(manifest.layers), entries=flattener.entries, files=files, file_bytes=file_bytes,
        chunks=len(chunk_addresses), chunks_new=stats.chunks_new, chunks_reused=stats.chunks_reused,
        bytes_new=stats.bytes_new, bytes_stored=stats.bytes_stored, index_bytes=len(index_bytes),
        seconds=round(time.monotonic() - started, 3), platform=str(config.platform),
        layer_seconds=layers.seconds,
    )
    log.info("indexed %s as %s in %.1fs, %d of %d layers from stored records", source.label,
             index_digest, result.seconds, layers.cached_count, len(manifest.layers))
    return result


def _flatten_layers(layers: "_LayerReader", source: Source, store: Store,
                    options: IndexOptions) -> tuple[Flattener, UploadStats]:
    """Read the layers, upload their chunks and apply them to a new flattener, bottom layer first.

    Returns after every chunk is stored.
    """
    with Uploader(store, options.upload_workers, options.max_pending_chunks,
                  options.zstd_level) as uploader:
        recorded = RecordedExtents()
        flattener = Flattener(recorded, source.label, options.max_image_bytes)
        try:
            layers.start(uploader)
            for position, (descriptor, _diff_id) in enumerate(layers.layers):
                try:
                    flattener.apply_members(recorded.members(layers.members(position)),
                                            descriptor.digest)
                except ImageError:
                    # The flattener may see a layer's entries before its blob
                    # digest is checked, and a blob mismatch explains them.
                    layers.raise_read_error(position)
                    raise
                recorded.finish(layers.record(position))
        except BaseException:
            layers.cancel()
            raise
        finally:
            layers.stop()
    stats = uploader.stats
    stats.chunks_reused += len(layers.recorded_chunk_addresses() - uploader.submitted)
    return flattener, stats


class _LayerReader:
    """Hands out the entries and records of every layer, reading the uncached ones on worker threads.

    A worker passes a layer's tar headers on in batches while it reads, so the
    flattener can apply them while the rest of the layer is still read and
    chunked. The record, with the extents of the packed small files, is
    complete only when the worker returns.
    """

    def __init__(self, source: Source, store: Store, manifest: Manifest, config: ImageConfig,
                 options: IndexOptions, progress: Progress):
        self.source = source
        self.store = store
        self.layers = list(zip(manifest.layers, config.diff_ids))
        self.options = options
        self.progress = progress
        self.limits = SharedLimits(options.max_image_bytes)
        self.chunk_sizes: dict[bytes, int] = {}
        # (diff_id, encoded record) of each layer read in this run.
        self.new_records: list[tuple[str, bytes]] = []
        self.cached_records: list[LayerRecord] = []
        self.seconds = [0.0] * len(self.layers)
        self._cancelled = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._slots: list[Future | LayerRecord] = []
        self._feeds: list[queue.SimpleQueue | None] = []

    @property
    def cached_count(self) -> int:
        return len(self.cached_records)

    def start(self, uploader: Uploader) -> None:
        """Load the stored records and start reading the layers that have none."""
        workers = self.options.layer_workers or min(len(self.layers), os.cpu_count() or 1) or 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazyfs-layer")
        cached: dict[str, LayerRecord] = {}
        for number, (descriptor, diff_id) in enumerate(self.layers, start=1):
            record = cached.get(diff_id)
            if record is None and self.options.layer_records:
                record = load_record(self.store, diff_id, self.options.chunking)
            if record is not None:
                cached[diff_id] = record
                self.cached_records.append(record)
                self.progress.layer_done(descriptor.size)
                self._slots.append(record)
                self._feeds.append(None)
                log.info("layer %d of %d (%s): using the stored record of %s", number,
                         len(self.layers), descriptor.digest, diff_id)
                continue
            label = f"{self.source.label}: layer {number} of {len(self.layers)} ({descriptor.digest})"
            feed: queue.SimpleQueue = queue.SimpleQueue()
            self._feeds.append(feed)
            self._slots.append(self._executor.submit(
                self._read, number - 1, descriptor, diff_id, label, uploader.submit, feed))

    def members(self, position: int) -> Iterator[tarfile.TarInfo]:
        """Yield the tar headers of one layer as its worker parses them."""
        slot = self._slots[position]
        if isinstance(slot, LayerRecord):
            yield from slot.members
            return
        feed = self._feeds[position]
        assert feed is not None
        while (batch := feed.get()) is not _END_OF_LAYER:
            yield from batch

    def record(self, position: int) -> LayerRecord:
        """Return the complete record of one layer, waiting for its worker.

        When a layer fails, the others are stopped and the error of the
        lowest layer that failed on its own, not by being stopped, is raised.
        """
        slot = self._slots[position]
        if isinstance(slot, Future):
            try:
                record = slot.result()
            except LayerReadCancelled:
                raise self._first_error() from None
        else:
            record = slot
        self.chunk_sizes.update(record.chunk_sizes)
        return record

    def raise_read_error(self, position: int) -> None:
        """Raise the error of the worker of one layer, if it failed, after it has finished."""
        slot = self._slots[position]
        if isinstance(slot, Future):
            error = slot.exception()
            if error is not None and not isinstance(error, LayerReadCancelled):
                raise error

    def recorded_chunk_addresses(self) -> set[bytes]:
        return {address for record in self.cached_records for address in record.chunk_sizes}

    def cancel(self) -> None:
        """Make the workers stop soon; the layers they were reading are lost."""
        self._cancelled.set()

    def stop(self) -> None:
        """Wait for the worker threads, which have stopped early if ``cancel`` was called."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _first_error(self) -> BaseException:
        self.cancel()
        self.stop()
        for slot in self._slots:
            if isinstance(slot, Future) and not slot.cancelled():
                error = slot.exception()
                if error is not None and not isinstance(error, LayerReadCancelled):
                    return error
        return LayerReadCancelled("every layer read was cancelled")

    def _read(self, position: int, descriptor: Descriptor, diff_id: str, label: str,
              emit: Emit, feed: queue.SimpleQueue) -> LayerRecord:
        started = time.monotonic()
        try:
            record = read_layer(self.source, descriptor, diff_id, label, self.limits,
                                self.options.chunking, emit, self.progress.advance, self._cancelled,
                                feed.put)
        except BaseException:
            self._cancelled.set()
            raise
        finally:
            feed.put(_END_OF_LAYER)
        # Encoded here, in parallel with the other layers; stored once the uploads are done.
        self.new_records.append((diff_id, encode_record(record, self.options.chunking)))
        self.seconds[position] = round(time.monotonic() - started, 3)
        self.progress.layer_done(0)
        return record


def _index_config(manifest_digest: str, manifest: Manifest, config: ImageConfig) -> dict:
    """Return the index's config part: the runtime settings and the source digests.

    Everything in it is fixed by the manifest digest, which keeps the index
    digest deterministic.
    """
    return {
        "config": config.runtime,
        "source": {
            "mediaType": manifest.media_type,
            "manifest": manifest_digest,
            "config": manifest.config.digest,
            "layers": [layer.digest for layer in manifest.layers],
            "platform": str(config.platform),
        },
    }


def _resolve_manifest(source: Source, platform: Platform | None) -> tuple[str, Manifest]:
    """Return (digest, manifest) of the image, choosing from image indexes by platform."""
    root = source.resolve()
    digest, media_type, data = root.digest, root.media_type, root.data
    for _depth in range(MAX_INDEX_DEPTH + 1):
        document = parse_manifest_document(data, media_type, f"manifest {digest}")
        if isinstance(document, Manifest):
            return digest, document
        assert isinstance(document, ImageIndex)
        chosen = select_manifest(document, platform or Platform.host(), f"image index {digest}")
        data = source.read_manifest(chosen)
        verify_bytes(data, chosen.digest, chosen.size, f"manifest {chosen.digest}")
        digest, media_type = chosen.digest, chosen.media_type
    raise ImageError(f"{source.label}: image indexes nested more than {MAX_INDEX_DEPTH} deep")


def _read_config(source: Source, manifest: Manifest, manifest_digest: str) -> ImageConfig:
    descriptor = manifest.config
    label = f"image config {descriptor.digest}"
    if descriptor.size > MAX_CONFIG_BYTES:
        raise ImageError(f"{label} declares {descriptor.size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    with source.open_blob(descriptor) as raw:
        # The reader fails as soon as the blob exceeds its declared size.
        data = VerifyingReader(raw, descriptor.digest, descriptor.size, label).readall()
    config = parse_config(data, label)
    if len(config.diff_ids) != len(manifest.layers):
        raise ImageError(f"manifest {manifest_digest} lists {len(manifest.layers)} layers, but {label} "
                         f"has {len(config.diff_ids)} rootfs.diff_ids")
    return config


def _tree_totals(root: Node) -> tuple[int, int, set[bytes]]:
    """Return (regular files, their bytes, distinct chunk addresses), counting each inode once."""
    seen: set[int] = set()
    files = file_bytes = 0
    addresses: set[bytes] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            if child.is_dir:
                stack.append(child)
            elif stat.S_ISREG(child.mode) and id(child) not in seen:
                seen.add(id(child))
                files += 1
                file_bytes += child.size
                addresses.update(address for address, _offset, _length in child.extents)
    return files, file_bytes, addresses
