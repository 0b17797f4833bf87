"""Indexing ``docker save`` archives built here in Python.

``write_archive`` writes the layout docker save produces, with a
``manifest.json`` at the root. Docker 24 and earlier store the config as
``<id>.json`` and each layer as ``<id>/layer.tar``. Docker 25 and later store
the config and layers under ``blobs/sha256/``. The blobs form here also
writes the legacy layer names, as symbolic links to the blobs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.indexer.docker_archive import DockerArchiveSource, parse_archive_reference
from lazyfs.indexer.errors import UsageError
from lazyfs.indexer.manifest import Descriptor
from lazyfs.store import open_store
from tests.support import oci
from tests.support.oci import directory, file, symlink

LOWER = [directory("usr"), directory("usr/bin"), file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
         symlink("bin", "usr/bin"), file("etc/old", b"old\n"), file("usr/share/big", bytes(range(256)) * 4096)]
UPPER = [oci.whiteout("etc/old"), file("etc/new", b"new\n", uid=1000, gid=1000)]
EXPECTED_PATHS = {b"usr", b"usr/bin", b"usr/bin/tool", b"bin", b"etc", b"etc/new", b"usr/share",
                  b"usr/share/big"}


@dataclass
class ArchiveImage:
    """One image for ``write_archive``: layers as tar bytes, each stored compressed or not."""

    layers: list[list[oci.Entry]]
    repo_tags: list[str]
    compression: list[str] | None = None
    config: dict | None = None
    diff_ids: list[str] | None = None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def _add_symlink(archive: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    archive.addfile(info)


def write_archive(path: Path, images: list[ArchiveImage], blobs_layout: bool = False,
                  list_links: bool = False) -> list[str]:
    """Write a docker save archive of ``images``; return each image's config member name.

    ``list_links`` makes manifest.json name the layers by their legacy links
    instead of their ``blobs/`` members.
    """
    manifest = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        written: set[str] = set()
        for image in images:
            tars = [oci.tar_bytes(entries) for entries in image.layers]
            compression = image.compression or ["none"] * len(tars)
            diff_ids = image.diff_ids or ["sha256:" + _sha256(tar) for tar in tars]
            config = {"architecture": "amd64", "os": "linux",
                      "config": image.config if image.config is not None else {"Cmd": ["/bin/sh"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}
            config_bytes = json.dumps(config, sort_keys=True).encode()
            config_name = (f"blobs/sha256/{_sha256(config_bytes)}" if blobs_layout
                           else f"{_sha256(config_bytes)}.json")
            layer_names = []
            for number, (tar, kind) in enumerate(zip(tars, compression)):
                blob = oci.compress(tar, kind)
                legacy = f"{_sha256(tar + bytes([number]))}/layer.tar"
                if blobs_layout:
                    name = f"blobs/sha256/{_sha256(blob)}"
                    if name not in written:
                        _add(archive, name, blob)
                        written.add(name)
                    _add_symlink(archive, legacy, f"../{name}")
                    if list_links:
                        name = legacy
                else:
                    name = legacy
                    _add(archive, name, blob)
                layer_names.append(name)
            if config_name not in written:
                _add(archive, config_name, config_bytes)
                written.add(config_name)
            manifest.append({"Config": config_name, "RepoTags": image.repo_tags, "Layers": layer_names})
        _add(archive, "manifest.json", json.dumps(manifest).encode())
    return [entry["Config"] for entry in manifest]


def index(tmp_path: Path, source: str, *extra: str) -> oci.IndexerRun:
    return oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--json", *extra, source)


def tree(tmp_path: Path, run: oci.IndexerRun) -> oci.TreeView:
    return oci.TreeView(open_store((tmp_path / "store").as_uri()), run.result["manifest_digest"])


def check_two_layer_tree(view: oci.TreeView) -> None:
    assert view.paths() == EXPECTED_PATHS
    assert view.read(b"usr/bin/tool") == b"#!/bin/sh\necho tool\n"
    assert view.inode(b"usr/bin/tool").mode & 0o777 == 0o755
    assert view.read(b"usr/share/big") == bytes(range(256)) * 4096
    assert view.readlink(b"bin") == b"usr/bin"
    assert view.read(b"etc/new") == b"new\n"
    assert (view.inode(b"etc/new").uid, view.inode(b"etc/new").gid) == (1000, 1000)


def test_legacy_archive_indexes_tree(tmp_path):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER], ["team/app:v1"],
                                         config={"Cmd": ["/usr/bin/tool"], "Env": ["A=1"]})])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 0, run.stderr
    assert run.result["names"] == ["team/app:v1"]
    assert run.result["layers"] == 2
    view = tree(tmp_path, run)
    check_two_layer_tree(view)
    assert view.index.config["config"] == {"Cmd": ["/usr/bin/tool"], "Env": ["A=1"]}


def test_blobs_layout_with_links(tmp_path):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER], ["team/app:v1"])], blobs_layout=True)

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 0, run.stderr
    check_two_layer_tree(tree(tmp_path, run))


def test_layers_named_by_links(tmp_path):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER], ["team/app:v1"], compression=["gzip", "none"])],
                  blobs_layout=True, list_links=True)

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 0, run.stderr
    check_two_layer_tree(tree(tmp_path, run))


def test_link_loop_is_image_error(tmp_path):
    archive = tmp_path / "image.tar"
    tar = oci.tar_bytes(LOWER)
    with tarfile.open(archive, "w") as output:
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + _sha256(tar)]}}).encode()
        _add(output, "c.json", config)
        _add_symlink(output, "a/layer.tar", "../b/layer.tar")
        _add_symlink(output, "b/layer.tar", "../a/layer.tar")
        _add(output, "manifest.json", json.dumps([{"Config": "c.json", "RepoTags": ["team/app:v1"],
                                                   "Layers": ["a/layer.tar"]}]).encode())

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive}: layer a/layer.tar: more than 8 "
                          "links from member 'a/layer.tar'\n")


def test_legacy_names_as_links_index_the_same(tmp_path):
    legacy, blobs = tmp_path / "legacy.tar", tmp_path / "blobs.tar"
    write_archive(legacy, [ArchiveImage([LOWER, UPPER], ["team/app:v1"])])
    write_archive(blobs, [ArchiveImage([LOWER, UPPER], ["team/app:v1"])], blobs_layout=True)

    first = index(tmp_path, f"docker-archive:{legacy}")
    second = index(tmp_path, f"docker-archive:{blobs}")

    assert first.code == 0, first.stderr
    assert second.code == 0, second.stderr
    assert second.result["index_digest"] == first.result["index_digest"]
    assert second.result["chunks_new"] == 0


@pytest.mark.parametrize("compression", [["gzip", "gzip"], ["zstd", "none"], ["none", "gzip"]])
def test_compressed_layers_are_detected(tmp_path, compression):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER], ["team/app:v1"], compression=compression)])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 0, run.stderr
    check_two_layer_tree(tree(tmp_path, run))


def test_reindex_gives_same_digests(tmp_path):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER], ["team/app:v1"], compression=["gzip", "none"])])

    first = index(tmp_path, f"docker-archive:{archive}")
    second = index(tmp_path, f"docker-archive:{archive}")

    assert first.code == 0, first.stderr
    assert second.result["manifest_digest"] == first.result["manifest_digest"]
    assert second.result["index_digest"] == first.result["index_digest"]
    assert second.result["chunks_new"] == 0


def two_image_archive(tmp_path: Path) -> Path:
    archive = tmp_path / "two.tar"
    write_archive(archive, [
        ArchiveImage([LOWER, UPPER], ["team/app:v1", "team/app:latest"]),
        ArchiveImage([[file("only-in-v2", b"v2\n")]], ["localhost:5000/team/other:v2"]),
    ])
    return archive


def test_reference_selects_image(tmp_path):
    archive = two_image_archive(tmp_path)

    run = index(tmp_path, f"docker-archive:{archive}:localhost:5000/team/other:v2")

    assert run.code == 0, run.stderr
    assert run.result["names"] == ["localhost:5000/team/other:v2"]
    view = tree(tmp_path, run)
    assert view.paths() == {b"only-in-v2"}
    assert view.read(b"only-in-v2") == b"v2\n"


def test_reference_picks_one_of_two_tags(tmp_path):
    archive = two_image_archive(tmp_path)

    run = index(tmp_path, f"docker-archive:{archive}:team/app:latest")

    assert run.code == 0, run.stderr
    assert run.result["names"] == ["team/app:latest"]
    check_two_layer_tree(tree(tmp_path, run))


def test_every_repo_tag_is_published(tmp_path):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER], ["team/app:v1", "team/app:latest"])])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 0, run.stderr
    assert run.result["names"] == ["team/app:v1", "team/app:latest"]
    store = open_store((tmp_path / "store").as_uri())
    assert oci.TreeView(store, "team/app:latest").digest == run.result["index_digest"]
    assert oci.TreeView(store, "team/app:v1").digest == run.result["index_digest"]


def test_several_images_need_reference(tmp_path):
    archive = two_image_archive(tmp_path)

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 2
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive} contains 2 images; choose one "
                          "with docker-archive:PATH:REPO:TAG (tags: localhost:5000/team/other:v2, "
                          "team/app:latest, team/app:v1)\n")


def test_unknown_tag_is_source_error(tmp_path):
    archive = two_image_archive(tmp_path)

    run = index(tmp_path, f"docker-archive:{archive}:team/app:v9")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive}:team/app:v9: tag 'team/app:v9' not "
                          "found in manifest.json (tags: localhost:5000/team/other:v2, team/app:latest, "
                          "team/app:v1)\n")


def test_diff_id_mismatch_is_image_error(tmp_path):
    archive = tmp_path / "image.tar"
    wrong = "sha256:" + "0" * 64
    write_archive(archive, [ArchiveImage([LOWER], ["team/app:v1"], compression=["gzip"], diff_ids=[wrong])])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert "uncompressed content (diff_id sha256:" + "0" * 64 + ")" in run.stderr
    store = open_store((tmp_path / "store").as_uri())
    assert store.list("indexes/") == []
    assert store.list("refs/") == []


def test_uncompressed_layer_not_matching_diff_id(tmp_path):
    archive = tmp_path / "image.tar"
    wrong = "sha256:" + "1" * 64
    write_archive(archive, [ArchiveImage([LOWER], ["team/app:v1"], diff_ids=[wrong])])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert f"not {wrong}" in run.stderr
    assert open_store((tmp_path / "store").as_uri()).list("refs/") == []


def test_layer_count_must_match_config(tmp_path):
    archive = tmp_path / "image.tar"
    tar = oci.tar_bytes(LOWER)
    write_archive(archive, [ArchiveImage([LOWER], ["team/app:v1"],
                                         diff_ids=["sha256:" + _sha256(tar)] * 2)])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive}: manifest.json lists 1 layers, "
                          "but the image config has 2 rootfs.diff_ids\n")


def test_missing_layer_member(tmp_path):
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "2" * 64]}}).encode()
        _add(tar, "c.json", config)
        _add(tar, "manifest.json", json.dumps([{"Config": "c.json", "RepoTags": None,
                                                "Layers": ["../etc/passwd"]}]).encode())

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive}: layer ../etc/passwd: member "
                          "'../etc/passwd' is missing from the archive\n")


def test_not_a_docker_save_archive(tmp_path):
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "hello", b"hi\n")

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive}: manifest.json is missing; "
                          "is this a docker save archive?\n")


def test_truncated_archive_is_image_error(tmp_path):
    whole = tmp_path / "whole.tar"
    write_archive(whole, [ArchiveImage([LOWER, UPPER], ["team/app:v1"])], blobs_layout=True)
    with tarfile.open(whole) as tar:
        largest = max(tar.getmembers(), key=lambda member: member.size)
    archive = tmp_path / "image.tar"
    archive.write_bytes(whole.read_bytes()[:largest.offset_data + largest.size // 2])

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert run.stderr == (f"lazyfs-index: error: docker-archive:{archive}: the archive is truncated or "
                          "damaged (unexpected end of data); write it again with docker save\n")
    assert open_store((tmp_path / "store").as_uri()).list("") == []


def test_gzipped_archive_is_rejected(tmp_path):
    plain = tmp_path / "image.tar"
    write_archive(plain, [ArchiveImage([LOWER], ["team/app:v1"])])
    archive = tmp_path / "image.tar.gz"
    archive.write_bytes(gzip.compress(plain.read_bytes()))

    run = index(tmp_path, f"docker-archive:{archive}")

    assert run.code == 3
    assert run.stderr.startswith(f"lazyfs-index: error: docker-archive:{archive}: not an uncompressed "
                                 "tar archive (")


def test_tag_option_is_rejected(tmp_path):
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER], ["team/app:v1"])])

    run = index(tmp_path, f"docker-archive:{archive}", "--tag", "v1")

    assert run.code == 2
    assert run.stderr == "lazyfs-index: error: --tag applies to OCI layouts; use docker-archive:PATH:REPO:TAG\n"


def test_parse_reference_with_colon_in_path(tmp_path):
    archive = tmp_path / "a:b.tar"
    archive.write_bytes(b"")

    assert parse_archive_reference(f"docker-archive:{archive}") == (str(archive), None)
    assert parse_archive_reference(f"docker-archive:{archive}:team/app:v1") == (str(archive), "team/app:v1")
    assert parse_archive_reference(f"docker-archive:{archive}:host:5000/app:v1") == (
        str(archive), "host:5000/app:v1")


@pytest.mark.parametrize("suffix", [":team/app", ":host:5000/app", ":app:"])
def test_parse_reference_without_tag(tmp_path, suffix):
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"")

    with pytest.raises(UsageError, match="needs the form REPO:TAG"):
        parse_archive_reference(f"docker-archive:{archive}{suffix}")


def test_parse_reference_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such archive file"):
        parse_archive_reference(f"docker-archive:{tmp_path}/missing.tar:team/app:v1")


def test_concurrent_member_reads_get_own_bytes(tmp_path):
    """Check that threads reading different layers at once each get their own member's bytes."""
    archive = tmp_path / "image.tar"
    write_archive(archive, [ArchiveImage([LOWER, UPPER, [file("opt/more", bytes(range(7, 256)) * 8192)]],
                                         ["team/app:v1"])], blobs_layout=True)
    source = DockerArchiveSource(str(archive), None)
    layers = json.loads(source.resolve().data)["layers"]
    expected = {}
    with tarfile.open(archive) as plain:
        for layer in layers:
            expected[layer["digest"]] = plain.extractfile("blobs/sha256/" + layer["digest"][7:]).read()

    def read_small_pieces(digest: str) -> bytes:
        pieces = []
        with source.open_blob(Descriptor("", digest, 0)) as stream:
            while piece := stream.read(512):
                pieces.append(piece)
        return b"".join(pieces)

    try:
        for _round in range(5):
            with ThreadPoolExecutor(len(layers)) as pool:
                got = dict(zip(expected, pool.map(read_small_pieces, expected)))
            assert {digest: _sha256(data) for digest, data in got.items()} == \
                {digest: _sha256(data) for digest, data in expected.items()}
    finally:
        source.close()
