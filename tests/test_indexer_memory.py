"""Memory stays bounded while a large file streams through the indexer."""

from __future__ import annotations

import json
import subprocess
import sys

from lazyfs.store import open_store
from tests.support import oci

FILE_BYTES = 256 << 20

# Runs in a fresh interpreter, so the peak RSS it reports belongs to indexing
# alone. ru_maxrss is in KiB on Linux.
_MEASURE = """
import json, resource, sys
from lazyfs.indexer.pipeline import index_image
from lazyfs.indexer.source import open_source
from lazyfs.store import open_store

source = open_source(sys.argv[1])
store = open_store(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = index_image(source, store)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "file_bytes": result.file_bytes,
                  "chunks": result.chunks}))
"""


def test_peak_memory_stays_far_below_file_size(tmp_path):
    tar_path = tmp_path / "layer.tar"
    oci.write_large_file_tar(tar_path, "data/big.bin", FILE_BYTES, seed=11)
    image = oci.write_image(tmp_path / "layout", [oci.Layer(tar_file=tar_path, compression="none")])
    store_url = (tmp_path / "store").as_uri()

    completed = subprocess.run([sys.executable, "-c", _MEASURE, image.source, store_url],
                               capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr
    measured = json.loads(completed.stdout)
    growth_bytes = (measured["after_kib"] - measured["before_kib"]) * 1024
    assert measured["file_bytes"] == FILE_BYTES
    # The 16 MiB window, up to 16 queued chunks and eight workers each holding
    # a chunk, its compressed copy and a zstd context: 82 MiB measured with
    # glibc malloc. Holding the file would take 256 MiB or more.
    assert growth_bytes < FILE_BYTES // 2, measured
    tree = oci.TreeView(open_store(store_url), image.manifest_digest)
    extents = tree.extents(b"data/big.bin")
    assert sum(extent.length for extent in extents) == FILE_BYTES
    assert len(extents) == measured["chunks"]
