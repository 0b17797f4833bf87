"""Read one large file through lazyfs and through the tools a user would otherwise use.

A file of ``--size-mib`` MiB of random bytes (so zstd cannot shrink it) is cut
into 1 MiB chunks and published as a one-file image, without the indexer, into
a moto S3 bucket on 127.0.0.1. Each round measures, side by side:

- lazyfs, ``cat FILE > /dev/null`` through the mount: cold (a new daemon with
  empty RAM and LMDB tiers, page cache dropped); LMDB tier (the daemon
  restarted over the LMDB tier that the cold read filled, page cache dropped);
  RAM tier (the same daemon again, page cache dropped); page cache (``cat``
  again, nothing dropped);
- squashfuse: a zstd squashfs holding the same file, mounted with
  ``squashfuse``, read with the page cache dropped, then read again;
- ext4: the same file on the working directory's file system, read with the
  page cache dropped, then read again;
- boto3: a plain parallel download of the image's chunk objects from the same
  moto server, with as many threads as the daemon's ``fetch_concurrency``;
- random reads: 16 threads each read 4 KiB at seeded random offsets, through
  lazyfs with every chunk in the RAM tier and through squashfuse, the page
  cache dropped before each and readahead off (``POSIX_FADV_RANDOM``).

Dropping the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``) affects
the whole machine. Needs root (FUSE, drop_caches), /dev/fuse, mksquashfs and
squashfuse. Run it from the repository root::

    .venv/bin/python -m benchmarks.read_throughput --runs 3 --write-results
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import boto3
from botocore.config import Config

from lazyfs.config import DaemonConfig
from lazyfs.refs import chunk_key
from lazyfs.s3store import S3Store
from lazyfs.store import StoreOptions
from tests.support.daemon import running_daemon
from tests.support.s3server import MotoServer
from tests.support.sample_image import publish_single_file_image

from .boot_small import drop_page_cache, exit_on_sigterm, isolate_aws_environment, positive_int
from .machine import describe_machine
from .results_file import add_output_arguments, replace_section

log = logging.getLogger("benchmarks.read_throughput")

SECTION_HEADING = "Read throughput (`benchmarks/read_throughput.py`)"

CHUNK_BYTES = 1 << 20
FILE_NAME = "random.bin"
BUCKET = "read-throughput"
PREFIX = "images"
SEQUENTIAL = ("lazyfs cold", "lazyfs LMDB tier", "lazyfs RAM tier", "lazyfs page cache",
              "squashfuse first read", "squashfuse re-read", "ext4 first read", "ext4 re-read",
              "boto3 parallel download")
RANDOM = ("lazyfs RAM tier", "squashfuse")
RANDOM_THREADS = 16
RANDOM_READ_BYTES = 4096
FETCH_CONCURRENCY = DaemonConfig().fetch_concurrency
CAT_TIMEOUT_S = 600.0


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed; the message names it."""


def missing_requirement() -> str | None:
    """Return why the benchmark cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the benchmark needs root for FUSE and drop_caches"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: load the fuse kernel module"
    for program in ("fusermount3", "mksquashfs", "squashfuse"):
        if shutil.which(program) is None:
            return f"{program} is not installed: run scripts/install-deps"
    return None


def timed_cat(path: Path, expected_bytes: int) -> float:
    """Return the wall-clock seconds of ``cat path > /dev/null``; check the bytes it read."""
    started = time.perf_counter()
    result = subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, timeout=CAT_TIMEOUT_S)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchmarkError(f"cat {path} failed with exit code {result.returncode}: {result.stderr.strip()}")
    size = path.stat().st_size
    if size != expected_bytes:
        raise BenchmarkError(f"{path} has {size} bytes, expected {expected_bytes}")
    return seconds


def random_reads(path: Path, size: int, reads_per_thread: int, seed: int) -> tuple[float, list[int]]:
    """Read 4 KiB at random aligned offsets from RANDOM_THREADS threads at once.

    Return the wall-clock seconds of the whole run and the latency of every
    read in nanoseconds. The offsets depend only on ``seed``, so every
    file system gets the same ones.
    """
    pages = size // RANDOM_READ_BYTES
    generators = [random.Random(seed * 1000 + thread) for thread in range(RANDOM_THREADS)]
    offsets = [[generator.randrange(pages) * RANDOM_READ_BYTES for _ in range(reads_per_thread)]
               for generator in generators]
    latencies: list[list[int]] = [[] for _ in range(RANDOM_THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(RANDOM_THREADS + 1)

    def reader(thread: int) -> None:
        try:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                # Without this, kernel readahead turns most reads into page cache hits.
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)
                start.wait()
                for offset in offsets[thread]:
                    began = time.perf_counter_ns()
                    data = os.pread(descriptor, RANDOM_READ_BYTES, offset)
                    latencies[thread].append(time.perf_counter_ns() - began)
                    if len(data) != RANDOM_READ_BYTES:
                        raise BenchmarkError(f"short read of {path} at {offset}: {len(data)} bytes")
            finally:
                os.close(descriptor)
        except BaseException as error:  # The caller raises it after every thread has ended.
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=reader, args=(number,)) for number in range(RANDOM_THREADS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise BenchmarkError(f"random reads of {path} failed: {errors[0]}")
    return seconds, [latency for per_thread in latencies for latency in per_thread]


def boto3_download(endpoint_url: str, addresses: list[bytes], size: int) -> float:
    """Return the seconds a plain parallel boto3 download of every chunk object takes."""
    client = boto3.client("s3", endpoint_url=endpoint_url,
                          config=Config(max_pool_connections=FETCH_CONCURRENCY))

    def fetch(address: bytes) -> int:
        response = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{chunk_key(address)}")
        return len(response["Body"].read())

    try:
        began = time.perf_counter()
        with ThreadPoolExecutor(FETCH_CONCURRENCY) as pool:
            total = sum(pool.map(fetch, addresses))
        seconds = time.perf_counter() - began
    finally:
        client.close()
    # Each object is one codec byte followed by the raw chunk.
    if total != size + len(addresses):
        raise BenchmarkError(f"boto3 downloaded {total} bytes, expected {size + len(addresses)}")
    return seconds


@contextmanager
def squashfuse_mount(image: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir()
    result = subprocess.run(["squashfuse", str(image), str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchmarkError(f"squashfuse {image} failed: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)


class Measurements:
    """The values of every round: one per round in each list, except the per-read latencies."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.random_seconds: dict[str, list[float]] = defaultdict(list)
        self.random_latencies: dict[str, list[int]] = defaultdict(list)
        self.refetched: list[int] = []


def measure_lazyfs(options: dict, digest: str, size: int, work: Path, reads_per_thread: int,
                   seed: int, results: Measurements) -> None:
    """Cold, LMDB tier, RAM tier, page cache, then random reads from the RAM tier."""
    with running_daemon(directory=work / "cold", **options) as daemon:
        drop_page_cache()
        results.seconds["lazyfs cold"].append(timed_cat(daemon.image(digest) / FILE_NAME, size))
    with running_daemon(directory=work / "restarted", **options) as daemon:
        path = daemon.image(digest) / FILE_NAME
        drop_page_cache()
        results.seconds["lazyfs LMDB tier"].append(timed_cat(path, size))
        drop_page_cache()
        results.seconds["lazyfs RAM tier"].append(timed_cat(path, size))
        results.seconds["lazyfs page cache"].append(timed_cat(path, size))
        # Chunks whose fill the cold daemon dropped come from the store again.
        results.refetched.append(daemon.status()["tiers"]["store"]["requests"])
        drop_page_cache()
        seconds, latencies = random_reads(path, size, reads_per_thread, seed)
        results.random_seconds["lazyfs RAM tier"].append(seconds)
        results.random_latencies["lazyfs RAM tier"].extend(latencies)


def measure_references(squashfs: Path, plain_file: Path, endpoint_url: str, addresses: list[bytes],
                       size: int, work: Path, reads_per_thread: int, seed: int, results: Measurements) -> None:
    """squashfuse and ext4, first read and re-read, the boto3 download, and squashfuse random reads."""
    with squashfuse_mount(squashfs, work / "squashfuse") as mountpoint:
        path = mountpoint / FILE_NAME
        drop_page_cache()
        results.seconds["squashfuse first read"].append(timed_cat(path, size))
        results.seconds["squashfuse re-read"].append(timed_cat(path, size))
        drop_page_cache()
        seconds, latencies = random_reads(path, size, reads_per_thread, seed)
        results.random_seconds["squashfuse"].append(seconds)
        results.random_latencies["squashfuse"].extend(latencies)
    drop_page_cache()
    results.seconds["ext4 first read"].append(timed_cat(plain_file, size))
    results.seconds["ext4 re-read"].append(timed_cat(plain_file, size))
    results.seconds["boto3 parallel download"].append(boto3_download(endpoint_url, addresses, size))


def prepare_references(data: bytes, work: Path) -> tuple[Path, Path]:
    """Write the file onto the working directory's file system and into a zstd squashfs."""
    source = work / "plain"
    source.mkdir()
    plain_file = source / FILE_NAME
    plain_file.write_bytes(data)
    squashfs = work / "random.squashfs"
    result = subprocess.run(["mksquashfs", str(source), str(squashfs), "-comp", "zstd", "-noappend",
                             "-quiet", "-no-progress"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchmarkError(f"mksquashfs failed: {result.stderr.strip()}")
    return squashfs, plain_file


def run_benchmark(size: int, runs: int, reads_per_thread: int, work: Path) -> Measurements:
    """Publish the file, build the references and measure everything ``runs`` times."""
    data = os.urandom(size)
    results = Measurements()
    with ExitStack() as stack:
        moto = stack.enter_context(MotoServer())
        moto.create_bucket(BUCKET)
        store = S3Store(BUCKET, PREFIX, StoreOptions(endpoint_url=moto.endpoint_url))
        started = time.perf_counter()
        digest, addresses = publish_single_file_image(store, data, CHUNK_BYTES, FILE_NAME.encode())
        store.close()
        log.info("published %d bytes in %.1f s", size, time.perf_counter() - started)
        squashfs, plain_file = prepare_references(data, work)
        del data
        options = {"store_url": f"s3://{BUCKET}/{PREFIX}", "s3_endpoint_url": moto.endpoint_url,
                   "ram_cache_bytes": size + (size >> 1), "disk_cache_bytes": 2 * size + (256 << 20),
                   "log_level": "info"}
        for number in range(1, runs + 1):
            round_dir = work / f"round-{number}-{secrets.token_hex(2)}"
            round_dir.mkdir()
            measure_lazyfs({**options, "disk_cache_path": str(round_dir / "cache")}, digest, size,
                           round_dir, reads_per_thread, number, results)
            measure_references(squashfs, plain_file, moto.endpoint_url, addresses, size, round_dir,
                               reads_per_thread, number, results)
            shutil.rmtree(round_dir, ignore_errors=True)
            log.info("round %d: %s", number,
                     ", ".join(f"{state} {results.seconds[state][-1]:.3f} s" for state in SEQUENTIAL))
    return results


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _percentile(latencies: list[int], fraction: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e3


def format_report(results: Measurements, size: int, runs: int, reads_per_thread: int,
                  machine: list[tuple[str, str]], total_s: float) -> str:
    median = {state: _median(results.seconds[state]) for state in SEQUENTIAL}
    lines = [
        f"Workload: one file of {size >> 20} MiB of random bytes, published in 1 MiB chunks into moto S3 "
        f"on 127.0.0.1; {runs} runs per state, the states taking turns. lazyfs: daemon with "
        f"fetch_concurrency {FETCH_CONCURRENCY}, RAM tier and LMDB tier large enough for the file. "
        "squashfuse: a zstd squashfs (mksquashfs defaults) of the same file. ext4: the same file on "
        "the working directory. boto3: a plain client downloading every chunk object from the same "
        f"moto server with {FETCH_CONCURRENCY} threads.",
        "",
        "Sequential reads are `cat FILE > /dev/null`; \"first read\", cold and the tier states start "
        "with the page cache dropped, re-read and page cache do not.",
        "",
        "| state | median (s) | min (s) | max (s) | median MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for state in SEQUENTIAL:
        values = results.seconds[state]
        lines.append(f"| {state} | {median[state]:.3f} | {min(values):.3f} | {max(values):.3f} "
                     f"| {size / median[state] / 1e6:.0f} |")
    reads = RANDOM_THREADS * reads_per_thread
    lines += [
        "",
        f"Random reads: {RANDOM_THREADS} threads, {reads_per_thread} reads of 4 KiB each at random "
        "4 KiB-aligned offsets (the same offsets for both), page cache dropped first, readahead off "
        "with `POSIX_FADV_RANDOM`.",
        "",
        "| file system | median reads/s | p50 latency (µs) | p99 latency (µs) |",
        "|---|---:|---:|---:|",
    ]
    for name in RANDOM:
        rate = reads / _median(results.random_seconds[name])
        latencies = results.random_latencies[name]
        lines.append(f"| {name} | {rate:.0f} | {_percentile(latencies, 0.5):.0f} "
                     f"| {_percentile(latencies, 0.99):.0f} |")
    random_rate = {name: reads / _median(results.random_seconds[name]) for name in RANDOM}
    ratios = [
        ("lazyfs RAM tier / squashfuse first read (speed)",
         median["squashfuse first read"] / median["lazyfs RAM tier"]),
        ("lazyfs page cache / squashfuse re-read (speed)",
         median["squashfuse re-read"] / median["lazyfs page cache"]),
        ("lazyfs LMDB tier / squashfuse first read (speed)",
         median["squashfuse first read"] / median["lazyfs LMDB tier"]),
        ("lazyfs cold / boto3 parallel download (speed)",
         median["boto3 parallel download"] / median["lazyfs cold"]),
        ("lazyfs RAM tier / ext4 first read (speed)", median["ext4 first read"] / median["lazyfs RAM tier"]),
        ("lazyfs page cache / ext4 re-read (speed)", median["ext4 re-read"] / median["lazyfs page cache"]),
        ("random reads/s, lazyfs RAM tier / squashfuse", random_rate["lazyfs RAM tier"] / random_rate["squashfuse"]),
    ]
    lines += ["", "| ratio of medians | value |", "|---|---:|"]
    lines += [f"| {label} | {value:.2f} |" for label, value in ratios]
    lines += [
        "",
        "Chunks that the restarted daemon fetched from the store again, because the cold daemon "
        f"dropped their LMDB fill, per round: {', '.join(str(count) for count in results.refetched)}.",
        "",
        "Machine:",
        "",
        *[f"- {label}: {value}" for label, value in machine],
        "",
        f"Command: `.venv/bin/python -m benchmarks.read_throughput --runs {runs} --size-mib {size >> 20}` "
        f"on {time.strftime('%Y-%m-%d')}, {total_s / 60:.1f} minutes in all.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.read_throughput",
        description="Time reads of one large file through lazyfs (cold from moto S3, LMDB tier, RAM "
                    "tier, page cache) beside squashfuse, ext4 and a plain boto3 download. Needs root.")
    parser.add_argument("--runs", type=positive_int, default=3, metavar="N",
                        help="measured runs per state (default: %(default)s)")
    parser.add_argument("--size-mib", type=positive_int, default=1024, metavar="MIB",
                        help="size of the file in MiB (default: %(default)s)")
    parser.add_argument("--random-reads", type=positive_int, default=2000, metavar="N",
                        help="4 KiB random reads per thread (default: %(default)s)")
    add_output_arguments(parser, "the files, the squashfs and the LMDB tiers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    problem = missing_requirement()
    if problem is not None:
        print(f"read_throughput: error: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    isolate_aws_environment()

    started = time.monotonic()
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="lazyfs-read-throughput-", dir=args.work_dir))
    try:
        results = run_benchmark(size, args.runs, args.random_reads, work)
    except RuntimeError as error:
        # BenchmarkError, and the start errors of moto and the daemon.
        print(f"read_throughput: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    machine = [(label, value) for label, value in describe_machine(args.work_dir)
               if label not in ("runc", "umoci", "skopeo")]
    machine.append(("squashfuse", _version(["dpkg-query", "-W", "-f=${Version}", "squashfuse"])))
    report = format_report(results, size, args.runs, args.random_reads, machine, time.monotonic() - started)
    print(report, end="")
    if args.write_results:
        replace_section(args.results_file, SECTION_HEADING, report)
    return 0


def _version(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
