"""Prometheus metrics of the daemon, served over HTTP at ``metrics_address``.

Three collectors feed one registry per daemon:

- ``StatusCollector`` reads the control socket's status object (see
  ``lazyfs.control``) at scrape time and turns its counters into metric
  families, so the tiers, the tree and the store keep their own counters and
  nothing is counted twice.
- ``FuseMetrics`` counts FUSE requests and their latency. ``lazyfs.fuse_ops``
  records every handler that goes through its error-mapping wrapper; the
  handlers that only return EROFS and ``forget`` are not recorded.
- ``TierMetrics`` times every chunk get of every tier, through
  ``TierChain.get_observer``. A chunk served from the fill queue, or to a
  reader that joined another reader's fetch, queries no tier and is not timed.

The HTTP server runs as a trio task in the daemon's nursery, so a scrape
reads the counters in the same thread that changes them. It responds to
``GET /metrics`` (and HEAD) in the text format that the ``Accept`` header
selects, one request per connection.

Exported families (counters get the ``_total`` suffix in the text format):

====================================  ===========  =========================================
name                                  labels       source
====================================  ===========  =========================================
lazyfs_tier_hits_total                tier         chunks the tier returned
lazyfs_tier_misses_total              tier         chunks the tier did not have
lazyfs_tier_bytes_served_total        tier         uncompressed bytes of those chunks
lazyfs_tier_evictions_total           tier         cache tiers only
lazyfs_tier_corrupt_entries_total     tier         disk tier: entries dropped on a bad checksum
lazyfs_tier_get_seconds               tier, result histogram of one tier get; result: hit, miss, error
lazyfs_verification_failures_total    tier         store: chunks that failed their SHA-256 check;
                                                   disk: entries that failed their XXH3 check
lazyfs_cache_full_total               tier, kind   disk tier writes that found no room; kind: map
                                                   (the LMDB map), disk (the file system)
lazyfs_cache_used_bytes               tier         cache tiers only (gauge)
lazyfs_cache_capacity_bytes           tier         cache tiers only (gauge)
lazyfs_cache_entries                  tier         cache tiers only (gauge)
lazyfs_store_fetches_total            tier         chunk fetches of a store tier
lazyfs_store_received_bytes_total     tier         stored (compressed) bytes received
lazyfs_store_errors_total             tier, kind   kind: not_found, integrity, timeout, error
lazyfs_store_requests_total           operation    every store client request (get, put, ...)
lazyfs_store_request_results_total    operation,   finished requests, after retries; result: ok,
                                      result       not_found, unavailable (retries ran out), error
lazyfs_store_retries_total            operation    retries of temporary failures (S3 stores)
lazyfs_chain_joined_fetches_total                  reads that waited for another read's fetch
lazyfs_chain_failed_fast_total                     reads failed from the failure memory
lazyfs_chain_fill_errors_total                     failed puts into a nearer tier
lazyfs_chain_fills_dropped_total                   background fills dropped on a full fill queue
lazyfs_chain_fetches_in_flight                     gauge
lazyfs_index_fetches_total                         indexes fetched from the store
lazyfs_index_cache_hits_total                      indexes read from the local index cache
lazyfs_images_attached                             gauge
lazyfs_image_size_bytes               image        gauge: bytes of all files in the image
lazyfs_image_reads_total              image        read requests
lazyfs_image_bytes_read_total         image        bytes returned to reads
lazyfs_image_fetched_chunks_total     image        chunks fetched from a remote tier
lazyfs_image_fetched_bytes_total      image        uncompressed bytes of those chunks
lazyfs_image_read_errors_total        image        reads that failed
lazyfs_start_time_seconds                          gauge: Unix time the daemon started
lazyfs_fuse_operations_total          op           FUSE requests handled
lazyfs_fuse_errors_total              op, errno    requests answered with an error
lazyfs_fuse_operation_seconds         op           histogram of handler time
====================================  ===========  =========================================
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .config import parse_host_port
from .errors import DaemonError

log = logging.getLogger(__name__)

# Handler time ranges from microseconds (cached attributes) to the fetch
# timeout of a read that waits for the store (30 s by default).
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                     0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

MAX_REQUEST_HEAD_BYTES = 16 << 10
REQUEST_TIMEOUT_S = 10.0

# Store tier counters by the ``kind`` label of lazyfs_store_errors_total.
STORE_ERROR_KINDS = {"not_found": "not_found", "integrity": "integrity_errors",
                     "timeout": "timeouts", "error": "errors"}

StatusFunction = Callable[[], dict[str, Any]]


# ---------------------------------------------------------------------------
# Collectors


class TierMetrics:
    """Latency of tier gets, by tier and result; ``observe`` is a ``TierChain.get_observer``."""

    def __init__(self) -> None:
        self.seconds = Histogram("lazyfs_tier_get_seconds", "Time of one chunk get from a tier",
                                 ["tier", "result"], buckets=LATENCY_BUCKETS_S, registry=None)

    def observe(self, tier: str, result: str, seconds: float) -> None:
        """Record one get of ``tier`` that ended with ``result`` (hit, miss or error)."""
        self.seconds.labels(tier, result).observe(seconds)

    def collect(self) -> Iterator[Metric]:
        yield from self.seconds.collect()


class FuseMetrics:
    """Counts and latencies of FUSE requests, by handler name."""

    def __init__(self) -> None:
        self.operations = Counter("lazyfs_fuse_operations", "FUSE requests handled, by operation",
                                  ["op"], registry=None)
        self.errors = Counter("lazyfs_fuse_errors", "FUSE requests answered with an error, by errno",
                              ["op", "errno"], registry=None)
        self.seconds = Histogram("lazyfs_fuse_operation_seconds", "Time spent in a FUSE handler",
                                 ["op"], buckets=LATENCY_BUCKETS_S, registry=None)

    def observe(self, op: str, seconds: float, error: int | None) -> None:
        """Record one request of handler ``op``; ``error`` is the errno it returned, if any."""
        self.operations.labels(op).inc()
        self.seconds.labels(op).observe(seconds)
        if error is not None:
            self.errors.labels(op, errno.errorcode.get(error, str(error))).inc()

    def collect(self) -> Iterator[Metric]:
        yield from self.operations.collect()
        yield from self.errors.collect()
        yield from self.seconds.collect()


class StatusCollector:
    """Metric families built from the daemon's status object at each scrape."""

    def __init__(self, status: StatusFunction):
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        yield from _tier_families(status["tiers"])
        yield from _store_families(status["tiers"], status["store_requests"])
        yield from _store_result_families(status["store_results"], status["store_retries"])
        yield from _chain_families(status["chain"], status["indexes"])
        yield from _image_families(status["images"])
        start = GaugeMetricFamily("lazyfs_start_time_seconds", "Unix time the daemon started")
        start.add_metric([], status["started_at_ns"] / 1e9)
        yield start


def _counter(name: str, documentation: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=labels or [])


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels or [])


def _tier_families(tiers: dict[str, dict[str, int]]) -> Iterator[Metric]:
    hits = _counter("lazyfs_tier_hits", "Chunks a tier returned", ["tier"])
    misses = _counter("lazyfs_tier_misses", "Chunk requests a tier could not serve", ["tier"])
    served = _counter("lazyfs_tier_bytes_served", "Uncompressed bytes of the chunks a tier returned",
                      ["tier"])
    evictions = _counter("lazyfs_tier_evictions", "Chunks evicted from a cache tier", ["tier"])
    corrupt = _counter("lazyfs_tier_corrupt_entries",
                       "Cache entries dropped because their checksum did not match", ["tier"])
    verification = _counter("lazyfs_verification_failures",
                            "Chunks from a tier that failed verification", ["tier"])
    full = _counter("lazyfs_cache_full", "Cache tier writes that found no room, by kind",
                    ["tier", "kind"])
    used = _gauge("lazyfs_cache_used_bytes", "Bytes held by a cache tier", ["tier"])
    capacity = _gauge("lazyfs_cache_capacity_bytes", "Byte budget of a cache tier", ["tier"])
    entries = _gauge("lazyfs_cache_entries", "Chunks held by a cache tier", ["tier"])
    for name, counters in tiers.items():
        hits.add_metric([name], counters["hits"])
        misses.add_metric([name], counters["misses"])
        served.add_metric([name], counters["bytes_served"])
        if "evictions" in counters:
            evictions.add_metric([name], counters["evictions"])
        if "corrupt" in counters:
            corrupt.add_metric([name], counters["corrupt"])
            verification.add_metric([name], counters["corrupt"])
        if "integrity_errors" in counters:
            verification.add_metric([name], counters["integrity_errors"])
        for kind in ("map", "disk"):
            if f"{kind}_full" in counters:
                full.add_metric([name, kind], counters[f"{kind}_full"])
        if "capacity_bytes" in counters:
            used.add_metric([name], counters["used_bytes"])
            capacity.add_metric([name], counters["capacity_bytes"])
            entries.add_metric([name], counters["entries"])
    yield from (hits, misses, served, evictions, corrupt, verification, full, used, capacity, entries)


def _store_families(tiers: dict[str, dict[str, int]], requests: dict[str, int]) -> Iterator[Metric]:
    fetches = _counter("lazyfs_store_fetches", "Chunk fetches of a store tier", ["tier"])
    received = _counter("lazyfs_store_received_bytes",
                        "Stored (compressed) bytes a store tier received", ["tier"])
    errors = _counter("lazyfs_store_errors", "Failed chunk fetches of a store tier, by kind",
                      ["tier", "kind"])
    for name, counters in tiers.items():
        # Only store tiers count requests and the stored bytes they received.
        if "requests" not in counters:
            continue
        fetches.add_metric([name], counters["requests"])
        received.add_metric([name], counters["bytes"])
        for kind, key in STORE_ERROR_KINDS.items():
            errors.add_metric([name, kind], counters[key])
    by_operation = _counter("lazyfs_store_requests", "Requests of the store client, by operation",
                            ["operation"])
    for operation, count in sorted(requests.items()):
        by_operation.add_metric([operation], count)
    yield from (fetches, received, errors, by_operation)


def _store_result_families(results: dict[str, dict[str, int]],
                           retries: dict[str, int]) -> Iterator[Metric]:
    by_result = _counter("lazyfs_store_request_results",
                         "Finished requests of the store client, by operation and result",
                         ["operation", "result"])
    for operation, counts in sorted(results.items()):
        for result, count in sorted(counts.items()):
            by_result.add_metric([operation, result], count)
    retried = _counter("lazyfs_store_retries", "Retries of temporary store failures, by operation",
                       ["operation"])
    for operation, count in sorted(retries.items()):
        retried.add_metric([operation], count)
    yield from (by_result, retried)


def _chain_families(chain: dict[str, int], indexes: dict[str, int]) -> Iterator[Metric]:
    for key, name, documentation in (
            ("joined", "lazyfs_chain_joined_fetches", "Reads that waited for another read's fetch"),
            ("failed_fast", "lazyfs_chain_failed_fast", "Reads failed at once by a recent failure"),
            ("fill_errors", "lazyfs_chain_fill_errors", "Failed puts into a nearer tier"),
            ("fills_dropped", "lazyfs_chain_fills_dropped",
             "Background fills dropped because the fill queue was full"),
            ("index_fetches", "lazyfs_index_fetches", "Image indexes fetched from the store"),
            ("index_cache_hits", "lazyfs_index_cache_hits", "Image indexes read from the local cache")):
        family = _counter(name, documentation)
        family.add_metric([], chain[key] if key in chain else indexes[key])
        yield family
    in_flight = _gauge("lazyfs_chain_fetches_in_flight", "Chunk fetches running now")
    in_flight.add_metric([], chain["in_flight"])
    yield in_flight


# Per-image status keys and the counter families they become.
IMAGE_COUNTERS = (
    ("reads", "lazyfs_image_reads", "Read requests of files in the image"),
    ("bytes_read", "lazyfs_image_bytes_read", "Bytes returned to reads of the image"),
    ("fetched_chunks", "lazyfs_image_fetched_chunks", "Chunks of the image fetched from a remote tier"),
    ("fetched_bytes", "lazyfs_image_fetched_bytes",
     "Uncompressed bytes of the image's chunks fetched from a remote tier"),
    ("read_errors", "lazyfs_image_read_errors", "Reads of the image that failed"),
)


def _image_families(images: dict[str, dict[str, int]]) -> Iterator[Metric]:
    attached = _gauge("lazyfs_images_attached", "Images loaded since the daemon started")
    attached.add_metric([], len(images))
    yield attached
    size = _gauge("lazyfs_image_size_bytes", "Bytes of all files in the image", ["image"])
    for digest, counters in images.items():
        size.add_metric([digest], counters["size_bytes"])
    yield size
    for key, name, documentation in IMAGE_COUNTERS:
        family = _counter(name, documentation, ["image"])
        for digest, counters in images.items():
            family.add_metric([digest], counters[key])
        yield family


def build_registry(status: StatusFunction, fuse_metrics: FuseMetrics | None,
                   tier_metrics: TierMetrics | None = None) -> CollectorRegistry:
    """Return a registry with the status collector and the FUSE and tier metrics given."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    for collector in (fuse_metrics, tier_metrics):
        if collector is not None:
            registry.register(collector)
    return registry


# ---------------------------------------------------------------------------
# HTTP


class MetricsServer:
    """HTTP exposition of ``registry`` on ``address`` (HOST:PORT)."""

    def __init__(self, address: str, registry: CollectorRegistry):
        self.address = address
        self.host, self.port = parse_host_port(address)
        self.registry = registry

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, and serve until cancelled; raise DaemonError if binding fails."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise DaemonError(f"cannot listen for metrics on {self.address}: "
                              f"{exc.strerror or exc}; check metrics_address") from None
        log.info("serving metrics at http://%s/metrics", self.address)
        task_status.started()
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                head = None
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    head = await _read_request_head(stream)
                if head is None:
                    return
                await stream.send_all(self.respond(head))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("metrics client disconnected before reading its response")
        except Exception:
            log.exception("metrics connection failed")

    def respond(self, head: bytes) -> bytes:
        """Return the whole HTTP response to one request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "text/plain; charset=utf-8", b"invalid request line\n")
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain; charset=utf-8", b"only GET and HEAD are supported\n",
                             extra_headers=["Allow: GET, HEAD"])
        if target.partition("?")[0] != "/metrics":
            return _response(404, "text/plain; charset=utf-8", b"metrics are at /metrics\n")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        return _response(200, content_type, body, include_body=method == "GET")


async def _read_request_head(stream: trio.SocketStream) -> bytes | None:
    """Return the request line and headers, or None when the client sent no whole head."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_REQUEST_HEAD_BYTES:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        buffer += data
    return bytes(buffer[:buffer.index(b"\r\n\r\n")])


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _response(code: int, content_type: str, body: bytes, *, include_body: bool = True,
              extra_headers: list[str] | None = None) -> bytes:
    headers = [f"HTTP/1.1 {code} {_REASONS[code]}", f"Content-Type: {content_type}",
               f"Content-Length: {len(body)}", "Connection: close", *(extra_headers or [])]
    return "\r\n".join(headers).encode("latin-1") + b"\r\n\r\n" + (body if include_body else b"")
