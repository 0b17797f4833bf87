"""The indexing pipeline end to end: compression, verification, determinism, refs, CLI errors."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import zstandard

from lazyfs.index import Index
from lazyfs.indexer import mediatypes
from lazyfs.refs import index_key, name_key, resolve
from lazyfs.store import open_store
from tests.support import oci
from tests.support.oci import Layer, directory, file, symlink

LOWER = [directory("etc"), file("etc/hostname", b"lazyfs\n"), file("etc/gone", b"x"),
         symlink("etc/link", "hostname"), file("bin/big", random.Random(5).randbytes(700_000), mode=0o755)]
UPPER = [oci.whiteout("etc/gone"), file("etc/new", b"new\n")]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def assert_nothing_published(store_url: str) -> None:
    store = open_store(store_url)
    assert store.list("indexes/") == []
    assert store.list("refs/") == []


def assert_one_line_error(run: oci.IndexerRun, code: int, *fragments: str) -> None:
    assert run.code == code
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("lazyfs-index: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layer_compressions(tmp_path, store_url, compression):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER, compression=compression),
                                                  Layer(UPPER, compression=compression)])

    run = oci.run_indexer("--store", store_url, "--json", image.source)

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), image.manifest_digest)
    assert tree.paths() == {b"etc", b"etc/hostname", b"etc/link", b"etc/new", b"bin", b"bin/big"}
    assert tree.read(b"etc/hostname") == b"lazyfs\n"
    assert tree.read(b"bin/big") == LOWER[-1].data
    assert tree.index.config["source"] == {
        "mediaType": mediatypes.OCI_MANIFEST, "manifest": image.manifest_digest,
        "config": image.config_digest, "layers": image.layer_digests, "platform": "linux/amd64"}


def test_docker_schema2_image(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER), Layer(UPPER)], docker=True)

    run = oci.run_indexer("--store", store_url, image.source)

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), image.manifest_digest)
    assert tree.read(b"etc/new") == b"new\n"
    assert tree.index.config["source"]["mediaType"] == mediatypes.DOCKER_MANIFEST


def test_runtime_config_is_copied(tmp_path, store_url):
    settings = {"Entrypoint": ["/bin/tini", "--"], "Cmd": ["python3"], "Env": ["PATH=/usr/bin", "A=b"],
                "WorkingDir": "/work", "User": "1000:100", "ExposedPorts": {"8888/tcp": {}},
                "Labels": {"org.example": "yes"}, "Healthcheck": {"Test": ["NONE"]}}
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)], config=settings)

    run = oci.run_indexer("--store", store_url, image.source)

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), image.manifest_digest)
    expected = dict(settings)
    del expected["Healthcheck"]
    assert tree.index.config["config"] == expected


def test_second_run_same_index_no_uploads(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER), Layer(UPPER)])

    first = oci.run_indexer("--store", store_url, "--json", image.source)
    second = oci.run_indexer("--store", store_url, "--json", image.source)

    assert first.code == 0, first.stderr
    assert second.code == 0, second.stderr
    assert first.result["index_digest"] == second.result["index_digest"]
    assert first.result["chunks_new"] > 0
    assert first.result["chunks_reused"] == 0
    assert second.result["chunks_new"] == 0
    assert second.result["bytes_stored"] == 0
    assert second.result["chunks_reused"] == first.result["chunks_new"]
    assert second.result["refs"] == []


def test_index_independent_of_paths(tmp_path):
    runs = []
    for name in ("one", "two"):
        image = oci.write_image(tmp_path / name / "layout", [Layer(LOWER), Layer(UPPER)], tag=name)
        runs.append(oci.run_indexer("--store", (tmp_path / name / "store").as_uri(), "--json", image.source))

    assert [run.code for run in runs] == [0, 0]
    assert runs[0].result["index_digest"] == runs[1].result["index_digest"]


def test_json_summary(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER), Layer(UPPER)], tag="v1")

    run = oci.run_indexer("--store", store_url, "--json", image.source)

    assert run.code == 0, run.stderr
    result = run.result
    store = open_store(store_url)
    assert result["manifest_digest"] == image.manifest_digest
    assert store.list("indexes/") == [index_key(result["index_digest"])]
    assert result["names"] == ["v1"]
    assert result["refs"] == [f"refs/manifests/sha256/{image.manifest_digest[7:]}", name_key("v1")]
    assert result["layers"] == 2
    assert result["entries"] == len(LOWER) + len(UPPER)
    # etc/hostname, bin/big, etc/new; etc/gone is whited out.
    assert result["files"] == 3
    assert result["file_bytes"] == len(b"lazyfs\n") + 700_000 + len(b"new\n")
    assert result["chunks"] == Index(store.get(index_key(result["index_digest"]))).chunk_count
    assert result["index_bytes"] == len(store.get(index_key(result["index_digest"])))


def test_text_summary(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])

    run = oci.run_indexer("--store", store_url, image.source)

    assert run.code == 0, run.stderr
    assert run.stdout.startswith(f"indexed {image.manifest_digest} (linux/amd64, 1 layers)\n")
    assert "  names     latest\n" in run.stdout


def test_names_publish_refs(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])

    run = oci.run_indexer("--store", store_url, "--json", "--name", "example/app:1",
                          "--name", "example/app:latest", image.source)

    assert run.code == 0, run.stderr
    store = open_store(store_url)
    digest = run.result["index_digest"]
    assert resolve(store, "example/app:1") == digest
    assert resolve(store, "example/app:latest") == digest
    assert resolve(store, image.manifest_digest) == digest
    assert sorted(store.list("refs/names/")) == sorted([name_key("example/app:1"), name_key("example/app:latest")])


def test_store_from_environment(tmp_path, monkeypatch):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    monkeypatch.setenv("LAZYFS_STORE", (tmp_path / "env-store").as_uri())

    run = oci.run_indexer(image.source)

    assert run.code == 0, run.stderr
    assert len(open_store((tmp_path / "env-store").as_uri()).list("indexes/")) == 1


def test_layout_directory_with_tag_option(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)], tag="v2")

    run = oci.run_indexer("--store", store_url, "--json", "--tag", "v2", str(image.layout))

    assert run.code == 0, run.stderr
    assert run.result["manifest_digest"] == image.manifest_digest


def test_layout_by_digest(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)], tag=None)

    run = oci.run_indexer("--store", store_url, "--json", f"oci:{image.layout}@{image.manifest_digest}")

    assert run.code == 0, run.stderr
    assert run.result["manifest_digest"] == image.manifest_digest
    assert run.result["names"] == []


# -- platforms ---------------------------------------------------------------


def write_two_platforms(layout: Path) -> tuple[oci.Image, oci.Image]:
    amd64 = oci.write_image(layout, [Layer([file("arch", b"amd64")])], tag=None)
    arm64 = oci.write_image(layout, [Layer([file("arch", b"arm64")])], tag=None, platform=("linux", "arm64"))
    oci.write_image_index(layout, [(amd64, {"os": "linux", "architecture": "amd64"}),
                                   (arm64, {"os": "linux", "architecture": "arm64", "variant": "v8"})],
                          tag="multi")
    return amd64, arm64


@pytest.mark.parametrize("platform, expected", [("linux/amd64", b"amd64"), ("linux/arm64", b"arm64"),
                                                ("linux/arm64/v8", b"arm64")])
def test_platform_selection(tmp_path, store_url, platform, expected):
    write_two_platforms(tmp_path / "layout")

    run = oci.run_indexer("--store", store_url, "--json", "--platform", platform,
                          f"oci:{tmp_path / 'layout'}:multi")

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store(store_url), run.result["manifest_digest"])
    assert tree.read(b"arch") == expected


def test_missing_platform_lists_available_ones(tmp_path, store_url):
    write_two_platforms(tmp_path / "layout")

    run = oci.run_indexer("--store", store_url, "--platform", "linux/s390x", f"oci:{tmp_path / 'layout'}:multi")

    assert_one_line_error(run, 3, "no manifest for platform linux/s390x",
                          "the index has linux/amd64, linux/arm64/v8")
    assert_nothing_published(store_url)


def test_explicit_platform_must_match_single_image(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)], platform=("linux", "arm64"))

    run = oci.run_indexer("--store", store_url, "--platform", "linux/amd64", image.source)

    assert_one_line_error(run, 3, "the image is for linux/arm64, not linux/amd64")
    assert_nothing_published(store_url)


# -- bad input -----------------------------------------------------------------


def test_layer_bytes_not_matching_digest(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER), Layer(UPPER)])
    path = image.blob_path(image.layer_digests[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    oci.replace_blob(image.layout, image.layer_digests[1], bytes(data))

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 2 of 2 ({image.layer_digests[1]})", "content has digest sha256:",
                          f"not {image.layer_digests[1]}")
    assert_nothing_published(store_url)


def test_uncompressed_layer_bytes_not_matching_digest(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER, compression="none")])
    tar = image.blob_path(image.layer_digests[0]).read_bytes()
    oci.replace_blob(image.layout, image.layer_digests[0], tar.replace(b"lazyfs\n", b"hacked\n"))

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 1 of 1 ({image.layer_digests[0]})", "content has digest")
    assert_nothing_published(store_url)


def test_truncated_layer_blob(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    blob = image.blob_path(image.layer_digests[0]).read_bytes()
    oci.replace_blob(image.layout, image.layer_digests[0], blob[:len(blob) // 2])

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 1 of 1 ({image.layer_digests[0]}) ended after "
                                  f"{len(blob) // 2} of the {len(blob)} bytes its descriptor declares")
    assert_nothing_published(store_url)


def test_overlong_layer_blob(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    blob = image.blob_path(image.layer_digests[0]).read_bytes()
    oci.replace_blob(image.layout, image.layer_digests[0], blob + b"\0" * 100)

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 1 of 1 ({image.layer_digests[0]}) is longer than the "
                                  f"{len(blob)} bytes its descriptor declares")
    assert_nothing_published(store_url)


def test_truncated_gzip_stream_with_matching_digest(tmp_path, store_url):
    compressed = gzip.compress(oci.tar_bytes(LOWER), mtime=0)
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER, blob=compressed[:-40])])

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 1 of 1 ({image.layer_digests[0]}): invalid gzip data: "
                                  "Compressed file ended before the end-of-stream marker was reached")
    assert_nothing_published(store_url)


def test_truncated_zstd_stream_fails_diff_id_check(tmp_path, store_url):
    compressed = zstandard.ZstdCompressor().compress(oci.tar_bytes(LOWER))
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER, compression="zstd", blob=compressed[:-100])])

    run = oci.run_indexer("--store", store_url, image.source)

    assert run.code == 3
    assert f"layer 1 of 1 ({image.layer_digests[0]})" in run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert_nothing_published(store_url)


def test_diff_id_mismatch(tmp_path, store_url):
    wrong = "sha256:" + "0" * 64
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER, diff_id=wrong)])

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 1 of 1 ({image.layer_digests[0]}): uncompressed content "
                                  f"(diff_id {wrong}): content has digest")
    assert_nothing_published(store_url)


def test_config_bytes_not_matching_digest(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    config = image.blob_path(image.config_digest).read_bytes()
    oci.replace_blob(image.layout, image.config_digest, config.replace(b"/bin/sh", b"/bin/xx"))

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"image config {image.config_digest}: content has digest")
    assert_nothing_published(store_url)


def test_manifest_bytes_not_matching_digest(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    manifest = image.blob_path(image.manifest_digest).read_bytes()
    oci.replace_blob(image.layout, image.manifest_digest, manifest.replace(b'"size"', b'"size" '))

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"manifest {image.manifest_digest}")
    assert_nothing_published(store_url)


@pytest.mark.parametrize("blob_compression, media_compression, message", [
    ("zstd", "gzip", "the media type declares gzip, but the blob does not start with the gzip magic number"),
    ("gzip", "zstd", "the media type declares zstd, but the blob does not start with the zstd magic number"),
    ("gzip", "none", "the media type declares an uncompressed tar, but the blob is gzip-compressed"),
])
def test_compression_must_match_media_type(tmp_path, store_url, blob_compression, media_compression, message):
    blob = oci.compress(oci.tar_bytes(LOWER), blob_compression)
    image = oci.write_image(tmp_path / "layout", [
        Layer(LOWER, blob=blob, media_type=oci.LAYER_MEDIA_TYPES[media_compression])])

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer 1 of 1 ({image.layer_digests[0]}): {message}")
    assert_nothing_published(store_url)


def test_unknown_layer_media_type(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER, media_type="application/x-tar+brotli")])

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer {image.layer_digests[0]} has unsupported media type "
                                  "'application/x-tar+brotli'")
    assert_nothing_published(store_url)


def test_garbage_tar_stream(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(tar=b"not a tar archive" * 100)])

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 3, f"layer sha256:{image.layer_digests[0][7:]}: invalid tar stream")
    assert_nothing_published(store_url)


def test_diff_ids_must_match_layer_count(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    config = json.loads(image.blob_path(image.config_digest).read_bytes())
    config["rootfs"]["diff_ids"].append("sha256:" + "1" * 64)
    config_bytes = json.dumps(config).encode()
    manifest = json.loads(image.blob_path(image.manifest_digest).read_bytes())
    manifest["config"].update(digest=oci.write_blob(image.layout, config_bytes), size=len(config_bytes))
    manifest_bytes = json.dumps(manifest).encode()
    oci.add_to_index(image.layout, {"mediaType": oci.OCI_MANIFEST, "digest": oci.write_blob(image.layout, manifest_bytes),
                                    "size": len(manifest_bytes)}, "bad")

    run = oci.run_indexer("--store", store_url, f"oci:{image.layout}:bad")

    assert_one_line_error(run, 3, "lists 1 layers, but image config", "has 2 rootfs.diff_ids")
    assert_nothing_published(store_url)


def test_duplicate_json_key_is_rejected(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    manifest = image.blob_path(image.manifest_digest).read_bytes()
    doubled = manifest[:-1] + b', "schemaVersion": 2}'
    oci.add_to_index(image.layout, {"mediaType": oci.OCI_MANIFEST, "digest": oci.write_blob(image.layout, doubled),
                                    "size": len(doubled)}, "dup")

    run = oci.run_indexer("--store", store_url, f"oci:{image.layout}:dup")

    assert_one_line_error(run, 3, "duplicate JSON key 'schemaVersion'")


def test_non_sha256_digest_is_rejected(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    manifest = json.loads(image.blob_path(image.manifest_digest).read_bytes())
    manifest["layers"][0]["digest"] = "sha512:" + "a" * 128
    data = json.dumps(manifest).encode()
    oci.add_to_index(image.layout, {"mediaType": oci.OCI_MANIFEST, "digest": oci.write_blob(image.layout, data),
                                    "size": len(data)}, "sha512")

    run = oci.run_indexer("--store", store_url, f"oci:{image.layout}:sha512")

    assert_one_line_error(run, 3, "uses algorithm sha512; only sha256 digests can be verified")


def test_missing_layer_blob(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    image.blob_path(image.layer_digests[0]).unlink()

    run = oci.run_indexer("--store", store_url, image.source)

    assert_one_line_error(run, 4, f"blob {image.layer_digests[0]} is missing from layout")
    assert_nothing_published(store_url)


def test_missing_tag(tmp_path, store_url):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)], tag="v1")

    run = oci.run_indexer("--store", store_url, f"oci:{image.layout}:v2")

    assert_one_line_error(run, 4, "tag 'v2' not found", "(tags: v1)")


def test_not_a_layout(tmp_path, store_url):
    (tmp_path / "empty").mkdir()

    run = oci.run_indexer("--store", store_url, f"oci:{tmp_path / 'empty'}:latest")

    assert_one_line_error(run, 4, "is not an OCI image layout", "oci-layout is missing")


@pytest.mark.parametrize("args, message", [
    (["ftp://example.invalid/x"], "unsupported source"),
    (["docker://registry.invalid"], "expected docker://HOST[:PORT]/REPO[:TAG|@DIGEST]"),
    (["docker://registry.invalid/Upper/Case"], "invalid repository 'Upper/Case'"),
    (["docker://registry.invalid:99999/repo"], "invalid host"),
    (["docker://registry.invalid/repo@sha256:abc"], "invalid sha256 digest"),
    (["--tag", "x", "docker://registry.invalid/repo:1"], "--tag applies to OCI layouts"),
    (["--password-stdin", "docker://registry.invalid/repo"], "--password-stdin needs --username"),
    (["--username", "u", "docker://registry.invalid/repo"], "--username needs --password-stdin"),
    (["--plain-http", "oci:/nonexistent:tag"], "--plain-http applies to docker:// sources only"),
    (["--store", "ftp://x/y", "oci:/nonexistent:tag"], "unsupported store URL"),
])
def test_usage_errors(args, message):
    run = oci.run_indexer(*args)

    assert_one_line_error(run, 2, message)


def test_bad_platform_argument_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        oci.run_indexer("--platform", "linux", "oci:/nonexistent")

    assert exit_info.value.code == 2


def test_store_write_failure_exits_5(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer(LOWER)])
    (tmp_path / "not-a-directory").write_text("")

    run = oci.run_indexer("--store", (tmp_path / "not-a-directory" / "store").as_uri(), image.source)

    assert_one_line_error(run, 5, "writing chunks/")
