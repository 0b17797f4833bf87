"""Stores: the local directory store and the S3 store with its retry policy."""

from __future__ import annotations

import os
import time
import urllib.parse

import pytest

from lazyfs.errors import ObjectNotFound, StoreError, StoreUnavailable
from lazyfs.store import FileStore, StoreOptions, open_store
from tests.support.faultproxy import FaultProxy
from tests.support.net import free_port

FAST_RETRIES = StoreOptions(max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05,
                            connect_timeout_s=1.0, read_timeout_s=1.0)


def test_file_store_roundtrip(tmp_path):
    store = open_store((tmp_path / "store").as_uri())

    store.put("chunks/ab", b"payload")

    assert store.get("chunks/ab") == b"payload"
    assert store.exists("chunks/ab")
    assert not store.exists("chunks/cd")
    assert (tmp_path / "store" / "chunks" / "ab").stat().st_mode & 0o777 == 0o644
    assert store.list("chunks/") == ["chunks/ab"]
    assert store.list("refs/") == []


def test_file_store_missing_object(tmp_path):
    store = FileStore(tmp_path)

    with pytest.raises(ObjectNotFound) as caught:
        store.get("indexes/00")

    assert caught.value.key == "indexes/00"


def test_file_store_rejects_unsafe_keys(tmp_path):
    store = FileStore(tmp_path / "store")

    for key in ("../escape", "/abs", "chunks/../../x", "chunks//x", ""):
        with pytest.raises(ValueError):
            store.put(key, b"x")
    assert not (tmp_path / "escape").exists()


def test_file_store_put_replaces_atomically(tmp_path):
    store = FileStore(tmp_path)
    store.put("refs/names/a", b"old")

    store.put("refs/names/a", b"new")

    assert store.get("refs/names/a") == b"new"
    assert os.listdir(tmp_path / "tmp") == []


def test_file_store_full_disk_is_store_error(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is missing")
    store = FileStore(tmp_path)
    (tmp_path / "chunks").mkdir()
    os.symlink("/dev/full", tmp_path / "tmp")

    with pytest.raises(StoreError) as caught:
        store.put("chunks/ab", b"x" * 100)

    assert "chunks/ab" in str(caught.value)
    assert not (tmp_path / "chunks" / "ab").exists()


def test_open_store_rejects_bad_urls():
    for url in ("s3://", "ftp://host/x", "file://otherhost/x"):
        with pytest.raises(StoreError):
            open_store(url)


def test_open_store_plain_path(tmp_path):
    store = open_store(str(tmp_path))

    assert store.url == tmp_path.as_uri()


def _s3_store(endpoint_url: str, bucket: str, options: StoreOptions = FAST_RETRIES):
    return open_store(f"s3://{bucket}/prefix", StoreOptions(**{**options.__dict__, "endpoint_url": endpoint_url}))


def test_s3_store_roundtrip(s3_server, s3_bucket):
    store = _s3_store(s3_server.endpoint_url, s3_bucket)

    store.put("chunks/ab", b"payload")

    assert store.get("chunks/ab") == b"payload"
    assert store.exists("chunks/ab")
    assert not store.exists("chunks/cd")
    assert store.list("chunks/") == ["chunks/ab"]
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["prefix/chunks/ab"]
    with pytest.raises(ObjectNotFound):
        store.get("chunks/cd")


def test_s3_store_sends_no_crc32_checksums(s3_server, s3_bucket):
    proxy, make_store = _proxied_store(s3_server, s3_bucket, [])

    with proxy:
        store = make_store()
        store.put("chunks/ab", b"payload")
        assert store.get("chunks/ab") == b"payload"

    assert [(method, path) for method, path, _action in proxy.requests] == [
        ("PUT", f"/{s3_bucket}/prefix/chunks/ab"), ("GET", f"/{s3_bucket}/prefix/chunks/ab")]
    put_headers = {name.lower() for name in proxy.request_headers[0]}
    get_headers = {name.lower() for name in proxy.request_headers[1]}
    assert {name for name in put_headers if "checksum" in name} == set()
    assert {name for name in get_headers if "checksum" in name} == set()


def _proxied_store(s3_server, bucket, script, options=FAST_RETRIES):
    port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    proxy = FaultProxy("127.0.0.1", port, script)
    return proxy, lambda: _s3_store(proxy.endpoint_url, bucket, options)


@pytest.mark.parametrize("fault", ["500", "503", "slowdown", "reset", "429"])
def test_s3_store_retries_temporary_failure(s3_server, s3_bucket, fault):
    s3_server.client().put_object(Bucket=s3_bucket, Key="prefix/chunks/ab", Body=b"payload")
    proxy, make_store = _proxied_store(s3_server, s3_bucket, [fault, fault])

    with proxy:
        store = make_store()
        assert store.get("chunks/ab") == b"payload"

    assert [action for _method, _path, action in proxy.requests] == [fault, fault, "pass"]


def test_s3_store_gives_up_after_max_attempts(s3_server, s3_bucket):
    proxy, make_store = _proxied_store(s3_server, s3_bucket, ["503"] * 10)

    with proxy:
        store = make_store()
        with pytest.raises(StoreUnavailable) as caught:
            store.get("chunks/ab")

    assert len(proxy.requests) == FAST_RETRIES.max_attempts
    assert "chunks/ab" in str(caught.value)
    assert "4 attempts" in str(caught.value)


@pytest.mark.parametrize("status", ["403", "400"])
def test_s3_store_does_not_retry_definite_errors(s3_server, s3_bucket, status):
    proxy, make_store = _proxied_store(s3_server, s3_bucket, [status])

    with proxy:
        store = make_store()
        with pytest.raises(StoreError) as caught:
            store.get("chunks/ab")

    assert not isinstance(caught.value, (StoreUnavailable, ObjectNotFound))
    assert len(proxy.requests) == 1


def test_s3_store_missing_object_not_retried(s3_server, s3_bucket):
    proxy, make_store = _proxied_store(s3_server, s3_bucket, [])

    with proxy:
        store = make_store()
        with pytest.raises(ObjectNotFound):
            store.get("chunks/missing")

    assert len(proxy.requests) == 1


def test_s3_store_stalled_server_times_out(s3_server, s3_bucket):
    options = StoreOptions(**{**FAST_RETRIES.__dict__, "max_attempts": 2, "read_timeout_s": 0.5})
    proxy, make_store = _proxied_store(s3_server, s3_bucket, ["stall", "stall"], options)

    with proxy:
        store = make_store()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get("chunks/ab")
        elapsed = time.monotonic() - started

    assert len(proxy.requests) == 2
    assert elapsed < 5.0


def test_s3_store_dead_endpoint_is_unavailable(s3_bucket):
    store = _s3_store(f"http://127.0.0.1:{free_port()}", s3_bucket)

    with pytest.raises(StoreUnavailable):
        store.get("chunks/ab")
