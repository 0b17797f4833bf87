"""Stat every file of an image through lazyfs, squashfuse and ext4; time attach and daemon memory.

The image is one of the debootstrap images of ``tests.support.images``. It is
indexed with ``lazyfs-index`` into a ``file://`` store, unpacked with
``umoci unpack`` onto the working directory's file system (ext4 here), and
that tree is packed into a zstd squashfs mounted with ``squashfuse``. Each
round, with the dentry, inode and page caches dropped first, measures:

- attach: on a new daemon with empty tiers, the time from the first lookup
  of ``images/<digest>`` to the end of its listing. Then the daemon's
  resident memory (VmRSS) with the image attached.
- stat: ``lstat`` of every entry of the tree, walked with ``os.scandir``, on
  the lazyfs mount (right after the attach), on the squashfuse mount and on
  the unpacked tree.

Needs root (FUSE, drop_caches, umoci unpack), /dev/fuse, mksquashfs and
squashfuse. Run it from the repository root::

    .venv/bin/python -m benchmarks.metadata --image small --runs 3 --write-results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tests.support import images
from tests.support.daemon import running_daemon

from .boot_small import console_script, drop_page_cache, exit_on_sigterm, positive_int
from .machine import describe_machine
from .read_throughput import BenchmarkError, missing_requirement, squashfuse_mount
from .results_file import add_output_arguments, replace_section

log = logging.getLogger("benchmarks.metadata")

SECTION_HEADING = "Metadata, attach and daemon memory (`benchmarks/metadata.py`)"

# Image name on the command line -> function returning (OCI layout, tag).
IMAGES: dict[str, Callable[[], tuple[Path, str]]] = {"small": images.debootstrap_image}
if hasattr(images, "fat_image"):
    IMAGES["fat"] = images.fat_image
STAT_STATES = ("lazyfs", "squashfuse", "ext4")


def stat_tree(root: Path) -> int:
    """Call lstat on every entry under ``root`` (not following symlinks); return the count."""
    count = 0
    pending = [os.fspath(root)]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return count


def timed(call: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def resident_bytes(pid: int) -> int:
    """Return VmRSS of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchmarkError(f"/proc/{pid}/status has no VmRSS line")


def index_image(layout: Path, tag: str, store: Path) -> tuple[str, float]:
    """Index the image into a file:// store; return its index digest and the seconds it took."""
    started = time.perf_counter()
    result = subprocess.run([str(console_script("lazyfs-index")), "--store", f"file://{store}", "--tag", tag,
                             "--json", str(layout)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchmarkError(f"lazyfs-index {layout} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)["index_digest"], seconds


@contextmanager
def reference_trees(layout: Path, tag: str, work: Path) -> Iterator[tuple[Path, Path]]:
    """Yield the umoci-unpacked rootfs and its squashfuse mount."""
    rootfs = images.umoci_unpack(layout, tag, work / "bundle")
    squashfs = work / "image.squashfs"
    result = subprocess.run(["mksquashfs", str(rootfs), str(squashfs), "-comp", "zstd", "-noappend",
                             "-quiet", "-no-progress"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchmarkError(f"mksquashfs failed: {result.stderr.strip()}")
    with squashfuse_mount(squashfs, work / "squashfuse") as mountpoint:
        yield rootfs, mountpoint


def measure_round(store: Path, digest: str, rootfs: Path, squashfs_root: Path, work: Path,
                  results: dict[str, list[float]], counts: dict[str, set[int]]) -> None:
    with running_daemon(directory=work, store_url=f"file://{store}", log_level="info") as daemon:
        image_dir = daemon.image(digest)
        drop_page_cache()
        seconds, _ = timed(lambda: len(os.listdir(image_dir)))
        results["attach"].append(seconds)
        results["daemon RSS"].append(resident_bytes(daemon.pid))
        seconds, count = timed(lambda: stat_tree(image_dir))
        results["lazyfs"].append(seconds)
        counts["lazyfs"].add(count)
    for state, root in (("squashfuse", squashfs_root), ("ext4", rootfs)):
        drop_page_cache()
        seconds, count = timed(lambda: stat_tree(root))
        results[state].append(seconds)
        counts[state].add(count)


def run_benchmark(image: str, runs: int, work: Path) -> tuple[dict, dict, str, float]:
    layout, tag = IMAGES[image]()
    store = work / "store"
    digest, index_s = index_image(layout, tag, store)
    results: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, set[int]] = defaultdict(set)
    with reference_trees(layout, tag, work) as (rootfs, squashfs_root):
        for number in range(1, runs + 1):
            measure_round(store, digest, rootfs, squashfs_root, work / f"daemon-{number}", results, counts)
            log.info("round %d: %s", number,
                     ", ".join(f"{state} {results[state][-1]:.3f} s" for state in ("attach", *STAT_STATES)))
    if len({frozenset(values) for values in counts.values()}) != 1 or len(counts["ext4"]) != 1:
        raise BenchmarkError(f"the trees differ in entry counts: {dict(counts)}")
    return results, {state: next(iter(values)) for state, values in counts.items()}, digest, index_s


def format_report(image: str, results: dict, counts: dict, runs: int, machine: list[tuple[str, str]],
                  total_s: float) -> str:
    median = {name: statistics.median(values) for name, values in results.items()}
    lines = [
        f"Image: `{image}` from `tests.support.images`, {counts['ext4']} entries below the root. "
        f"{runs} rounds; dentry, inode and page caches dropped before each measurement.",
        "",
        "| measurement | median | min | max |",
        "|---|---:|---:|---:|",
        f"| attach: first lookup to end of listing (ms) | {median['attach'] * 1e3:.1f} "
        f"| {min(results['attach']) * 1e3:.1f} | {max(results['attach']) * 1e3:.1f} |",
        f"| daemon RSS, image attached, empty tiers (MB) | {median['daemon RSS'] / 1e6:.1f} "
        f"| {min(results['daemon RSS']) / 1e6:.1f} | {max(results['daemon RSS']) / 1e6:.1f} |",
    ]
    for state in STAT_STATES:
        values = results[state]
        lines.append(f"| lstat of every entry, {state} (s) | {median[state]:.3f} | {min(values):.3f} "
                     f"| {max(values):.3f} |")
    lines += [
        "",
        "| ratio of medians | value |",
        "|---|---:|",
        f"| lstat time, lazyfs / ext4 | {median['lazyfs'] / median['ext4']:.2f} |",
        f"| lstat time, lazyfs / squashfuse | {median['lazyfs'] / median['squashfuse']:.2f} |",
        "",
        "Machine:",
        "",
        *[f"- {label}: {value}" for label, value in machine],
        "",
        f"Command: `.venv/bin/python -m benchmarks.metadata --image {image} --runs {runs}` on "
        f"{time.strftime('%Y-%m-%d')}, {total_s / 60:.1f} minutes in all.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metadata",
        description="Time lstat of every file of an image through lazyfs, squashfuse and ext4, the "
                    "attach of the image, and the daemon's memory. Needs root.")
    parser.add_argument("--image", choices=sorted(IMAGES), default="small",
                        help="test image to measure (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=3, metavar="N",
                        help="measured rounds (default: %(default)s)")
    add_output_arguments(parser, "the store, the unpacked tree and the squashfs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    problem = missing_requirement()
    if problem is not None:
        print(f"metadata: error: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lazyfs-metadata-", dir=args.work_dir))
    try:
        results, counts, _digest, _index_s = run_benchmark(args.image, args.runs, work)
    except RuntimeError as error:
        # BenchmarkError, image build errors and the daemon's start errors.
        print(f"metadata: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    machine = [(label, value) for label, value in describe_machine(args.work_dir)
               if label not in ("runc", "skopeo")]
    report = format_report(args.image, results, counts, args.runs, machine, time.monotonic() - started)
    print(report, end="")
    if args.write_results:
        replace_section(args.results_file, SECTION_HEADING, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
