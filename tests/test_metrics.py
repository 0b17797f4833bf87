"""Prometheus metrics: the collectors on fixed input, then a real daemon scraped over HTTP."""

from __future__ import annotations

import errno
import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lazyfs import cli
from lazyfs.config import load_config, parse_host_port
from lazyfs.daemon import is_mounted
from lazyfs.errors import ConfigError
from lazyfs.metrics import FuseMetrics, MetricsServer, build_registry
from lazyfs.store import FileStore
from tests.support.daemon import cleanup, daemon_config, running_daemon, toml_text
from tests.support.net import LOOPBACK, free_port
from tests.support.sample_image import FIRST_CHUNK_BYTES, SECOND_CHUNK_BYTES, publish_sample_image

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
                 "map_full": 0, "put_failures": 0, "entries": 2, "used_bytes": 300,
                 "capacity_bytes": 2000, "map_size_bytes": 4000},
        "store": {"requests": 2, "bytes": 90, "hits": 2, "misses": 0, "bytes_served": 200,
                  "not_found": 6, "integrity_errors": 7, "errors": 8, "timeouts": 9},
    },
    "chain": {"joined": 12, "failed_fast": 13, "fill_errors": 14, "in_flight": 15},
    "store_requests": {"get": 3, "list": 1},
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
        response = scrape(port)
        assert response.status == 200
        parsed = samples(response.read().decode())

    file_bytes = FIRST_CHUNK_BYTES + SECOND_CHUNK_BYTES
    # One index and two chunks, each fetched once.
    assert value(parsed, "lazyfs_store_requests_total", operation="get") == 3
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
    assert value(parsed, "lazyfs_fuse_errors_total", op="lookup", errno="ENOENT") == 1


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
