"""Settle the indexer's pack and chunk sizes with the fat image's cold boot.

The fat image (``tests.support.images.fat_image``) is indexed once per
chunking setting, each time into a fresh moto S3 bucket on 127.0.0.1, and
its boot trace is recorded. Then the workload of ``benchmarks.boot_fat`` runs
in two cold states per setting: a first boot, with boot traces off, and a
cold boot at the daemon's defaults, which replays the trace. Each run starts
a new daemon with empty tiers after dropping the page cache. The settings
take turns within each round.

Smaller packs and chunks mean fewer bytes fetched, verified, decompressed and
cached beyond those the workload reads, and more store requests, each of
which costs a round trip and CPU time on both ends. The report lists the
time, the requests and the bytes of each setting.

Run it from the repository root, as root, after building the fat image::

    .venv/bin/python -m benchmarks.chunk_sizes --runs 3 --write-results
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from lazyfs.indexer.chunker import ChunkingParams
from lazyfs.indexer.pipeline import IndexOptions, index_image
from lazyfs.indexer.source import open_source
from lazyfs.store import StoreOptions, open_store
from tests.support.s3server import MotoServer

from . import bootlib
from .boot_fat import BENCHMARK, cached_fat_image
from .results_file import add_output_arguments
from .runner import Formatter, machine_lines, run_benchmark

log = logging.getLogger(__name__)

SECTION_HEADING = "Pack and chunk sizes (`benchmarks/chunk_sizes.py`)"
FIRST = "first boot"
COLD = "cold, trace replayed"
STATES = ((FIRST, bootlib.TRACES_OFF), (COLD, bootlib.DEFAULTS))


@dataclass(frozen=True)
class Setting:
    """One chunking setting: the pack size and the FastCDC sizes, in bytes."""

    pack_bytes: int
    avg_chunk_bytes: int

    @property
    def label(self) -> str:
        return f"packs {self.pack_bytes >> 10} KiB, chunks {self.avg_chunk_bytes >> 10} KiB"

    @property
    def params(self) -> ChunkingParams:
        # FastCDC bounds at a quarter and four times the average, as in the defaults.
        return dataclasses.replace(ChunkingParams(), pack_bytes=self.pack_bytes,
                                   min_chunk_bytes=self.avg_chunk_bytes // 4,
                                   avg_chunk_bytes=self.avg_chunk_bytes,
                                   max_chunk_bytes=self.avg_chunk_bytes * 4)


SETTINGS = (
    Setting(1 << 20, 1 << 20),
    Setting(512 << 10, 1 << 20),
    Setting(256 << 10, 1 << 20),
    Setting(512 << 10, 512 << 10),
    Setting(2 << 20, 2 << 20),
)


@dataclass
class Indexed:
    """The fat image indexed with one setting."""

    setting: Setting
    store: bootlib.Store
    image: bootlib.IndexedImage
    chunks: int
    stored_bytes: int


def index_with(setting: Setting, moto: MotoServer, number: int) -> Indexed:
    """Index the fat image with ``setting`` into a new bucket and record its boot trace."""
    layout, tag = cached_fat_image()
    bucket = moto.create_bucket(f"chunk-sizes-{number}")
    store = bootlib.Store(f"s3://{bucket}/images", moto.endpoint_url)
    name = f"bench/chunk-sizes:{number}"
    source = open_source(str(layout), tag=tag)
    target = open_store(store.url, StoreOptions(endpoint_url=store.endpoint_url))
    started = time.perf_counter()
    try:
        result = index_image(source, target, IndexOptions(names=(name,), chunking=setting.params))
    finally:
        source.close()
        target.close()
    index_s = time.perf_counter() - started
    summary = dataclasses.asdict(result)
    layer_bytes = sum(layer["size"] for layer in bootlib.read_manifest(layout, tag)["layers"])
    image = bootlib.IndexedImage(layout, tag, name, summary, layer_bytes, 0.0, index_s)
    log.info("%s: %d chunks, %.1f MB stored, indexed in %.1f s", setting.label, result.chunks,
             result.bytes_stored / 1e6, index_s)
    return Indexed(setting, store, image, result.chunks, result.bytes_stored)


def measure_round(indexed: Indexed, work: Path, measurements: dict[Setting, bootlib.Measurements]) -> None:
    for state, traces in STATES:
        directory = work / f"{state.split(',')[0].replace(' ', '-')}-daemon"
        with bootlib.timed_daemon(indexed.store, directory, work / "lmdb", traces) as (daemon, _s):
            bootlib.drop_page_cache()
            bootlib.measure_lazyfs_run(BENCHMARK, state, daemon, indexed.image, work,
                                       measurements[indexed.setting])
        bootlib.remove_tree(work / "lmdb")
        bootlib.remove_tree(directory)


def run(runs: int, work: Path) -> tuple[list[Indexed], dict[Setting, bootlib.Measurements], float]:
    measurements = {setting: bootlib.Measurements() for setting in SETTINGS}
    start_load = bootlib.load_average()
    with ExitStack() as servers:
        moto = servers.enter_context(MotoServer())
        indexed = [index_with(setting, moto, number) for number, setting in enumerate(SETTINGS)]
        for entry in indexed:
            bootlib.record_trace(BENCHMARK, entry.store, entry.image, work)
        for number in range(1, runs + 1):
            log.info("round %d of %d, load average %.2f", number, runs, bootlib.load_average())
            for entry in indexed:
                measure_round(entry, work / f"round-{number}", measurements)
            bootlib.remove_tree(work / f"round-{number}")
    return indexed, measurements, start_load


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_report(indexed: list[Indexed], measurements: dict[Setting, bootlib.Measurements], runs: int,
                  start_load: float, machine: list[tuple[str, str]], total_s: float) -> str:
    first = indexed[0].image.index
    lines = [
        f"Workload: the fat image boot of `benchmarks/boot_fat.py` (`{BENCHMARK.program}` in a runc "
        f"container), {runs} runs per setting and state, the settings taking turns. Each setting indexes "
        f"the image ({first['files']} files, {first['file_bytes'] / 1e6:.1f} MB of data) into a fresh "
        "moto S3 bucket on 127.0.0.1. Small files are packed into shared chunks of up to the pack size; "
        "larger files are cut by FastCDC with the given average size (a quarter of it at least, four "
        "times at most). First boot: a new daemon with boot traces off and empty tiers, page cache "
        "dropped. Cold: the same at the daemon's defaults, which replay the image's recorded trace.",
        "",
        "| setting | chunks | stored | first boot (s) | cold (s) | chunk requests | fetched, compressed "
        "| fetched, uncompressed | read through the mount |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in indexed:
        result = measurements[entry.setting]
        counters = result.counters[FIRST]
        lines.append(
            f"| {entry.setting.label} | {entry.chunks} | {entry.stored_bytes / 1e6:.1f} MB "
            f"| {median(result.seconds[FIRST]):.3f} | {median(result.seconds[COLD]):.3f} "
            f"| {median(counters['chunk requests']):.0f} "
            f"| {median(counters['fetched bytes, compressed']) / 1e6:.1f} MB "
            f"| {median(counters['fetched bytes, uncompressed']) / 1e6:.1f} MB "
            f"| {median(counters['bytes read through the mount']) / 1e6:.1f} MB |")
    verdict = "" if start_load < 1 else " (not under 1, so other work on the machine affected these numbers)"
    lines += [
        "",
        "Times are medians of the whole `lazyfs-run` wall clock; the counters are those of the first boot.",
        "",
        f"One-minute load average when the benchmark started: {start_load:.2f}{verdict}.",
        "",
        *machine_lines(machine),
        "",
        f"Command: `.venv/bin/python -m benchmarks.chunk_sizes --runs {runs}` on "
        f"{time.strftime('%Y-%m-%d')}, {total_s / 60:.1f} minutes in all.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chunk_sizes",
        description="Boot the fat image cold with several pack and chunk sizes of the indexer. Needs root.")
    parser.add_argument("--runs", type=bootlib.positive_int, default=3, metavar="N",
                        help="measured runs per setting and state (default: %(default)s)")
    add_output_arguments(parser, "the LMDB tiers and container state")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def measure(work: Path) -> Formatter:
        bootlib.isolate_aws_environment()
        indexed, measurements, start_load = run(args.runs, work)
        return functools.partial(format_report, indexed, measurements, args.runs, start_load)

    return run_benchmark("chunk_sizes", args, SECTION_HEADING, measure, bootlib.missing_requirement())


if __name__ == "__main__":
    sys.exit(main())
