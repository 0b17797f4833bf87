"""Prometheus metrics: the collectors on fixed input, then a real daemon scraped over HTTP."""

from __future__ import annotations

import errno
import http.client
import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lazyfs import cli
from lazyfs.chunk import encode
from lazyfs.config import load_config, parse_host_port
from lazyfs.control import ControlClient
from lazyfs.daemon import is_mounted
from lazyfs.errors import ConfigError, ObjectNotFound, StoreUnavailable
from lazyfs.metrics import FuseMetrics, MetricsServer, TierMetrics, build_registry
from lazyfs.refs import chunk_key
from lazyfs.store import FileStore, StoreOptions, open_store
from tests.support.daemon import cleanup, daemon_config, running_daemon, toml_text
from tests.support.faultproxy import FaultProxy
from tests.support.net import LOOPBACK, free_port
from tests.support.sample_image import (FIRST_CHUNK_BYTES, SECOND_CHUNK_BYTES, publish_sample_image,
                                        publish_single_file_image)

HTTP_TIMEOUT_S = 30.0

DIGEST = "ab" * 32

STATUS = {
    "mountpoint": "/run/lazyfs/mnt",
    "store_url": "file:///var/lib/lazyfs/store",
    "pid": 1234,
    "started_at_ns": 1_700_000_000_500_000_000,
    "images": {DIGEST: {"base_inode": 2, "inodes": 10, "size_bytes": 5000, "chunks": 3,
                        "attached_at_ns": 1, "reads": 7, "bytes_read": 4096, "chunk_reads": 9,
                        "fetched_chunks": 2, "fetched_bytes": 3000, "read_errors": 1}},
    "indexes": {"index_fetches": 1, "index_cache_hits": 4},
    "tiers": {
        "ram": {"hits": 11, "misses": 3, "bytes_served": 700, "puts": 3, "evictions": 1,
                "entries": 2, "used_bytes": 600, "capacity_bytes": 1000},
        "disk": {"hits": 1, "misses": 2, "bytes_served": 100, "puts": 2, "evictions": 0, "corrupt": 5,
                 "map_full": 3, "disk_full": 4, "put_failures": 0, "entries": 2, "used_bytes": 300,
                 "capacity_bytes": 2000, "map_size_bytes": 4000},
        "store": {"requests": 2, "bytes": 90, "hits": 2, "misses": 0, "bytes_served": 200,
                  "not_found": 6, "integrity_errors": 7, "errors": 8, "timeouts": 9},
    },
    "chain": {"joined": 12, "failed_fast": 13, "fill_errors": 14, "in_flight": 15, "fills_dropped": 16},
    "store_requests": {"get": 3, "list": 1},
    "store_results": {"get": {"ok": 2, "unavailable": 1}, "list": {"ok": 1}},
    "store_retries": {"get": 4},
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse exposition text into {(sample name, sorted labels): value}."""
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


# ---------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("0.0.0.0:9477", ("0.0.0.0", 9477)),
])
def test_parse_host_port_valid(address, expected):
    assert parse_host_port(address) == expected


@pytest.mark.parametrize("address", [
    "9477", ":9477", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http",
    "::1:9477", "[::1:9477", "[]:9477",
])
def test_parse_host_port_invalid(address):
    with pytest.raises(ValueError):
        parse_host_port(address)


def test_config_metrics_address_default_off():
    assert load_config().metrics_address is None


def test_config_rejects_invalid_metrics_address(tmp_path: Path):
    path = tmp_path / "lazyfs.toml"
    path.write_text('metrics_address = "127.0.0.1"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: key 'metrics_address' must be HOST:PORT, for example "
                                 "127.0.0.1:9477, not '127.0.0.1'")


def test_mount_flag_rejects_invalid_address(tmp_path: Path, capsys: pytest.CaptureFixture):
    arguments = ["mount", "--store", str(tmp_path), "--metrics-address", "127.0.0.1:0", str(tmp_path / "mnt")]
    assert cli.main(arguments) == cli.EXIT_CONFIG
    assert capsys.readouterr().err == (
        "lazyfs mount: the command line: key 'metrics_address' must end with a port from 1 to 65535, "
        "not '127.0.0.1:0'\n")
    assert not (tmp_path / "mnt").exists()


# ---------------------------------------------------------------------------
# Collectors


def test_status_collector_values():
    parsed = samples(generate_latest(build_registry(lambda: STATUS, None)).decode())
    expected = {
        ("lazyfs_tier_hits_total", "ram"): 11, ("lazyfs_tier_hits_total", "disk"): 1,
        ("lazyfs_tier_hits_total", "store"): 2,
        ("lazyfs_tier_misses_total", "ram"): 3, ("lazyfs_tier_misses_total", "store"): 0,
        ("lazyfs_tier_bytes_served_total", "disk"): 100,
        ("lazyfs_tier_evictions_total", "ram"): 1,
        ("lazyfs_tier_corrupt_entries_total", "disk"): 5,
        ("lazyfs_cache_used_bytes", "ram"): 600, ("lazyfs_cache_used_bytes", "disk"): 300,
        ("lazyfs_cache_capacity_bytes", "disk"): 2000, ("lazyfs_cache_entries", "ram"): 2,
        ("lazyfs_store_fetches_total", "store"): 2,
        ("lazyfs_store_received_bytes_total", "store"): 90,
    }
    for (name, tier), number in expected.items():
        assert value(parsed, name, tier=tier) == number, (name, tier)
    assert ("lazyfs_cache_used_bytes", (("tier", "store"),)) not in parsed
    assert ("lazyfs_tier_evictions_total", (("tier", "store"),)) not in parsed

    errors = {"not_found": 6, "integrity": 7, "error": 8, "timeout": 9}
    for kind, number in errors.items():
        assert value(parsed, "lazyfs_store_errors_total", tier="store", kind=kind) == number, kind
    assert value(parsed, "lazyfs_store_requests_total", operation="get") == 3
    assert value(parsed, "lazyfs_store_requests_total", operation="list") == 1
    assert value(parsed, "lazyfs_store_request_results_total", operation="get", result="ok") == 2
    assert value(parsed, "lazyfs_store_request_results_total", operation="get", result="unavailable") == 1
    assert value(parsed, "lazyfs_store_request_results_total", operation="list", result="ok") == 1
    assert value(parsed, "lazyfs_store_retries_total", operation="get") == 4
    assert value(parsed, "lazyfs_verification_failures_total", tier="disk") == 5
    assert value(parsed, "lazyfs_verification_failures_total", tier="store") == 7
    assert ("lazyfs_verification_failures_total", (("tier", "ram"),)) not in parsed
    assert value(parsed, "lazyfs_cache_full_total", tier="disk", kind="map") == 3
    assert value(parsed, "lazyfs_cache_full_total", tier="disk", kind="disk") == 4
    assert value(parsed, "lazyfs_chain_fills_dropped_total") == 16

    assert value(parsed, "lazyfs_chain_joined_fetches_total") == 12
    assert value(parsed, "lazyfs_chain_failed_fast_total") == 13
    assert value(parsed, "lazyfs_chain_fill_errors_total") == 14
    assert value(parsed, "lazyfs_chain_fetches_in_flight") == 15
    assert value(parsed, "lazyfs_index_fetches_total") == 1
    assert value(parsed, "lazyfs_index_cache_hits_total") == 4

    assert value(parsed, "lazyfs_images_attached") == 1
    assert value(parsed, "lazyfs_image_size_bytes", image=DIGEST) == 5000
    assert value(parsed, "lazyfs_image_reads_total", image=DIGEST) == 7
    assert value(parsed, "lazyfs_image_bytes_read_total", image=DIGEST) == 4096
    assert value(parsed, "lazyfs_image_fetched_chunks_total", image=DIGEST) == 2
    assert value(parsed, "lazyfs_image_fetched_bytes_total", image=DIGEST) == 3000
    assert value(parsed, "lazyfs_image_read_errors_total", image=DIGEST) == 1
    assert value(parsed, "lazyfs_start_time_seconds") == 1_700_000_000.5


def test_status_collector_reads_at_scrape():
    status = {**STATUS, "store_requests": {}}
    registry = build_registry(lambda: status, None)
    first = samples(generate_latest(registry).decode())
    status["store_requests"] = {"get": 5}
    second = samples(generate_latest(registry).decode())
    assert ("lazyfs_store_requests_total", (("operation", "get"),)) not in first
    assert value(second, "lazyfs_store_requests_total", operation="get") == 5


def test_fuse_metrics_counts_and_errors():
    fuse_metrics = FuseMetrics()
    fuse_metrics.observe("read", 0.002, None)
    fuse_metrics.observe("read", 0.004, errno.EIO)
    fuse_metrics.observe("lookup", 0.00001, errno.ENOENT)
    parsed = samples(generate_latest(build_registry(lambda: STATUS, fuse_metrics)).decode())
    assert value(parsed, "lazyfs_fuse_operations_total", op="read") == 2
    assert value(parsed, "lazyfs_fuse_operations_total", op="lookup") == 1
    assert value(parsed, "lazyfs_fuse_errors_total", op="read", errno="EIO") == 1
    assert value(parsed, "lazyfs_fuse_errors_total", op="lookup", errno="ENOENT") == 1
    assert value(parsed, "lazyfs_fuse_operation_seconds_count", op="read") == 2
    assert value(parsed, "lazyfs_fuse_operation_seconds_sum", op="read") == pytest.approx(0.006)
    assert value(parsed, "lazyfs_fuse_operation_seconds_bucket", op="read", le="0.0025") == 1
    assert value(parsed, "lazyfs_fuse_operation_seconds_bucket", op="read", le="0.005") == 2


def test_tier_metrics_latency_by_result():
    tier_metrics = TierMetrics()
    tier_metrics.observe("ram", "miss", 0.00002)
    tier_metrics.observe("store", "hit", 0.03)
    tier_metrics.observe("store", "hit", 0.2)
    tier_metrics.observe("store", "error", 20.0)
    parsed = samples(generate_latest(build_registry(lambda: STATUS, None, tier_metrics)).decode())
    assert value(parsed, "lazyfs_tier_get_seconds_count", tier="ram", result="miss") == 1
    assert value(parsed, "lazyfs_tier_get_seconds_count", tier="store", result="hit") == 2
    assert value(parsed, "lazyfs_tier_get_seconds_sum", tier="store", result="hit") == pytest.approx(0.23)
    assert value(parsed, "lazyfs_tier_get_seconds_bucket", tier="store", result="hit", le="0.05") == 1
    assert value(parsed, "lazyfs_tier_get_seconds_bucket", tier="store", result="hit", le="0.25") == 2
    assert value(parsed, "lazyfs_tier_get_seconds_bucket", tier="store", result="error", le="10.0") == 0
    assert value(parsed, "lazyfs_tier_get_seconds_bucket", tier="store", result="error", le="30.0") == 1


def test_file_store_counts_results(tmp_path: Path):
    file_store = FileStore(tmp_path / "store")
    file_store.put("chunks/aa", b"data")
    assert file_store.get("chunks/aa") == b"data"
    with pytest.raises(ObjectNotFound):
        file_store.get("chunks/bb")
    assert file_store.result_counts() == {"get": {"not_found": 1, "ok": 1}, "put": {"ok": 1}}
    assert file_store.retry_counts() == {}


def test_s3_store_counts_retries_and_unavailable(s3_server, s3_bucket: str):
    upstream_port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    options = StoreOptions(max_attempts=3, backoff_base_s=0.001, backoff_max_s=0.001)
    with FaultProxy(LOOPBACK, upstream_port, ["503", "pass", "pass", "503", "503", "503"]) as proxy:
        s3_store = open_store(f"s3://{s3_bucket}/p", StoreOptions(**{**options.__dict__,
                                                                     "endpoint_url": proxy.endpoint_url}))
        try:
            s3_store.put("chunks/aa", b"data")
            with pytest.raises(ObjectNotFound):
                s3_store.get("chunks/bb")
            with pytest.raises(StoreUnavailable):
                s3_store.get("chunks/aa")
        finally:
            s3_store.close()
    assert s3_store.request_counts() == {"put": 1, "get": 2}
    assert s3_store.result_counts() == {"get": {"not_found": 1, "unavailable": 1}, "put": {"ok": 1}}
    assert s3_store.retry_counts() == {"put": 1, "get": 2}


# ---------------------------------------------------------------------------
# HTTP responses


def response_parts(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


@pytest.fixture
def server() -> MetricsServer:
    return MetricsServer("127.0.0.1:9477", build_registry(lambda: STATUS, None))


def test_server_get_metrics(server: MetricsServer):
    status_line, headers, body = response_parts(server.respond(b"GET /metrics HTTP/1.1\r\nHost: x"))
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert value(samples(body.decode()), "lazyfs_index_cache_hits_total") == 4


def test_server_head_has_no_body(server: MetricsServer):
    status_line, headers, body = response_parts(server.respond(b"HEAD /metrics HTTP/1.1"))
    assert status_line == "HTTP/1.1 200 OK"
    assert int(headers["Content-Length"]) > 0
    assert body == b""


def test_server_openmetrics_on_request(server: MetricsServer):
    request = b"GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0"
    status_line, headers, body = response_parts(server.respond(request))
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


@pytest.mark.parametrize(("request_head", "expected"), [
    (b"GET / HTTP/1.1", "HTTP/1.1 404 Not Found"),
    (b"GET /metricsx HTTP/1.1", "HTTP/1.1 404 Not Found"),
    (b"POST /metrics HTTP/1.1", "HTTP/1.1 405 Method Not Allowed"),
    (b"GET /metrics", "HTTP/1.1 400 Bad Request"),
    (b"\x00garbage", "HTTP/1.1 400 Bad Request"),
])
def test_server_rejects_other_requests(server: MetricsServer, request_head, expected):
    status_line, _headers, _body = response_parts(server.respond(request_head))
    assert status_line == expected


# ---------------------------------------------------------------------------
# A real daemon


def scrape(port: int, method: str = "GET") -> http.client.HTTPResponse:
    # http.client ignores proxy variables, so the request stays on loopback.
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=HTTP_TIMEOUT_S)
    connection.request(method, "/metrics")
    return connection.getresponse()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    return FileStore(tmp_path_factory.mktemp("store"))


@pytest.mark.fuse
def test_daemon_metrics_after_cold_read(tmp_path: Path, store: FileStore):
    sample = publish_sample_image(store, seed=1)
    port = free_port()
    with running_daemon(directory=tmp_path, store_url=store.url,
                        metrics_address=f"{LOOPBACK}:{port}") as daemon:
        root = daemon.image(sample.digest)
        assert (root / "data" / "two_chunks.bin").read_bytes() == sample.files[b"data/two_chunks.bin"]
        with pytest.raises(FileNotFoundError):
            os.stat(root / "missing")
        lookups_before = value(samples(scrape(port).read().decode()), "lazyfs_fuse_operations_total",
                               op="lookup")
        # The kernel keeps the negative entry, so a second stat makes no lookup.
        with pytest.raises(FileNotFoundError):
            os.stat(root / "missing")
        # Waits for the boot trace lookup.
        assert ControlClient(daemon.control_socket).request({"op": "sync"}) == {}
        response = scrape(port)
        assert response.status == 200
        parsed = samples(response.read().decode())

    file_bytes = FIRST_CHUNK_BYTES + SECOND_CHUNK_BYTES
    # One index and two chunks, each fetched once, and the boot trace lookup
    # of the default trace_replay.
    assert value(parsed, "lazyfs_store_requests_total", operation="get") == 4
    assert value(parsed, "lazyfs_store_fetches_total", tier="store") == 2
    assert value(parsed, "lazyfs_tier_hits_total", tier="store") == 2
    assert value(parsed, "lazyfs_tier_bytes_served_total", tier="store") == file_bytes
    for kind in ("not_found", "integrity", "timeout", "error"):
        assert value(parsed, "lazyfs_store_errors_total", tier="store", kind=kind) == 0, kind
    assert value(parsed, "lazyfs_tier_hits_total", tier="disk") == 0
    assert value(parsed, "lazyfs_cache_capacity_bytes", tier="ram") == 256 << 20
    assert value(parsed, "lazyfs_index_fetches_total") == 1
    assert value(parsed, "lazyfs_images_attached") == 1
    assert value(parsed, "lazyfs_image_bytes_read_total", image=sample.digest) == file_bytes
    assert value(parsed, "lazyfs_image_fetched_chunks_total", image=sample.digest) == 2
    assert value(parsed, "lazyfs_image_fetched_bytes_total", image=sample.digest) == file_bytes
    assert value(parsed, "lazyfs_image_read_errors_total", image=sample.digest) == 0
    reads = value(parsed, "lazyfs_image_reads_total", image=sample.digest)
    assert value(parsed, "lazyfs_fuse_operations_total", op="read") == reads
    assert value(parsed, "lazyfs_fuse_operation_seconds_count", op="read") == reads
    assert value(parsed, "lazyfs_fuse_operations_total", op="open") == 1
    assert value(parsed, "lazyfs_fuse_operations_total", op="lookup") == lookups_before
    assert ("lazyfs_fuse_errors_total", (("errno", "ENOENT"), ("op", "lookup"))) not in parsed


@pytest.mark.fuse
def test_daemon_metrics_head(tmp_path: Path, store: FileStore):
    port = free_port()
    with running_daemon(directory=tmp_path, store_url=store.url, metrics_address=f"{LOOPBACK}:{port}"):
        response = scrape(port, "HEAD")
        assert response.status == 200
        assert response.read() == b""


@pytest.mark.fuse
def test_daemon_metrics_port_in_use(tmp_path: Path, store: FileStore):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        address = f"{LOOPBACK}:{taken.getsockname()[1]}"
        config = daemon_config(tmp_path, store.url, metrics_address=address)
        config_path = tmp_path / "lazyfs.toml"
        config_path.write_text(toml_text(config))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "lazyfs.cli", "mount", "--foreground", "--config", str(config_path)],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        finally:
            cleanup(None, config)
    assert result.returncode == 6, result.stderr
    assert f"cannot listen for metrics on {address}: Address already in use" in result.stderr
    assert not is_mounted(config.mountpoint)


def publish_corrupt_image(store: FileStore, data: bytes) -> tuple[str, bytes]:
    """Publish a one-file image whose chunk object decodes to other bytes than its address names."""
    digest, addresses = publish_single_file_image(store, data)
    store.put(chunk_key(addresses[0]), encode(b"not the indexed bytes"))
    return digest, addresses[0]


def read_error(path: Path) -> int:
    with pytest.raises(OSError) as caught:
        path.read_bytes()
    return caught.value.errno


@pytest.mark.fuse
def test_daemon_metrics_exact_workload(tmp_path: Path, store: FileStore):
    """Each read below is one FUSE read of a file smaller than a page, so every count is exact.

    The RAM tier has room for 150 bytes: the 99-byte chunk of the sample's small
    files, then a 100-byte chunk that evicts it.
    """
    sample = publish_sample_image(store, seed=3)
    other_digest, _ = publish_single_file_image(store, b"x" * 100)
    missing_digest, _ = publish_single_file_image(store, b"m" * 100, store_chunks=False)
    corrupt_digest, _ = publish_corrupt_image(store, b"c" * 100)
    port = free_port()
    with running_daemon(directory=tmp_path, store_url=store.url, ram_cache_bytes=150,
                        metrics_address=f"{LOOPBACK}:{port}") as daemon:
        root = daemon.image(sample.digest)
        assert (root / "data" / "small.txt").read_bytes() == sample.files[b"data/small.txt"]
        assert (root / "bin" / "tool").read_bytes() == sample.files[b"bin/tool"]
        assert (daemon.image(other_digest) / "file.bin").read_bytes() == b"x" * 100
        assert read_error(daemon.image(missing_digest) / "file.bin") == errno.EIO
        assert read_error(daemon.image(corrupt_digest) / "file.bin") == errno.EIO
        # Waits for the boot trace lookups.
        assert ControlClient(daemon.control_socket).request({"op": "sync"}) == {}
        response = scrape(port)
        assert response.status == 200
        parsed = samples(response.read().decode())
        status = daemon.status()

    tiers = {
        # tier: (hits, misses)
        "ram": (1, 4),
        "disk": (0, 4),
        "store": (2, 0),
    }
    for tier, (hits, misses) in tiers.items():
        assert value(parsed, "lazyfs_tier_hits_total", tier=tier) == hits, tier
        assert value(parsed, "lazyfs_tier_misses_total", tier=tier) == misses, tier
    assert value(parsed, "lazyfs_tier_bytes_served_total", tier="store") == 99 + 100
    assert value(parsed, "lazyfs_tier_bytes_served_total", tier="ram") == 99
    assert value(parsed, "lazyfs_tier_evictions_total", tier="ram") == 1
    assert value(parsed, "lazyfs_cache_used_bytes", tier="ram") == 100
    assert value(parsed, "lazyfs_cache_entries", tier="ram") == 1
    assert value(parsed, "lazyfs_cache_capacity_bytes", tier="ram") == 150
    assert value(parsed, "lazyfs_cache_capacity_bytes", tier="disk") == 256 << 20

    latency = {("ram", "hit"): 1, ("ram", "miss"): 4, ("disk", "miss"): 4, ("store", "hit"): 2,
               ("store", "error"): 2}
    for (tier, result), count in latency.items():
        assert value(parsed, "lazyfs_tier_get_seconds_count", tier=tier, result=result) == count, tier
    assert ("lazyfs_tier_get_seconds_count", (("result", "hit"), ("tier", "disk"))) not in parsed

    assert value(parsed, "lazyfs_store_fetches_total", tier="store") == 4
    errors = {"not_found": 1, "integrity": 1, "timeout": 0, "error": 0}
    for kind, number in errors.items():
        assert value(parsed, "lazyfs_store_errors_total", tier="store", kind=kind) == number, kind
    assert value(parsed, "lazyfs_verification_failures_total", tier="store") == 1
    assert value(parsed, "lazyfs_verification_failures_total", tier="disk") == 0
    # Four indexes, four chunk objects and four boot trace lookups, one per
    # image. The corrupt chunk's object was read fine, and no image has a trace.
    assert value(parsed, "lazyfs_store_requests_total", operation="get") == 12
    assert value(parsed, "lazyfs_store_request_results_total", operation="get", result="ok") == 7
    assert value(parsed, "lazyfs_store_request_results_total", operation="get", result="not_found") == 5
    assert ("lazyfs_store_retries_total", (("operation", "get"),)) not in parsed
    assert value(parsed, "lazyfs_index_fetches_total") == 4
    assert value(parsed, "lazyfs_images_attached") == 4

    assert value(parsed, "lazyfs_image_reads_total", image=sample.digest) == 2
    assert value(parsed, "lazyfs_image_fetched_chunks_total", image=sample.digest) == 1
    assert value(parsed, "lazyfs_image_fetched_bytes_total", image=sample.digest) == 99
    assert value(parsed, "lazyfs_image_read_errors_total", image=other_digest) == 0
    assert value(parsed, "lazyfs_image_read_errors_total", image=corrupt_digest) >= 1
    # The kernel may retry a failed read once; each retry fails fast from the
    # chain's failure memory and reaches no tier.
    reads = sum(image["reads"] + image["read_errors"] for image in status["images"].values())
    assert value(parsed, "lazyfs_fuse_operations_total", op="read") == reads
    assert value(parsed, "lazyfs_fuse_errors_total", op="read", errno="EIO") == (
        status["images"][missing_digest]["read_errors"] + status["images"][corrupt_digest]["read_errors"])
    assert value(parsed, "lazyfs_fuse_operations_total", op="open") == 5


@pytest.mark.fuse
def test_daemon_metrics_count_store_retries(tmp_path: Path, s3_server, s3_bucket: str):
    s3_store = open_store(f"s3://{s3_bucket}/lazyfs", StoreOptions(endpoint_url=s3_server.endpoint_url))
    digest, addresses = publish_single_file_image(s3_store, b"r" * 100)
    s3_store.close()
    port = free_port()
    upstream_port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    # The index passes; the chunk fails twice, then passes. Boot traces are
    # off, because their lookup would take a place in this sequence.
    with FaultProxy(LOOPBACK, upstream_port, ["pass", "503", "slowdown"]) as proxy:
        with running_daemon(directory=tmp_path, store_url=f"s3://{s3_bucket}/lazyfs",
                            s3_endpoint_url=proxy.endpoint_url, trace_replay=False,
                            metrics_address=f"{LOOPBACK}:{port}") as daemon:
            assert (daemon.image(digest) / "file.bin").read_bytes() == b"r" * 100
            parsed = samples(scrape(port).read().decode())
    assert [action for _method, _path, action in proxy.requests] == ["pass", "503", "slowdown", "pass"]
    assert value(parsed, "lazyfs_store_retries_total", operation="get") == 2
    assert value(parsed, "lazyfs_store_requests_total", operation="get") == 2
    assert value(parsed, "lazyfs_store_request_results_total", operation="get", result="ok") == 2
    assert value(parsed, "lazyfs_tier_hits_total", tier="store") == 1
    assert value(parsed, "lazyfs_tier_get_seconds_count", tier="store", result="hit") == 1
    assert value(parsed, "lazyfs_image_fetched_chunks_total", image=digest) == 1
    assert f"chunks/{addresses[0].hex()}" in proxy.requests[1][1]
