"""Soak: 64 concurrent readers of random ranges on a cold image, every byte checked.

The run lasts LAZYFS_SOAK_SECONDS seconds (10 by default, to fit CI);
``python -m benchmarks.soak`` runs the same readers for 60 s and records the
result in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import uuid

import pytest

from benchmarks.soak import DEFAULT_READERS, run_soak
from tests.support.daemon import running_daemon
from tests.support.indexed_image import index_image

pytestmark = [pytest.mark.image, pytest.mark.fuse]

SOAK_SECONDS = float(os.environ.get("LAZYFS_SOAK_SECONDS", "10"))


def test_concurrent_random_reads_cold(s3_server, debootstrap_image, tmp_path, record_property):
    layout, tag = debootstrap_image
    bucket = s3_server.create_bucket(f"soak-{uuid.uuid4().hex[:12]}")
    image = index_image(layout, tag, s3_server.endpoint_url, bucket, tmp_path / "bundle")

    with running_daemon(directory=tmp_path / "daemon", store_url=image.store_url,
                        s3_endpoint_url=s3_server.endpoint_url, log_level="info") as daemon:
        result = run_soak(image, daemon.image(image.digest), SOAK_SECONDS, DEFAULT_READERS)
        status = daemon.status()

    record_property("soak", result.summary())
    print(result.summary())
    assert result.errors == []
    assert result.error_count == 0
    assert result.reads >= DEFAULT_READERS
    assert len(result.latencies_s) == result.reads
    assert status["images"][image.digest]["read_errors"] == 0
    assert status["tiers"]["store"]["hits"] >= 1
