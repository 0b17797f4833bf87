"""Soak: 64 concurrent readers of random ranges on a cold image, every byte checked.

The image is the debootstrap bookworm + python3 test image that
``tests.support.images`` builds, indexed into a moto S3 bucket on 127.0.0.1
and mounted by a new daemon with empty RAM and LMDB tiers. Until the time is
up, each reader thread picks a byte of the image at random, so a file is
picked in proportion to its size. It reads a range of 1 B to 256 KiB from
there with open, pread and close, and compares it with the same range of the
``umoci unpack`` reference tree. The latency of a read is the time of its
open, pread and close.

Needs root (FUSE, umoci), /dev/fuse and the Debian packages fuse3 and umoci.
Run it from the repository root with the project's virtual environment::

    .venv/bin/python -m benchmarks.soak --seconds 60 --write-results

``tests/test_soak.py`` runs ``run_soak`` for about 10 s in CI.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import images
from tests.support.daemon import running_daemon
from tests.support.indexed_image import IndexedImage, index_image
from tests.support.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, MotoServer

from .machine import describe_machine
from .results_file import RESULTS_PATH, replace_section

log = logging.getLogger("benchmarks.soak")

SECTION_HEADING = "Soak: concurrent random reads (`benchmarks/soak.py`)"

DEFAULT_READERS = 64
DEFAULT_SECONDS = 60.0
MAX_READ_BYTES = 256 << 10
# Mismatches and errors listed in full; the rest are only counted.
MAX_LISTED_ERRORS = 20


@dataclass
class SoakResult:
    """Reads, their latencies and every failure of one soak run."""

    seconds: float
    readers: int
    reads: int = 0
    bytes_read: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)

    def percentile_s(self, percent: int) -> float:
        """Return a latency percentile (1 to 99) in seconds."""
        if len(self.latencies_s) < 2:
            return self.latencies_s[0] if self.latencies_s else float("nan")
        return statistics.quantiles(self.latencies_s, n=100)[percent - 1]

    def summary(self) -> str:
        return (f"{self.reads} reads ({self.bytes_read / 1e6:.1f} MB) by {self.readers} readers in "
                f"{self.seconds:.1f} s: p50 {self.percentile_s(50) * 1e3:.2f} ms, "
                f"p99 {self.percentile_s(99) * 1e3:.2f} ms, {self.error_count} errors")


class _ImageBytes:
    """The image's regular files laid end to end, to pick a byte at random."""

    def __init__(self, image: IndexedImage):
        self.paths = sorted(path for path, file in image.files.items() if file.size > 0)
        self.sizes = [image.files[path].size for path in self.paths]
        self.ends = []
        total = 0
        for size in self.sizes:
            total += size
            self.ends.append(total)

    def pick(self, rng: random.Random) -> tuple[bytes, int, int]:
        """Return (path, offset, length) of a random range."""
        position = rng.randrange(self.ends[-1])
        number = bisect.bisect_right(self.ends, position)
        offset = position - (self.ends[number] - self.sizes[number])
        length = rng.randint(1, min(MAX_READ_BYTES, self.sizes[number] - offset))
        return self.paths[number], offset, length


def pread_file(path: bytes, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def run_soak(image: IndexedImage, mounted_root: Path, seconds: float,
             readers: int = DEFAULT_READERS, seed: int = 1) -> SoakResult:
    """Read random ranges under ``mounted_root`` from ``readers`` threads for ``seconds``."""
    ranges = _ImageBytes(image)
    result = SoakResult(seconds, readers)
    lock = threading.Lock()
    mounted_bytes = os.fsencode(mounted_root)
    reference_bytes = os.fsencode(image.reference)
    deadline = time.monotonic() + seconds

    def read_until_deadline(rng: random.Random) -> None:
        latencies, reads, total, failures = [], 0, 0, []
        while time.monotonic() < deadline:
            path, offset, length = ranges.pick(rng)
            started = time.perf_counter()
            try:
                data = pread_file(os.path.join(mounted_bytes, path), offset, length)
            except OSError as exc:
                failures.append(f"{path!r} [{offset}, +{length}]: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            reads += 1
            total += len(data)
            if data != pread_file(os.path.join(reference_bytes, path), offset, length):
                failures.append(f"{path!r} [{offset}, +{length}]: {len(data)} bytes differ "
                                "from the reference")
        with lock:
            result.latencies_s.extend(latencies)
            result.reads += reads
            result.bytes_read += total
            result.error_count += len(failures)
            result.errors.extend(failures[:MAX_LISTED_ERRORS - len(result.errors)])

    threads = [threading.Thread(target=read_until_deadline, args=(random.Random(seed * 1000 + number),),
                                name=f"soak reader {number}")
               for number in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


# ---------------------------------------------------------------------------
# The benchmark


def run_benchmark(seconds: float, readers: int, work_dir: Path) -> tuple[SoakResult, dict, IndexedImage]:
    """Index the test image into moto S3, mount it cold and soak it; return the result and status."""
    layout, tag = images.debootstrap_image()
    with MotoServer() as server:
        bucket = server.create_bucket("lazyfs-soak")
        image = index_image(layout, tag, server.endpoint_url, bucket, work_dir / "bundle")
        with running_daemon(directory=work_dir / "daemon", store_url=image.store_url,
                            s3_endpoint_url=server.endpoint_url, log_level="info") as daemon:
            result = run_soak(image, daemon.image(image.digest), seconds, readers)
            status = daemon.status()
    return result, status, image


def results_section(result: SoakResult, status: dict, image: IndexedImage, work_dir: Path) -> str:
    """Return the RESULTS.md section body: workload, machine and numbers."""
    store = status["tiers"]["store"]
    lines = [
        f"Workload: {result.readers} reader threads, each reading random ranges of 1 B to "
        f"{MAX_READ_BYTES >> 10} KiB (open, pread, close) for {result.seconds:g} s from a cold "
        "mount of the debootstrap bookworm + python3 test image, and comparing every byte with "
        "the `umoci unpack` tree. A range starts at a random byte of the image, so files are "
        "picked in proportion to their size. moto S3 and the daemon on 127.0.0.1; the daemon "
        "starts with empty RAM and LMDB tiers of 256 MiB each, a 20 s fetch timeout and the "
        "default store client settings.",
        "",
        "The image fits the RAM tier, so after the first seconds every chunk is cached and most "
        "reads are served from the kernel's page cache. The percentiles therefore mostly measure "
        "warm reads; the cold fetches are in the tail.",
        "",
        f"Image: {len(image.files)} regular files, {sum(f.size for f in image.files.values()) / 1e6:.1f} "
        "MB of data.",
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| reads | {result.reads} |",
        f"| bytes read | {result.bytes_read / 1e6:.1f} MB |",
        f"| errors (failed reads and wrong bytes) | {result.error_count} |",
        f"| read latency p50 | {result.percentile_s(50) * 1e3:.2f} ms |",
        f"| read latency p99 | {result.percentile_s(99) * 1e3:.2f} ms |",
        f"| chunks fetched from the store | {store['hits']} |",
        f"| reads that waited for another read's fetch | {status['chain']['joined']} |",
        "",
        "Machine:",
        "",
    ]
    lines += [f"- {label}: {value}" for label, value in describe_machine(work_dir)]
    return "\n".join(lines)


def _isolate_aws_environment() -> None:
    """Give this process and the daemon the moto credentials and none of the host's AWS settings."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
                      AWS_DEFAULT_REGION=REGION, AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help="how long the readers run, in seconds (default %(default)s)")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS,
                        help="reader threads (default %(default)s)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"write the result into {RESULTS_PATH.name}")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _isolate_aws_environment()
    with tempfile.TemporaryDirectory(prefix="lazyfs-soak-") as directory:
        work_dir = Path(directory)
        result, status, image = run_benchmark(arguments.seconds, arguments.readers, work_dir)
        print(result.summary())
        for line in result.errors:
            print(f"error: {line}")
        if arguments.write_results:
            replace_section(RESULTS_PATH, SECTION_HEADING, results_section(result, status, image, work_dir))
            log.info("wrote %s", RESULTS_PATH)
    return 1 if result.error_count else 0


if __name__ == "__main__":
    sys.exit(main())
