"""Indexing from a real registry (docker-registry on loopback) into an S3 store (moto)."""

from __future__ import annotations

import socket

import pytest

from lazyfs.indexer.errors import UsageError
from lazyfs.indexer.registry import RegistryOptions, RegistrySource, is_loopback_host, parse_challenge
from lazyfs.refs import resolve
from lazyfs.store import StoreOptions, open_store
from tests.support import oci
from tests.support.net import free_port
from tests.support.oci import Layer, directory, file, hardlink, symlink

LOWER = [directory("usr"), directory("usr/bin"), file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
         hardlink("usr/bin/tool2", "usr/bin/tool"), symlink("bin", "usr/bin"),
         file("usr/share/big", bytes(range(256)) * 4096)]
UPPER = [oci.whiteout("usr/bin/tool2"), file("etc/new", b"new\n")]


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    """A two-layer image (gzip and zstd layers) pushed as lazyfs/test:v1."""
    layout = tmp_path_factory.mktemp("registry-image") / "layout"
    image = oci.write_image(layout, [Layer(LOWER), Layer(UPPER, compression="zstd")], tag="v1")
    digest = registry.push(layout, "v1", "lazyfs/test", "v1")
    assert digest == image.manifest_digest
    return image


def s3_store_args(s3_server, bucket: str) -> list[str]:
    return ["--store", f"s3://{bucket}/images", "--endpoint-url", s3_server.endpoint_url]


def test_index_from_registry_into_s3(registry, pushed, s3_server, s3_bucket):
    run = oci.run_indexer(*s3_store_args(s3_server, s3_bucket), "--plain-http", "--json",
                          f"docker://{registry.host}/lazyfs/test:v1")

    assert run.code == 0, run.stderr
    assert run.result["manifest_digest"] == pushed.manifest_digest
    assert run.result["names"] == [f"{registry.host}/lazyfs/test:v1"]
    store = open_store(f"s3://{s3_bucket}/images", StoreOptions(endpoint_url=s3_server.endpoint_url))
    assert resolve(store, f"{registry.host}/lazyfs/test:v1") == run.result["index_digest"]
    tree = oci.TreeView(store, pushed.manifest_digest)
    assert tree.paths() == {b"usr", b"usr/bin", b"usr/bin/tool", b"bin", b"usr/share",
                            b"usr/share/big", b"etc", b"etc/new"}
    assert tree.read(b"usr/share/big") == bytes(range(256)) * 4096
    assert tree.inode(b"usr/bin/tool").nlink == 1
    assert tree.readlink(b"bin") == b"usr/bin"


def test_registry_and_layout_give_same_index(registry, pushed, s3_server, s3_bucket, tmp_path):
    from_registry = oci.run_indexer(*s3_store_args(s3_server, s3_bucket), "--plain-http", "--json",
                                    f"docker://{registry.host}/lazyfs/test@{pushed.manifest_digest}")
    from_layout = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--json", pushed.source)

    assert from_registry.code == 0, from_registry.stderr
    assert from_layout.code == 0, from_layout.stderr
    assert from_registry.result["index_digest"] == from_layout.result["index_digest"]
    assert from_registry.result["names"] == [f"{registry.host}/lazyfs/test@{pushed.manifest_digest}"]


def test_registry_second_run_reuses_every_chunk(registry, pushed, s3_server, s3_bucket):
    args = [*s3_store_args(s3_server, s3_bucket), "--plain-http", "--json",
            f"docker://{registry.host}/lazyfs/test:v1"]

    first = oci.run_indexer(*args)
    second = oci.run_indexer(*args)

    assert first.code == 0, first.stderr
    assert second.code == 0, second.stderr
    assert second.result["index_digest"] == first.result["index_digest"]
    assert second.result["chunks_new"] == 0
    assert second.result["chunks_reused"] == first.result["chunks_new"]


def test_missing_tag_is_source_error(registry, pushed, tmp_path):
    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http",
                          f"docker://{registry.host}/lazyfs/test:no-such-tag")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: manifest {registry.host}/lazyfs/test:no-such-tag: "
                          "not found in the registry (HTTP 404)\n")
    assert open_store((tmp_path / "store").as_uri()).list("") == []


def test_unreachable_registry_is_source_error(tmp_path):
    port = free_port()

    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http", "--timeout", "2",
                          "--retries", "2", f"docker://127.0.0.1:{port}/lazyfs/test:v1")

    assert run.code == 4
    assert run.stderr.startswith(f"lazyfs-index: error: manifest 127.0.0.1:{port}/lazyfs/test:v1: "
                                 f"request to http://127.0.0.1:{port}/v2/lazyfs/test/manifests/v1 "
                                 "failed after 3 attempts")


@pytest.mark.parametrize("host", ["registry.invalid", "registry.invalid:5000", "10.0.0.1:5000",
                                  "[fe80::1]:5000", "localhost.invalid"])
def test_plain_http_rejected_for_remote_host(host, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)

    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http",
                          f"docker://{host}/lazyfs/test:v1")

    assert run.code == 2
    assert run.stderr == (f"lazyfs-index: error: --plain-http is allowed only for loopback registries "
                          f"(127.0.0.0/8, ::1, localhost), not {host!r}; use HTTPS\n")
    assert attempts == []


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("::ffff:127.0.0.1", True), ("128.0.0.1", False), ("0.0.0.0", False),
    ("10.0.0.1", False), ("localhost.example", False), ("example.invalid", False), ("", False),
])
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


def test_parse_challenge():
    header = 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'

    assert parse_challenge(header) == ("bearer", {
        "realm": "https://auth.example/token", "service": "registry.example",
        "scope": "repository:a/b:pull,push"})
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge('Bearer realm="a\\"b", error=invalid_token') == (
        "bearer", {"realm": 'a"b', "error": "invalid_token"})


@pytest.mark.parametrize("reference, host, repository, tag, digest", [
    ("docker://127.0.0.1:5000/repo", "127.0.0.1:5000", "repo", "latest", None),
    ("docker://127.0.0.1:5000/org/repo:1.2-rc_3", "127.0.0.1:5000", "org/repo", "1.2-rc_3", None),
    ("docker://localhost/a/b/c@sha256:" + "a" * 64, "localhost", "a/b/c", None, "sha256:" + "a" * 64),
    ("docker://[::1]:5000/x__y.z-w:t", "[::1]:5000", "x__y.z-w", "t", None),
])
def test_parse_registry_reference(reference, host, repository, tag, digest):
    source = RegistrySource.from_reference(reference, RegistryOptions())

    assert (source.host, source.repository, source.tag, source.digest) == (host, repository, tag, digest)


@pytest.mark.parametrize("reference", [
    "docker://repo", "docker:///repo", "docker://host/", "docker://host/Repo", "docker://host/repo:",
    "docker://host/repo:bad/tag", "docker://host/repo@sha256:xyz", "docker://user@host/repo",
])
def test_invalid_registry_reference(reference):
    with pytest.raises(UsageError):
        RegistrySource.from_reference(reference, RegistryOptions())
