"""Registry client under injected faults: throttling, broken and slow bodies, expired tokens.

Every test runs Debian's docker-registry behind ``FaultProxy`` on 127.0.0.1.
The client fetches the manifest, the config and the layer one after another,
so a proxy script addresses them by position: request 1 is the manifest,
request 2 the config, request 3 the layer. Backoff waits go through
``registry._sleep``, which the tests replace with a recorder, so no test
waits for a backoff.

The expired-token test uses the token-auth docker-registry of
``test_indexer_registry_auth`` and makes the proxy drop the Authorization
header of one request, so the registry itself rejects it with a 401 and a
Bearer challenge, as it does for an expired token.
"""

from __future__ import annotations

import base64
import json
import logging
import random

import pytest

from lazyfs.indexer import registry as registry_module
from lazyfs.indexer.registry import docker_config_credentials, parse_retry_after
from lazyfs.store import open_store
from tests.support import oci
from tests.support.faultproxy import FaultProxy
from tests.support.net import LOOPBACK
from tests.support.oci import Layer, file
from tests.test_indexer_registry_auth import PASSWORD, REPOSITORY as TOKEN_REPOSITORY, USER, token_registry

__all__ = ["token_registry"]

REPOSITORY = "lazyfs/faults"
PAYLOAD = random.Random(7).randbytes(256 << 10)


@pytest.fixture(autouse=True)
def no_docker_config(tmp_path, monkeypatch):
    """Point DOCKER_CONFIG at an empty directory, away from the user's own config."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
def sleeps(monkeypatch):
    """The backoff delays the client asked for, in order; nothing actually sleeps."""
    delays: list[float] = []
    monkeypatch.setattr(registry_module, "_sleep", delays.append)
    return delays


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    """A one-layer image with 256 KiB of incompressible data, pushed as lazyfs/faults:v1."""
    layout = tmp_path_factory.mktemp("faults-image") / "layout"
    image = oci.write_image(layout, [Layer([file("data", PAYLOAD)], compression="none")], tag="v1")
    assert registry.push(layout, "v1", REPOSITORY, "v1") == image.manifest_digest
    return image


@pytest.fixture
def proxy(registry):
    host, _, port = registry.host.rpartition(":")
    with FaultProxy(host, int(port)) as server:
        yield server


def proxy_host(proxy: FaultProxy) -> str:
    return proxy.endpoint_url.removeprefix("http://")


def index(proxy: FaultProxy, tmp_path, *extra: str, repository: str = REPOSITORY) -> oci.IndexerRun:
    return oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http", "--json", *extra,
                           f"docker://{proxy_host(proxy)}/{repository}:v1")


def check_tree(tmp_path, image: oci.Image) -> None:
    tree = oci.TreeView(open_store((tmp_path / "store").as_uri()), image.manifest_digest)
    assert tree.read(b"data") == PAYLOAD


def layer_path(image: oci.Image) -> str:
    return f"/v2/{REPOSITORY}/blobs/{image.layer_digests[0]}"


def test_429_waits_for_retry_after(pushed, proxy, sleeps, tmp_path):
    proxy.script(["429 Retry-After: 1"])

    run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert sleeps == [1.0]
    assert [action for _method, _path, action in proxy.requests] == ["429 Retry-After: 1", "pass", "pass", "pass"]
    assert proxy.statuses == [429, 200, 200, 200]
    check_tree(tmp_path, pushed)


def test_5xx_backoff_grows_then_gives_up(pushed, proxy, sleeps, tmp_path):
    proxy.script(["503", "502", "500"])

    run = index(proxy, tmp_path, "--retries", "2")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: manifest {proxy_host(proxy)}/{REPOSITORY}:v1: "
                          "the registry returned HTTP 500 Internal Server Error\n")
    assert len(proxy.requests) == 3
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5
    assert 0 <= sleeps[1] <= 1.0


def test_retries_zero_makes_one_attempt(pushed, proxy, sleeps, tmp_path):
    proxy.script(["503"])

    run = index(proxy, tmp_path, "--retries", "0")

    assert run.code == 4
    assert len(proxy.requests) == 1
    assert sleeps == []


def test_retry_after_is_capped(pushed, proxy, sleeps, tmp_path):
    proxy.script(["503 Retry-After: 86400"])

    run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert sleeps == [registry_module.MAX_RETRY_AFTER_S]


def test_retry_after_http_date(pushed, proxy, sleeps, tmp_path):
    proxy.script(["503 Retry-After: Fri, 01 Jan 2100 00:00:00 GMT"])

    run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert sleeps == [registry_module.MAX_RETRY_AFTER_S]
    assert proxy.statuses == [503, 200, 200, 200]


@pytest.mark.parametrize("value, expected", [
    ("1", 1.0),
    ("120", 120.0),
    (" 3 ", 3.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 2.0),
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ("-1", None),
    ("soon", None),
    (None, None),
])
def test_parse_retry_after(value, expected):
    # 1445412478 is two seconds before 2015-10-21 07:28:00 UTC.
    assert parse_retry_after(value, now=1445412478.0) == expected


def test_cut_blob_resumes_with_range(pushed, proxy, sleeps, tmp_path, caplog):
    proxy.script(["pass", "pass", "cut 1000"])

    with caplog.at_level(logging.WARNING, logger="lazyfs.indexer.registry"):
        run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert [path for _method, path, _action in proxy.requests[2:]] == [layer_path(pushed)] * 2
    assert "Range" not in proxy.request_headers[2]
    assert proxy.request_headers[3]["Range"] == "bytes=1000-"
    assert proxy.statuses == [200, 200, 200, 206]
    assert len(sleeps) == 1
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"blob {pushed.layer_digests[0]} of {proxy_host(proxy)}/{REPOSITORY}: ")
    assert warnings[0].endswith(f", after 1000 bytes (resume 1 of 5); resuming in {sleeps[0]:.2f}s")
    check_tree(tmp_path, pushed)


def test_resume_twice_in_one_blob(pushed, proxy, sleeps, tmp_path):
    proxy.script(["pass", "pass", "cut 1000", "cut 5000"])

    run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert [headers.get("Range") for headers in proxy.request_headers[2:]] == [
        None, "bytes=1000-", "bytes=6000-"]
    assert proxy.statuses == [200, 200, 200, 206, 206]
    check_tree(tmp_path, pushed)


def test_ignored_range_restarts_from_zero(pushed, proxy, sleeps, tmp_path):
    proxy.script(["pass", "pass", "cut 1000", "ignore-range"])

    run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert proxy.request_headers[3]["Range"] == "bytes=1000-"
    assert proxy.statuses == [200, 200, 200, 200]
    assert len(proxy.requests) == 4
    check_tree(tmp_path, pushed)


def test_wrong_content_range_restarts_from_zero(pushed, proxy, sleeps, tmp_path):
    proxy.script(["pass", "pass", "cut 1000", "wrong-range"])

    run = index(proxy, tmp_path)

    assert run.code == 0, run.stderr
    assert proxy.request_headers[3]["Range"] == "bytes=1000-"
    assert "Range" not in proxy.request_headers[4]
    assert proxy.statuses == [200, 200, 200, 206, 200]
    check_tree(tmp_path, pushed)


def test_blob_broken_every_time_gives_up(pushed, proxy, sleeps, tmp_path):
    proxy.script(["pass", "pass", "cut 1000", "cut 1000", "cut 1000"])

    run = index(proxy, tmp_path, "--retries", "2")

    assert run.code == 4
    assert run.stderr.startswith(f"lazyfs-index: error: blob {pushed.layer_digests[0]} of "
                                 f"{proxy_host(proxy)}/{REPOSITORY}: ")
    assert [headers.get("Range") for headers in proxy.request_headers[2:]] == [
        None, "bytes=1000-", "bytes=2000-"]
    assert len(sleeps) == 2
    store = open_store((tmp_path / "store").as_uri())
    assert store.list("indexes/") == []
    assert store.list("refs/") == []


def test_trickling_blob_hits_deadline(pushed, proxy, sleeps, tmp_path):
    proxy.script(["pass", "pass", "trickle", "trickle"])

    run = index(proxy, tmp_path, "--timeout", "1", "--retries", "1")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: blob {pushed.layer_digests[0]} of {proxy_host(proxy)}/"
                          f"{REPOSITORY}: timed out: the response did not complete within 1 s (--timeout)\n")
    assert proxy.request_headers[3]["Range"].startswith("bytes=")
    assert len(proxy.requests) == 4


def test_trickling_manifest_hits_deadline(pushed, proxy, sleeps, tmp_path):
    proxy.script(["trickle"])

    run = index(proxy, tmp_path, "--timeout", "1")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: manifest {proxy_host(proxy)}/{REPOSITORY}:v1: "
                          "timed out: the response did not complete within 1 s (--timeout)\n")


@pytest.fixture
def token_proxy(token_registry):
    host, _tokens, _image = token_registry
    with FaultProxy(LOOPBACK, int(host.rpartition(":")[2])) as server:
        yield server


def test_rejected_token_is_refreshed(token_registry, token_proxy, sleeps, tmp_path):
    _host, tokens, image = token_registry
    tokens.requests.clear()
    # Requests: manifest (401, no token yet), manifest, config, layer without
    # its token (401), layer again with a new token.
    token_proxy.script(["pass", "pass", "pass", "unauthorized"])

    run = index(token_proxy, tmp_path, repository=TOKEN_REPOSITORY)

    assert run.code == 0, run.stderr
    assert token_proxy.statuses == [401, 200, 200, 401, 200]
    assert len(tokens.requests) == 2
    tree = oci.TreeView(open_store((tmp_path / "store").as_uri()), image.manifest_digest)
    assert tree.read(b"secret.txt") == b"only with a token\n"


def test_token_rejected_twice_is_access_denied(token_registry, token_proxy, sleeps, tmp_path):
    _host, tokens, _image = token_registry
    tokens.requests.clear()
    token_proxy.script(["pass", "pass", "pass", "unauthorized", "unauthorized"])

    run = index(token_proxy, tmp_path, repository=TOKEN_REPOSITORY)

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: blob {image_layer(token_registry)} of "
                          f"{proxy_host(token_proxy)}/{TOKEN_REPOSITORY}: access denied "
                          "(HTTP 401 Unauthorized); pass --username and --password-stdin\n")
    assert len(tokens.requests) == 2


def image_layer(token_registry) -> str:
    return token_registry[2].layer_digests[0]


def write_docker_config(directory, auths: dict) -> None:
    (directory / "config.json").write_text(json.dumps({"auths": auths}))


def basic_auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_docker_config_credentials_reach_token_server(token_registry, no_docker_config, tmp_path, caplog):
    host, tokens, image = token_registry
    tokens.requests.clear()
    write_docker_config(no_docker_config, {"other.example": {"auth": basic_auth("bob", "x")},
                                           host: {"auth": basic_auth(USER, PASSWORD)}})

    with caplog.at_level(logging.DEBUG):
        run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http", "--json", "-v",
                              f"docker://{host}/{TOKEN_REPOSITORY}:v1")

    assert run.code == 0, run.stderr
    assert run.result["manifest_digest"] == image.manifest_digest
    assert [request["authorization"] for request in tokens.requests] == ["Basic " + basic_auth(USER, PASSWORD)]
    assert f"using the credentials for {host} from {no_docker_config / 'config.json'}" in caplog.messages
    assert PASSWORD not in run.stderr
    assert PASSWORD not in caplog.text
    assert basic_auth(USER, PASSWORD) not in caplog.text


@pytest.mark.parametrize("key", ["registry.test:5000", "https://registry.test:5000",
                                 "http://registry.test:5000/v1/", "REGISTRY.test:5000"])
def test_docker_config_key_forms(no_docker_config, key):
    write_docker_config(no_docker_config, {key: {"auth": basic_auth("carol", "pa:ss")}})

    assert docker_config_credentials("registry.test:5000") == ("carol", "pa:ss")


@pytest.mark.parametrize("auths", [
    {},
    {"registry.test": {"auth": basic_auth("carol", "pw")}},
    {"registry.test:5000": {"auth": "not base64!"}},
    {"registry.test:5000": {"auth": base64.b64encode(b"no-colon").decode()}},
    {"registry.test:5000": {"identitytoken": "abc"}},
])
def test_docker_config_without_usable_entry(no_docker_config, auths):
    write_docker_config(no_docker_config, auths)

    assert docker_config_credentials("registry.test:5000") is None


def test_docker_config_missing(no_docker_config):
    assert docker_config_credentials("registry.test:5000") is None
