"""Registry client HTTP behaviour: redirects, credentials, retries and broken responses.

docker-registry with filesystem storage never redirects and never fails on
purpose, so these tests serve an OCI layout through a small registry API v2
front end on 127.0.0.1 (``http.server``). Blob requests are redirected to a
second loopback server standing in for object storage; both record the
requests they receive.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lazyfs.store import open_store
from tests.support import oci
from tests.support.net import LOOPBACK
from tests.support.oci import Layer, file

TOKEN = "token-for-tests"
REPOSITORY = "lazyfs/fake"


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 that hands each GET to ``handle(request)``."""

    def __init__(self, handle):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                handle(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"
        self.host = f"{LOOPBACK}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(request: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None,
         declared_length: int | None = None) -> None:
    request.send_response(status)
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(body) if declared_length is None else declared_length))
    request.end_headers()
    request.wfile.write(body)


class FakeRegistry:
    """Serves one image; manifests and blobs need a bearer token; blobs redirect to storage."""

    def __init__(self, image: oci.Image):
        self.image = image
        self.registry_requests: list[tuple[str, str | None]] = []
        self.storage_requests: list[tuple[str, str | None]] = []
        self.manifest_failures = 0
        self.blob_location: str | None = None
        self.cut_blob_short = False
        self.digest_header: str | None = None
        self.registry = Server(self.handle_registry)
        self.storage = Server(self.handle_storage)

    def close(self) -> None:
        self.registry.close()
        self.storage.close()

    def handle_registry(self, request: BaseHTTPRequestHandler) -> None:
        authorization = request.headers.get("Authorization")
        self.registry_requests.append((request.path, authorization))
        if request.path.startswith("/token?"):
            send(request, 200, json.dumps({"token": TOKEN}).encode(), {"Content-Type": "application/json"})
            return
        if authorization != f"Bearer {TOKEN}":
            challenge = (f'Bearer realm="{self.registry.url}/token",service="fake",'
                         f'scope="repository:{REPOSITORY}:pull"')
            send(request, 401, b"{}", {"WWW-Authenticate": challenge})
            return
        prefix = f"/v2/{REPOSITORY}/"
        kind, _, reference = request.path[len(prefix):].partition("/")
        if kind == "manifests":
            if self.manifest_failures:
                self.manifest_failures -= 1
                send(request, 503)
                return
            digest = self.image.manifest_digest if reference == "v1" else reference
            body = self.image.blob_path(digest).read_bytes()
            send(request, 200, body, {"Content-Type": oci.OCI_MANIFEST,
                                      "Docker-Content-Digest": self.digest_header or digest})
        elif kind == "blobs":
            location = self.blob_location or f"{self.storage.url}/objects/{reference}?signature=abc"
            send(request, 307, b"", {"Location": location})
        else:
            send(request, 404)

    def handle_storage(self, request: BaseHTTPRequestHandler) -> None:
        self.storage_requests.append((request.path, request.headers.get("Authorization")))
        digest = request.path.removeprefix("/objects/").partition("?")[0]
        body = self.image.blob_path(digest).read_bytes()
        if self.cut_blob_short and digest in self.image.layer_digests:
            send(request, 200, body[:len(body) // 2], declared_length=len(body))
            request.close_connection = True
            return
        send(request, 200, body)


@pytest.fixture
def fake(tmp_path):
    image = oci.write_image(tmp_path / "layout", [Layer([file("hello", b"hello, redirect\n")])], tag="v1")
    registry = FakeRegistry(image)
    yield registry
    registry.close()


def index(fake: FakeRegistry, tmp_path, *extra: str) -> oci.IndexerRun:
    return oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http", "--json", *extra,
                           f"docker://{fake.registry.host}/{REPOSITORY}:v1")


def test_blob_redirect_gets_no_credentials(fake, tmp_path):
    run = index(fake, tmp_path)

    assert run.code == 0, run.stderr
    tree = oci.TreeView(open_store((tmp_path / "store").as_uri()), fake.image.manifest_digest)
    assert tree.read(b"hello") == b"hello, redirect\n"
    fetched = [path.removeprefix("/objects/").partition("?")[0] for path, _auth in fake.storage_requests]
    assert sorted(fetched) == sorted([fake.image.config_digest, *fake.image.layer_digests])
    assert [auth for _path, auth in fake.storage_requests] == [None, None]
    token_requests = [path for path, _auth in fake.registry_requests if path.startswith("/token")]
    assert token_requests == [f"/token?service=fake&scope=repository%3A{REPOSITORY.replace('/', '%2F')}%3Apull"]


def test_redirect_to_plain_http_remote_host_is_rejected(fake, tmp_path, monkeypatch):
    fake.blob_location = "http://storage.invalid/objects/x"
    resolved = []
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        resolved.append(host)
        if host != LOOPBACK:
            raise AssertionError(f"connection attempt to {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)

    run = index(fake, tmp_path)

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: blob {fake.image.config_digest} of {fake.registry.host}/"
                          f"{REPOSITORY}: refusing to fetch http://storage.invalid/objects/x: only HTTPS, "
                          "or plain HTTP to a loopback host with --plain-http, is allowed\n")
    assert set(resolved) == {LOOPBACK}
    assert fake.storage_requests == []


def test_service_unavailable_is_retried(fake, tmp_path):
    fake.manifest_failures = 2

    run = index(fake, tmp_path)

    assert run.code == 0, run.stderr
    manifest_requests = [path for path, auth in fake.registry_requests
                         if "/manifests/" in path and auth is not None]
    assert len(manifest_requests) == 3


def test_persistent_failure_gives_up(fake, tmp_path):
    fake.manifest_failures = 10

    run = index(fake, tmp_path)

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: manifest {fake.registry.host}/{REPOSITORY}:v1: "
                          "the registry returned HTTP 503 Service Unavailable\n")


def test_digest_header_must_match_manifest(fake, tmp_path):
    fake.digest_header = "sha256:" + "e" * 64

    run = index(fake, tmp_path)

    assert run.code == 3
    assert f"but the registry sent Docker-Content-Digest sha256:{'e' * 64}" in run.stderr
    assert open_store((tmp_path / "store").as_uri()).list("") == []


def test_blob_body_cut_short(fake, tmp_path):
    fake.cut_blob_short = True

    run = index(fake, tmp_path)

    assert run.code == 4
    layer = fake.image.blob_path(fake.image.layer_digests[0]).read_bytes()
    assert run.stderr == (f"lazyfs-index: error: blob {fake.image.layer_digests[0]} of {fake.registry.host}/"
                          f"{REPOSITORY}: the connection closed with {len(layer) - len(layer) // 2} bytes of "
                          "the response missing\n")
    store = open_store((tmp_path / "store").as_uri())
    assert store.list("indexes/") == []
    assert store.list("refs/") == []
