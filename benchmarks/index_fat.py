"""Index the fat image: ``lazyfs-index`` against ``umoci unpack`` and ``casync make``.

The image is the fat benchmark image of ``tests.support.images.fat_image``
(debootstrap bookworm with numpy, scipy, pandas, matplotlib and ipykernel, two
gzip layers). It is pushed once with ``skopeo copy`` to a docker-registry on
127.0.0.1. Each round then measures, in turns so that slow drifts of the
machine affect all three alike:

- lazyfs: ``lazyfs-index --quiet --json`` from the registry into a new
  ``file://`` store, as its own process (interpreter start included).
- lazyfs rerun: the same command again into that store, which finds every
  layer's record and uploads nothing.
- umoci: ``umoci unpack`` of the image from its OCI layout into a new bundle.
- casync: ``casync make`` of the rootfs that the first ``umoci unpack``
  wrote, into a new chunk store and ``.caidx`` index (casync's defaults).

The page cache is not dropped: the layer blobs and the unpacked tree are read
from memory after the first round, for all three. ``sync`` runs, untimed,
before each timed step, so that no step pays for writing back the files that
an earlier step left in the page cache. Stored bytes are the sizes
of the files each tool writes: lazyfs ``chunks/`` and ``indexes/`` (its
``layers/`` records are listed apart), casync the ``.caidx`` and its store.

Needs root (umoci keeps owners, casync reads every file), the Debian packages
umoci, skopeo, docker-registry and casync, and the fat image, which the first
run builds (several minutes, Debian mirror). From the repository root::

    .venv/bin/python -m benchmarks.index_fat --runs 3 --write-results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import images
from tests.support.registry import Registry

from .machine import describe_machine, tool_version
from .results_file import RESULTS_PATH, replace_section

log = logging.getLogger("benchmarks.index_fat")

SECTION_HEADING = "Fat image indexing (`benchmarks/index_fat.py`)"
REPOSITORY = "lazyfs/bookworm-fat"
REFERENCE_TAG = "index-fat"
STEP_TIMEOUT_S = 1800.0

LAZYFS = "lazyfs-index, new store"
RERUN = "lazyfs-index, rerun into the same store"
UMOCI = "umoci unpack"
CASYNC = "casync make"

# Targets: lazyfs time as a fraction of the others' time.
TARGET_VS_CASYNC = 0.4
TARGET_VS_UMOCI = 0.5


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed; the message names it and contains its output."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds to measure (default: 3)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"write the results section into {RESULTS_PATH}")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="directory for stores and bundles (default: a new one under /var/tmp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        print("index_fat needs root (umoci unpack keeps owners)", file=sys.stderr)
        return 1
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lazyfs-index-fat-", dir=args.work_dir or "/var/tmp"))
    try:
        report = run_benchmark(work, args.runs)
    except (BenchmarkError, images.ImageBuildError) as exc:
        print(f"index_fat: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    if args.write_results:
        replace_section(RESULTS_PATH, SECTION_HEADING, report)
        log.info("wrote %s", RESULTS_PATH)
    return 0


def run_benchmark(work: Path, runs: int) -> str:
    """Measure every tool ``runs`` times and return the results section as Markdown."""
    layout, tag = images.fat_image()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {LAZYFS: [], RERUN: [], UMOCI: [], CASYNC: []}
    stored: dict[str, int] = {}
    with Registry() as registry:
        started = time.monotonic()
        registry.push(layout, tag, REPOSITORY, REFERENCE_TAG)
        push_s = time.monotonic() - started
        reference = f"docker://{registry.host}/{REPOSITORY}:{REFERENCE_TAG}"
        tree = _unpack(layout, tag, work / "reference-bundle")
        image = _describe_tree(tree)
        for number in range(1, runs + 1):
            store = work / f"store-{number}"
            os.sync()
            seconds, result = _index(reference, store)
            times[LAZYFS].append(seconds)
            stored = _lazyfs_bytes(store)
            stored["index_bytes_reported"] = result["index_bytes"]
            os.sync()
            seconds, rerun = _index(reference, store)
            times[RERUN].append(seconds)
            if rerun["chunks_new"] != 0 or rerun["index_digest"] != result["index_digest"]:
                raise BenchmarkError(f"the rerun stored {rerun['chunks_new']} new chunks or changed "
                                     f"the index digest: {rerun}")
            shutil.rmtree(store)

            bundle = work / f"bundle-{number}"
            os.sync()
            started = time.monotonic()
            _unpack(layout, tag, bundle)
            times[UMOCI].append(time.monotonic() - started)
            _remove(bundle)

            casync_store = work / f"casync-{number}.castr"
            caidx = work / f"casync-{number}.caidx"
            os.sync()
            started = time.monotonic()
            _run(["casync", "make", f"--store={casync_store}", str(caidx), str(tree)], "casync make")
            times[CASYNC].append(time.monotonic() - started)
            stored["casync_index"] = caidx.stat().st_size
            stored["casync_chunks"] = _tree_bytes(casync_store)
            caidx.unlink()
            shutil.rmtree(casync_store)
            log.info("round %d of %d: %s", number, runs,
                     ", ".join(f"{name} {values[-1]:.1f} s" for name, values in times.items()))
    load_after = os.getloadavg()
    return _report(image, result, times, stored, push_s, runs, work, load_before, load_after)


def _index(reference: str, store: Path) -> tuple[float, dict]:
    command = [str(Path(sys.executable).parent / "lazyfs-index"), "--store", store.as_uri(),
               "--plain-http", "--quiet", "--json", reference]
    started = time.monotonic()
    output = _run(command, "lazyfs-index")
    return time.monotonic() - started, json.loads(output)


def _unpack(layout: Path, tag: str, bundle: Path) -> Path:
    _run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], "umoci unpack")
    return bundle / "rootfs"


def _run(command: list[str], step: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{step} timed out after {STEP_TIMEOUT_S:.0f} s: {' '.join(command)}") from None
    if result.returncode != 0:
        raise BenchmarkError(f"{step} failed with exit code {result.returncode}: {' '.join(command)}\n"
                             f"{result.stderr[-3000:]}")
    return result.stdout


def _remove(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _tree_bytes(path: Path) -> int:
    total = 0
    for directory, _subdirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_size
    return total


def _lazyfs_bytes(store: Path) -> dict[str, int]:
    return {"lazyfs_chunks": _tree_bytes(store / "chunks"),
            "lazyfs_index": _tree_bytes(store / "indexes"),
            "lazyfs_records": _tree_bytes(store / "layers")}


def _describe_tree(root: Path) -> dict[str, int]:
    entries = files = file_bytes = 0
    for directory, subdirs, names in os.walk(root):
        entries += len(subdirs) + len(names)
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            if not os.path.islink(os.path.join(directory, name)) and os.path.isfile(
                    os.path.join(directory, name)):
                files += 1
                file_bytes += info.st_size
    return {"entries": entries, "files": files, "file_bytes": file_bytes}


def _report(image: dict, result: dict, times: dict[str, list[float]], stored: dict[str, int],
            push_s: float, runs: int, work: Path, load_before: tuple, load_after: tuple) -> str:
    median = {name: statistics.median(values) for name, values in times.items()}
    lazyfs_bytes = stored["lazyfs_chunks"] + stored["lazyfs_index"]
    casync_bytes = stored["casync_chunks"] + stored["casync_index"]
    lines = [
        f"Image: the fat image of `tests.support.images.fat_image` ({images.FAT_IMAGE_NAME}), "
        f"{result['layers']} gzip layers; unpacked {image['entries']} entries, {image['files']} "
        f"regular files, {image['file_bytes'] / 1e9:.2f} GB of file data.",
        f"Pushed once to a docker-registry on 127.0.0.1 with `skopeo copy` in {push_s:.1f} s. "
        f"{runs} rounds, the tools taking turns; page cache not dropped, `sync` before each "
        "timed step. lazyfs-index runs as its "
        "own process from the registry into a new `file://` store; casync makes the rootfs that "
        "`umoci unpack` wrote, with its default settings.",
        "",
        "| tool | median (s) | min (s) | max (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {median[name]:.2f} | {min(values):.2f} | {max(values):.2f} |")
    lines += [
        "",
        "| stored | bytes |",
        "|---|---:|",
        f"| lazyfs chunks ({result['chunks']} chunks) | {stored['lazyfs_chunks']:,} |",
        f"| lazyfs index | {stored['lazyfs_index']:,} |",
        f"| lazyfs total (chunks + index) | {lazyfs_bytes:,} |",
        f"| lazyfs layer records (`layers/`, not in the total) | {stored['lazyfs_records']:,} |",
        f"| casync chunk store | {stored['casync_chunks']:,} |",
        f"| casync `.caidx` | {stored['casync_index']:,} |",
        f"| casync total | {casync_bytes:,} |",
        "",
        f"Ratios of medians: lazyfs / casync time {median[LAZYFS] / median[CASYNC]:.2f} "
        f"(target at most {TARGET_VS_CASYNC}), lazyfs / umoci unpack time "
        f"{median[LAZYFS] / median[UMOCI]:.2f} (target at most {TARGET_VS_UMOCI}), "
        f"lazyfs / casync stored bytes {lazyfs_bytes / casync_bytes:.2f} (target at most 1). "
        f"Against the fastest round of each instead of the median: lazyfs / casync time "
        f"{median[LAZYFS] / min(times[CASYNC]):.2f}, lazyfs / umoci unpack time "
        f"{median[LAZYFS] / min(times[UMOCI]):.2f}.",
        "",
        f"Load average (1, 5, 15 min) before: {_load(load_before)}; after: {_load(load_after)}.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    machine = describe_machine(work) + [("casync", tool_version(["casync", "--version"]))]
    lines += [f"| {label} | {value} |" for label, value in machine]
    return "\n".join(lines)


def _load(values: tuple) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    sys.exit(main())
