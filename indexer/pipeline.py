"""Index one image: resolve, verify, flatten, chunk, upload, then publish.

``index_image`` runs the steps in this order:

1. Resolve the source reference to a manifest, through an image index by
   platform if need be, and read the image config. Every document is
   checked against the digest that names it.
2. Stream each layer, bottom first, through its checks (``layers``) into the
   flattener, which chunks file data as it passes. The chunks go to the store
   concurrently (``upload``). After tarfile stops, the rest of the layer is
   read, so the blob digest and the config's diff_id cover every byte.
3. Wait for every chunk upload, write the index (``lazyfs.index.write_index``)
   and put it under ``indexes/<sha256>``.
4. Publish the refs (``lazyfs.refs.publish``): by manifest digest and by name.

An error in any step raises before step 3, so a failed run leaves no index
and no ref, only chunks that a later run reuses. The index depends on the
image alone. Its config part contains the runtime settings and the source
digests, never a path, a name or a time, so one image always gives one
index digest.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import time
from dataclasses import asdict, dataclass, field

from ..errors import IntegrityError
from ..index import Node, write_index
from ..refs import index_key, publish
from ..store import Store
from .chunker import Chunker, ChunkingParams
from .errors import ImageError
from .flatten import Flattener
from .layers import ByteBudget, LayerStream
from .manifest import (MAX_CONFIG_BYTES, ImageConfig, ImageIndex, Manifest, Platform,
                       parse_config, parse_manifest_document, select_manifest)
from .source import Source
from .upload import Uploader
from .verify import VerifyingReader, verify_bytes

log = logging.getLogger(__name__)

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


@dataclass
class IndexResult:
    """Summary of one run, the object ``lazyfs-index --json`` prints.

    ``entries`` counts the tar entries of all layers. ``files`` and
    ``file_bytes`` count the regular-file inodes of the flattened tree and
    their sizes. ``chunks`` is the size of the index's chunk table. Of this
    run's distinct chunks, ``chunks_new`` were stored (``bytes_new``
    uncompressed, ``bytes_stored`` as written) and ``chunks_reused`` were
    already in the store. ``refs`` lists the ref keys written, and is empty
    when every ref already named this index.
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
    log.info("indexing %s: manifest %s, %d layers, platform %s",
             source.label, manifest_digest, len(manifest.layers), config.platform)

    uploader = Uploader(store, options.upload_workers, options.max_pending_chunks)
    with uploader:
        # NOTE: files are chunked as their layer streams past, so the data of
        # files that a later layer removes or replaces is uploaded too, though
        # the index never references it.
        chunker = Chunker(uploader.submit, options.chunking)
        flattener = Flattener(chunker, source.label, options.max_image_bytes)
        budget = ByteBudget(options.max_image_bytes)
        layer_seconds = []
        for number, (layer, diff_id) in enumerate(zip(manifest.layers, config.diff_ids), start=1):
            layer_started = time.monotonic()
            label = f"layer {number} of {len(manifest.layers)} ({layer.digest})"
            _apply_layer(source, flattener, layer, diff_id, label, budget)
            layer_seconds.append(round(time.monotonic() - layer_started, 3))
        chunker.finish()
    stats = uploader.stats

    index_config = _index_config(manifest_digest, manifest, config)
    index_bytes = write_index(flattener.root, index_config, chunker.chunk_sizes)
    index_digest = hashlib.sha256(index_bytes).hexdigest()
    key = index_key(index_digest)
    if not store.exists(key):
        store.put(key, index_bytes)
    names = list(options.names if options.names is not None else source.names)
    refs = publish(store, index_digest, manifest_digest, names)

    files, file_bytes, chunk_addresses = _tree_totals(flattener.root)
    result = IndexResult(
        index_digest=index_digest, manifest_digest=manifest_digest, names=names, refs=refs,
        layers=len(manifest.layers), entries=flattener.entries, files=files, file_bytes=file_bytes,
        chunks=len(chunk_addresses), chunks_new=stats.chunks_new, chunks_reused=stats.chunks_reused,
        bytes_new=stats.bytes_new, bytes_stored=stats.bytes_stored, index_bytes=len(index_bytes),
        seconds=round(time.monotonic() - started, 3), platform=str(config.platform),
        layer_seconds=layer_seconds,
    )
    log.info("indexed %s as %s in %.1fs", source.label, index_digest, result.seconds)
    return result


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


def _apply_layer(source: Source, flattener: Flattener, descriptor, diff_id: str, label: str,
                 budget: ByteBudget) -> None:
    with source.open_blob(descriptor) as raw:
        layer = LayerStream(raw, descriptor, diff_id, label, budget)
        try:
            entries = flattener.apply_layer(layer.content, descriptor.digest)
            layer.finish()
        except (ImageError, IntegrityError):
            # A blob that does not match its digest explains any decoding, tar
            # or diff_id error it causes, so that is the error to report.
            blob_error = layer.blob_error()
            if blob_error is not None:
                raise blob_error from None
            raise
    log.info("%s: %d entries, %d bytes uncompressed", label, entries, layer.content.count)


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
