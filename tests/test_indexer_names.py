"""Names the mount could not show, and ref names, are rejected before anything is published."""

from __future__ import annotations

import pytest

from tests.support import oci


def _store_is_empty(store_path):
    return not (store_path / "indexes").exists() and not (store_path / "refs").exists()


@pytest.mark.parametrize("name", ["..", ".", "", "a\nb"])
def test_invalid_ref_name_is_usage_error(tmp_path, name):
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file("f", b"x")])])

    run = oci.run_indexer("--store", str(tmp_path / "store"), "--name", name, image.source)

    assert run.code == 2
    assert run.stderr.startswith("lazyfs-index: error: --name: invalid image name")
    assert len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_component_over_name_max_rejected(tmp_path):
    long_name = "d/" + "x" * 256
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file(long_name, b"x")])])

    run = oci.run_indexer("--store", str(tmp_path / "store"), image.source)

    assert run.code == 3
    assert "has a component longer than 255 bytes" in run.stderr
    assert _store_is_empty(tmp_path / "store")


def test_component_of_name_max_accepted(tmp_path):
    name = "x" * 255
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file(name, b"x")])])

    run = oci.run_indexer("--store", str(tmp_path / "store"), "--json", image.source)

    assert run.code == 0, run.stderr
    assert run.result["files"] == 1


def test_xattr_name_with_nul_rejected(tmp_path):
    entry = oci.file("f", b"x", xattrs={"user.a\x00b": b"1"})
    image = oci.write_image(tmp_path / "layout", [oci.Layer([entry])])

    run = oci.run_indexer("--store", str(tmp_path / "store"), image.source)

    assert run.code == 3
    assert "extended attribute with an empty name or a NUL byte" in run.stderr
    assert _store_is_empty(tmp_path / "store")


def test_decompression_bomb_stops_at_file_limit(tmp_path):
    # 64 MiB of zeros compresses to about 64 KiB of gzip.
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file("zeros", bytes(64 << 20))])])

    run = oci.run_indexer("--store", str(tmp_path / "store"), "--max-image-bytes", str(16 << 20), image.source)

    assert run.code == 3
    assert ("entry 'zeros': file data exceeds the limit of 16777216 bytes per image (--max-image-bytes)"
            in run.stderr)
    assert _store_is_empty(tmp_path / "store")


def test_header_bomb_stops_at_stream_limit(tmp_path):
    # 4000 empty files: about 2 MB of tar headers and no file data at all.
    entries = [oci.file(f"f{number}", b"") for number in range(4000)]
    image = oci.write_image(tmp_path / "layout", [oci.Layer(entries)])

    run = oci.run_indexer("--store", str(tmp_path / "store"), "--max-image-bytes", str(1 << 20), image.source)

    assert run.code == 3
    assert "uncompressed layers exceed the limit of 1048576 bytes per image (--max-image-bytes)" in run.stderr
    assert _store_is_empty(tmp_path / "store")


def test_path_over_path_max_rejected(tmp_path):
    deep = "/".join(["d"] * 2100)
    image = oci.write_image(tmp_path / "layout", [oci.Layer([oci.file(deep, b"x")])])

    run = oci.run_indexer("--store", str(tmp_path / "store"), image.source)

    assert run.code == 3
    assert "is longer than 4096 bytes" in run.stderr
    assert _store_is_empty(tmp_path / "store")
