"""Read one large file sequentially through a lazyfs mount, from each tier in turn.

A file of ``--size-mib`` MiB of random bytes (so zstd cannot shrink it) is cut
into 1 MiB chunks and published as a one-file image, without the indexer, into
a ``file://`` store and into a moto S3 bucket on 127.0.0.1. For each store,
each round measures ``cat FILE > /dev/null`` through the mount in four states:

- cold: a new daemon with empty RAM and LMDB tiers, page cache dropped;
- LMDB tier: the daemon restarted over the LMDB tier that the cold read filled,
  page cache dropped;
- RAM tier: the same daemon again, page cache dropped, so every chunk comes
  from its RAM tier;
- page cache: ``cat`` again with nothing dropped, so the kernel serves it.

Dropping the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``) affects
the whole machine. Needs root (FUSE, drop_caches) and /dev/fuse. Run it from
the repository root::

    .venv/bin/python -m benchmarks.read_throughput --runs 3 --write-results
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

from lazyfs.s3store import S3Store
from lazyfs.store import FileStore, Store, StoreOptions
from tests.support.daemon import running_daemon
from tests.support.s3server import MotoServer
from tests.support.sample_image import publish_single_file_image

from .boot_small import drop_page_cache, exit_on_sigterm, isolate_aws_environment, positive_int
from .machine import describe_machine
from .results_file import RESULTS_PATH, replace_section

log = logging.getLogger("benchmarks.read_throughput")

SECTION_HEADING = "Sequential read throughput (`benchmarks/read_throughput.py`)"

CHUNK_BYTES = 1 << 20
FILE_NAME = b"random.bin"
STATES = ("cold", "LMDB tier", "RAM tier", "page cache")
# Both tiers hold the whole file, with room for the chunks' own overhead.
RAM_CACHE_BYTES = 1 << 30
DISK_CACHE_BYTES = 2 << 30
CAT_TIMEOUT_S = 600.0


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed; the message names it."""


def missing_requirement() -> str | None:
    """Return why the benchmark cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the benchmark needs root for FUSE and drop_caches"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: load the fuse kernel module"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed: run scripts/install-deps"
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
        raise BenchmarkError(f"{path} has {size} bytes through the mount, expected {expected_bytes}")
    return seconds


def measure_round(store_url: str, endpoint_url: str | None, digest: str, size: int, work: Path,
                  seconds: dict[str, list[float]]) -> None:
    """Measure the four states once, each on the tiers the previous state left."""
    options = {"store_url": store_url, "ram_cache_bytes": RAM_CACHE_BYTES,
               "disk_cache_bytes": DISK_CACHE_BYTES, "disk_cache_path": str(work / "cache"),
               "log_level": "info"}
    if endpoint_url is not None:
        options["s3_endpoint_url"] = endpoint_url
    with running_daemon(directory=work / "cold", **options) as daemon:
        drop_page_cache()
        seconds["cold"].append(timed_cat(daemon.image(digest) / FILE_NAME.decode(), size))
    with running_daemon(directory=work / "restarted", **options) as daemon:
        path = daemon.image(digest) / FILE_NAME.decode()
        drop_page_cache()
        seconds["LMDB tier"].append(timed_cat(path, size))
        drop_page_cache()
        seconds["RAM tier"].append(timed_cat(path, size))
        seconds["page cache"].append(timed_cat(path, size))
        # Chunks whose fill the cold daemon dropped come from the store again.
        seconds["store requests after restart"].append(daemon.status()["tiers"]["store"]["requests"])


def run_benchmark(size: int, runs: int, work: Path) -> dict[str, dict[str, list[float]]]:
    """Publish the file into both stores and measure every state ``runs`` times."""
    data = os.urandom(size)
    results: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        moto = stack.enter_context(MotoServer())
        bucket = moto.create_bucket("read-throughput")
        stores: list[tuple[str, str, str | None, Store]] = [
            ("file://", f"file://{work / 'store'}", None, FileStore(work / "store")),
            ("moto S3", f"s3://{bucket}/images", moto.endpoint_url,
             S3Store(bucket, "images", StoreOptions(endpoint_url=moto.endpoint_url))),
        ]
        for label, url, endpoint_url, store in stores:
            started = time.perf_counter()
            digest, _addresses = publish_single_file_image(store, data, CHUNK_BYTES, FILE_NAME)
            store.close()
            log.info("published %d bytes into %s in %.1f s", size, url, time.perf_counter() - started)
            seconds: dict[str, list[float]] = defaultdict(list)
            for number in range(1, runs + 1):
                round_dir = work / f"{label.split()[0].strip(':/')}-{number}-{secrets.token_hex(2)}"
                measure_round(url, endpoint_url, digest, size, round_dir, seconds)
                shutil.rmtree(round_dir, ignore_errors=True)
                log.info("%s round %d: %s", label, number,
                         ", ".join(f"{state} {seconds[state][-1]:.3f} s" for state in STATES))
            results[label] = seconds
    return results


def format_report(results: dict[str, dict[str, list[float]]], size: int, runs: int,
                  machine: list[tuple[str, str]], total_s: float) -> str:
    lines = [
        f"Workload: `cat` of one file of {size >> 20} MiB of random bytes in 1 MiB chunks through the "
        f"mount, {runs} runs per state. Store, moto S3 and daemon on 127.0.0.1; RAM tier "
        f"{RAM_CACHE_BYTES >> 20} MiB, LMDB tier {DISK_CACHE_BYTES >> 20} MiB.",
        "",
        "Cold: new daemon, empty tiers, page cache dropped. LMDB tier: daemon restarted over the tier "
        "that the cold read filled, page cache dropped. RAM tier: the same daemon again, page cache "
        "dropped. Page cache: `cat` again, nothing dropped.",
        "",
        "| store | state | median (s) | min (s) | max (s) | median MB/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, seconds in results.items():
        for state in STATES:
            values = seconds[state]
            median = statistics.median(values)
            lines.append(f"| {label} | {state} | {median:.3f} | {min(values):.3f} | {max(values):.3f} "
                         f"| {size / median / 1e6:.0f} |")
    lines.append("")
    for label, seconds in results.items():
        refetched = seconds["store requests after restart"]
        lines.append(f"{label}: chunks that the restarted daemon fetched from the store again, because "
                     f"the cold daemon dropped their LMDB fill: {', '.join(str(count) for count in refetched)}.")
    lines += [
        "",
        "Machine:",
        "",
        *[f"- {label}: {value}" for label, value in machine],
        "",
        f"Command: `.venv/bin/python -m benchmarks.read_throughput --runs {runs}` on "
        f"{time.strftime('%Y-%m-%d')}, {total_s / 60:.1f} minutes in all.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.read_throughput",
        description="Time a sequential read of one large file through lazyfs: cold, from the LMDB "
                    "tier, from the RAM tier and from the page cache, over a file:// store and moto "
                    "S3. Needs root.")
    parser.add_argument("--runs", type=positive_int, default=3, metavar="N",
                        help="measured runs per state (default: %(default)s)")
    parser.add_argument("--size-mib", type=positive_int, default=256, metavar="MIB",
                        help="size of the file in MiB (default: %(default)s)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"write the report into {RESULTS_PATH.name}, replacing this benchmark's section")
    parser.add_argument("--results-file", type=Path, default=RESULTS_PATH, metavar="FILE",
                        help="results file for --write-results (default: benchmarks/RESULTS.md)")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp"), metavar="DIR",
                        help="parent of the temporary working directory for the store and the LMDB "
                             "tiers, which is removed at the end (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each round to stderr")
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
        results = run_benchmark(size, args.runs, work)
    except RuntimeError as error:
        # BenchmarkError, and the start errors of moto and the daemon.
        print(f"read_throughput: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    machine = [(label, value) for label, value in describe_machine(args.work_dir)
               if label not in ("runc", "umoci", "skopeo")]
    report = format_report(results, size, args.runs, machine, time.monotonic() - started)
    print(report, end="")
    if args.write_results:
        replace_section(args.results_file, SECTION_HEADING, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
