"""Cost of one FUSE request: lazyfs against a minimal pyfuse3 file system and ext4.

The same small tree (``benchmarks.barefs``: a 4 KiB file, a symlink to it and a
directory of 100 small files) is served three ways: by lazyfs, published as a
one-image file store and mounted by a daemon at its defaults; by
``benchmarks.barefs``, a pyfuse3 file system that serves from memory and does
nothing else; and as plain files on the working directory's ext4. Before the
timed loops every path is read once, so every chunk sits in the RAM tier and
every entry and attribute in the kernel's caches. Each operation then runs
``--iterations`` times in a loop, and the report gives the wall time per
operation and, for the FUSE file systems, the daemon's CPU time per FUSE
request (user and system time of the process, from /proc, divided by the
requests the loop sent):

- open + close: OPEN and RELEASE (the reply to the first FLUSH is ENOSYS, so the
  kernel stops sending it);
- getxattr of a missing name: GETXATTR, as overlayfs sends for its
  ``trusted.overlay.*`` names;
- readlink: READLINK, which the kernel sends on every path walk through a
  symlink, because pyfuse3 cannot ask for the kernel's symlink cache;
- listdir: OPENDIR, READDIRPLUS twice and RELEASEDIR;
- stat: nothing, the kernel answers from its attribute cache.

The rounds alternate the three file systems; the figures are medians.
Needs root (FUSE) and /dev/fuse. Run from the repository root::

    .venv/bin/python -m benchmarks.fuse_requests --runs 5 --write-results
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from lazyfs.config import DaemonConfig
from lazyfs.daemon import is_mounted
from lazyfs.index import Node
from lazyfs.store import FileStore
from tests.support.daemon import running_daemon
from tests.support.sample_image import MTIME_NS, directory, publish_index, put_chunk

from . import barefs
from .bootlib import positive_int
from .results_file import add_output_arguments
from .runner import Formatter, machine_lines, run_benchmark

log = logging.getLogger(__name__)

SECTION_HEADING = "FUSE request cost (`benchmarks/fuse_requests.py`)"
FILE_SYSTEMS = ("lazyfs", "pyfuse3 minimal", "ext4")
MOUNT_TIMEOUT_S = 30.0


def open_close(root: Path) -> None:
    os.close(os.open(root / "file", os.O_RDONLY))


def getxattr_missing(root: Path) -> None:
    try:
        os.getxattr(root / "file", "trusted.overlay.metacopy", follow_symlinks=False)
    except OSError as error:
        if error.errno != errno.ENODATA:
            raise


def readlink(root: Path) -> None:
    os.readlink(root / "link")


def listdir(root: Path) -> None:
    os.listdir(root / "dir")


def stat_file(root: Path) -> None:
    os.stat(root / "file")


# Operation name, function, FUSE requests per call.
OPERATIONS: tuple[tuple[str, Callable[[Path], None], int], ...] = (
    ("open + close", open_close, 2),
    ("getxattr of a missing name", getxattr_missing, 1),
    ("readlink", readlink, 1),
    ("listdir of 100 entries", listdir, 4),
    ("stat (cached)", stat_file, 0),
)


def publish_tree(store: FileStore) -> str:
    """Publish barefs's tree as a lazyfs image and return its index digest."""
    small = b"x" * barefs.SMALL_BYTES
    whole = b"x" * barefs.FILE_BYTES
    pack = whole + small * barefs.DIR_ENTRIES
    address = put_chunk(store, pack)

    def regular(offset: int, size: int) -> Node:
        return Node(mode=0o100644, mtime_ns=MTIME_NS, size=size, extents=[(address, offset, size)])

    entries = {barefs.small_name(number): regular(barefs.FILE_BYTES + number * barefs.SMALL_BYTES,
                                                  barefs.SMALL_BYTES)
               for number in range(barefs.DIR_ENTRIES)}
    root = directory({b"file": regular(0, barefs.FILE_BYTES),
                      b"link": Node(mode=0o120777, mtime_ns=MTIME_NS, target=b"file"),
                      b"dir": directory(entries)})
    return publish_index(store, root, {address: len(pack)})


def write_tree(root: Path) -> None:
    """Write barefs's tree as plain files."""
    (root / "dir").mkdir(parents=True)
    (root / "file").write_bytes(b"x" * barefs.FILE_BYTES)
    (root / "link").symlink_to("file")
    for number in range(barefs.DIR_ENTRIES):
        (root / "dir" / barefs.small_name(number).decode()).write_bytes(b"x" * barefs.SMALL_BYTES)


def warm_up(root: Path) -> None:
    for path in (root / "file", *sorted((root / "dir").iterdir())):
        path.read_bytes()
    for _name, operation, _requests in OPERATIONS:
        operation(root)


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(root: Path, pid: int | None, iterations: int,
            results: dict[tuple[str, str], dict[str, list[float]]], name: str) -> None:
    """Time each operation ``iterations`` times; record µs per call and the daemon's µs per request."""
    for operation_name, operation, requests in OPERATIONS:
        cpu_before = process_cpu_s(pid) if pid is not None else 0.0
        started = time.perf_counter()
        for _ in range(iterations):
            operation(root)
        wall_s = time.perf_counter() - started
        entry = results[(name, operation_name)]
        entry["wall"].append(wall_s / iterations * 1e6)
        if pid is not None and requests:
            entry["cpu"].append((process_cpu_s(pid) - cpu_before) / (iterations * requests) * 1e6)


class BareMount:
    """``benchmarks.barefs`` mounted at a directory for the block."""

    def __init__(self, mountpoint: Path):
        self.mountpoint = mountpoint
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> BareMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.barefs", str(self.mountpoint)])
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not is_mounted(str(self.mountpoint)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"benchmarks.barefs did not mount {self.mountpoint}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=MOUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if is_mounted(str(self.mountpoint)):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def run(runs: int, iterations: int, work: Path) -> dict[tuple[str, str], dict[str, list[float]]]:
    results: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    store = FileStore(work / "store")
    digest = publish_tree(store)
    write_tree(work / "ext4")
    defaults = DaemonConfig()
    # The test fixture's smaller tiers and shorter fetch timeout are set back to the defaults.
    with running_daemon(directory=work / "daemon", store_url=store.url, log_level="warning",
                        ram_cache_bytes=defaults.ram_cache_bytes, disk_cache_bytes=defaults.disk_cache_bytes,
                        fetch_timeout_s=defaults.fetch_timeout_s) as daemon, \
            BareMount(work / "bare") as bare:
        roots = {"lazyfs": (daemon.image(digest), daemon.process.pid),
                 "pyfuse3 minimal": (bare.mountpoint, bare.process.pid),
                 "ext4": (work / "ext4", None)}
        for root, _pid in roots.values():
            warm_up(root)
        for number in range(1, runs + 1):
            log.info("round %d of %d", number, runs)
            for name in FILE_SYSTEMS:
                root, pid = roots[name]
                measure(root, pid, iterations, results, name)
    return results


def format_report(results: dict[tuple[str, str], dict[str, list[float]]], runs: int, iterations: int,
                  machine: list[tuple[str, str]], total_s: float) -> str:
    lines = [
        f"The same small tree served by lazyfs (a daemon at its defaults, every chunk in the RAM tier), by "
        f"`benchmarks/barefs.py` (a pyfuse3 file system answering from memory with the same kernel caching) "
        f"and by ext4. {iterations} calls per operation and round, {runs} rounds, medians. Wall: time per "
        "call. CPU: the daemon's user and system time per FUSE request, from /proc in 10 ms ticks, so "
        f"with {iterations} calls a round it is good to about {10_000 / iterations:.0f} µs per call. "
        "The FUSE requests per call are those the kernel sends for the operation, not counted here.",
        "",
        "| operation | FUSE requests | lazyfs wall (µs) | lazyfs CPU (µs/request) | pyfuse3 minimal wall (µs) "
        "| pyfuse3 minimal CPU (µs/request) | ext4 wall (µs) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(name: str, operation: str, kind: str) -> str:
        values = results[(name, operation)][kind]
        return f"{statistics.median(values):.1f}" if values else "-"

    for operation, _function, requests in OPERATIONS:
        lines.append(f"| {operation} | {requests} | {cell('lazyfs', operation, 'wall')} "
                     f"| {cell('lazyfs', operation, 'cpu')} | {cell('pyfuse3 minimal', operation, 'wall')} "
                     f"| {cell('pyfuse3 minimal', operation, 'cpu')} | {cell('ext4', operation, 'wall')} |")
    lines += [
        "",
        *machine_lines(machine),
        "",
        f"Command: `.venv/bin/python -m benchmarks.fuse_requests --runs {runs} --iterations {iterations}` "
        f"on {time.strftime('%Y-%m-%d')}, {total_s / 60:.1f} minutes in all.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fuse_requests",
        description="Time single FUSE requests through lazyfs, a minimal pyfuse3 file system and ext4. "
                    "Needs root.")
    parser.add_argument("--runs", type=positive_int, default=5, metavar="N",
                        help="rounds over the three file systems (default: %(default)s)")
    parser.add_argument("--iterations", type=positive_int, default=5000, metavar="N",
                        help="calls per operation and round (default: %(default)s)")
    add_output_arguments(parser, "the store, the mounts and the ext4 tree")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def measure(work: Path) -> Formatter:
        results = run(args.runs, args.iterations, work)
        return functools.partial(format_report, results, args.runs, args.iterations)

    problem = None if os.geteuid() == 0 else "needs root, for FUSE mounts"
    return run_benchmark("fuse_requests", args, SECTION_HEADING, measure, problem)


if __name__ == "__main__":
    sys.exit(main())
