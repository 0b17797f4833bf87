"""Boot benchmarks: one workload in a runc container, lazyfs against pull + unpack and a local rootfs.

``benchmarks.boot_small`` and ``benchmarks.boot_fat`` describe their image and
workload in a ``BootBenchmark`` and call ``main``. All servers run on
127.0.0.1: the image is pushed to a docker-registry and indexed from there,
once and untimed, into a moto S3 bucket. A recording run, also untimed, then
writes the image's boot trace (``lazyfs.prefetch``): a daemon with
``trace_record`` runs the workload once through ``lazyfs-run``, which ends the
recording when the command exits. The states, each measured ``--runs`` times:

- lazyfs cold: a new daemon at its defaults, so with ``trace_replay`` on,
  with empty RAM and LMDB tiers, page cache dropped: the daemon prefetches the
  trace's chunks in the background from the attach on. The time is the wall
  clock of the whole ``lazyfs-run`` process; the daemon start is measured
  separately.
- lazyfs cold, first boot: the same with boot traces off, as for an image
  that has no recorded trace yet.
- lazyfs cold, 20 ms store RTT, and the same on first boot: through a
  ``LatencyProxy`` that adds 20 ms of round-trip time between the daemon and
  the S3 server (this kernel has no netem queueing discipline).
- lazyfs 8 cold boots at once: a new daemon at its defaults with empty tiers
  and eight ``lazyfs-run`` processes started together. The time runs until the
  last one ended, and the counters cover all eight.
- lazyfs warm disk: a daemon at its defaults restarted over the LMDB tier that
  the cold run filled, so the RAM tier is empty, and the page cache dropped.
  Its trace replay prefetches from the LMDB tier into RAM.
- lazyfs hot: the warm run's daemon again, with its RAM tier and the page
  cache still filled.
- pull + unpack: ``skopeo copy`` from the registry into a new OCI layout,
  ``umoci unpack`` into a bundle and ``runc run``, page cache dropped first.
- local: ``runc run`` on the rootfs that pull + unpack left, page cache dropped.

The states take turns within each round, so slow drifts of the machine affect
all of them alike. Dropping the page cache (``sync; echo 3 >
/proc/sys/vm/drop_caches``) affects the whole machine, not only this program.
moto keeps its objects in process memory, so the S3 side of a cold run never
reads from disk, while the registry reads its blobs from disk after the drop.

Needs root (FUSE, overlayfs, runc, drop_caches), /dev/fuse, and the Debian
packages runc, skopeo, umoci, docker-registry and fuse3.
"""

from __future__ import annotations

import argparse
import json
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
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.config import DaemonConfig
from lazyfs.errors import LazyfsError
from lazyfs.notebook.imageuser import resolve_user
from lazyfs.notebook.runtime_spec import merge_env, runtime_spec
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.latencyproxy import LatencyProxy
from tests.support.net import free_port
from tests.support.registry import Registry
from tests.support.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, MotoServer

from .machine import describe_machine
from .results_file import add_output_arguments, replace_section

log = logging.getLogger(__name__)

# Upper bound for one step. The slowest step, umoci unpack of the fat image,
# took 23 to 56 s on a shared 2-core machine.
STEP_TIMEOUT_S = 600.0

COLD = "lazyfs cold"
FIRST = "lazyfs cold, first boot"
WARM = "lazyfs warm disk"
HOT = "lazyfs hot"
COLD_RTT = "lazyfs cold, 20 ms store RTT"
FIRST_RTT = "lazyfs cold, first boot, 20 ms store RTT"
CONCURRENT = "lazyfs 8 cold boots at once"
LAZYFS_STATES = (COLD, FIRST, COLD_RTT, FIRST_RTT, WARM, HOT)
# Round-trip time the latency proxy adds between the daemon and the store.
STORE_RTT_S = 0.020
CONCURRENT_BOOTS = 8
PULL = "pull (skopeo copy)"
UNPACK = "unpack (umoci unpack)"
PULL_RUN = "run (runc run)"
PULL_TOTAL = "pull + unpack total"
LOCAL = "local (runc run)"
LOCAL_CONCURRENT = "local, 8 runs at once (runc run)"
LOCAL_HOT = "local, page cache kept (runc run)"
DAEMON_START = "daemon start, empty tiers"
DAEMON_RESTART = "daemon restart over the LMDB tier"

# Parts of a lazyfs-run process, from the timings that --stats-json writes.
RUN_PARTS = {
    "startup": "interpreter start and imports",
    "daemon": "configuration and daemon status",
    "resolve": "resolve the name and attach the image",
    "run": "overlay, runc and the workload",
}

# Daemon settings of the states; the other settings are the daemon's defaults,
# which replay boot traces and record none.
DEFAULTS: dict[str, bool] = {}
TRACES_OFF = {"trace_record": False, "trace_replay": False}
RECORDING = {"trace_record": True, "trace_replay": False}


@dataclass(frozen=True)
class BootBenchmark:
    """Settings of one boot benchmark: its image, its workload and the names it reports under."""

    # Module name, used in messages, container names and the command line.
    name: str
    section_heading: str
    # Returns (OCI layout, tag) of the image; raises RuntimeError when it cannot.
    image: Callable[[], tuple[Path, str]]
    image_description: str
    repository: str
    bucket: str
    program: str
    expected_output: str
    default_runs: int

    @property
    def workload(self) -> list[str]:
        return ["python3", "-c", self.program]


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed. The message names the step and contains its output."""


@dataclass
class Store:
    url: str
    endpoint_url: str


@dataclass
class IndexedImage:
    """The benchmark image: its OCI layout, its registry reference and its lazyfs index."""

    layout: Path
    tag: str
    reference: str
    index: dict
    layer_bytes: int
    push_s: float
    index_s: float
    trace_chunks: int = 0

    @property
    def lazyfs_name(self) -> str:
        return self.index["names"][0]

    @property
    def digest(self) -> str:
        return self.index["index_digest"]


@dataclass
class Measurements:
    """Seconds per table row, and lazyfs counters per state, one value per run."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    counters: dict[str, dict[str, list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # One-minute load averages: when the benchmark started, and at the start of each round.
    start_load: float = 0.0
    round_loads: list[float] = field(default_factory=list)

    def add_counters(self, state: str, counters: dict[str, int]) -> None:
        for name, value in counters.items():
            self.counters[state][name].append(value)


# -- environment --------------------------------------------------------------


def missing_requirement() -> str | None:
    """Return why the benchmark cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the benchmark needs root for FUSE, overlayfs, runc and drop_caches"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: load the fuse kernel module"
    for tool in ("runc", "skopeo", "umoci", "docker-registry", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run scripts/install-deps"
    for script in ("lazyfs-run", "lazyfs-index"):
        if not console_script(script).exists():
            return f"{console_script(script)} is missing: install lazyfs into this Python's environment"
    return None


def console_script(name: str) -> Path:
    """Return the path of a lazyfs command installed next to this Python."""
    return Path(sys.executable).parent / name


def isolate_aws_environment() -> None:
    """Give this process and its children the moto credentials and no AWS profile of the host."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    })


def drop_page_cache() -> None:
    """Write dirty pages back, then drop the page cache, dentries and inodes of the whole machine."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def load_average() -> float:
    """Return the one-minute load average."""
    return os.getloadavg()[0]


def run_step(step: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` with captured text output and raise BenchmarkError naming ``step`` if it fails."""
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=STEP_TIMEOUT_S, **kwargs)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{step} timed out after {STEP_TIMEOUT_S:.0f} s: {' '.join(command)}") from None
    if result.returncode != 0:
        raise BenchmarkError(f"{step} failed with exit code {result.returncode}: {' '.join(command)}\n"
                             f"{result.stderr.strip()}")
    return result


def timed_step(step: str, command: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    """Run a step and return its wall-clock seconds and its result."""
    started = time.perf_counter()
    result = run_step(step, command, **kwargs)
    return time.perf_counter() - started, result


def check_workload_output(benchmark: BootBenchmark, step: str, result: subprocess.CompletedProcess) -> None:
    if result.stdout != benchmark.expected_output:
        raise BenchmarkError(f"{step}: the workload printed {result.stdout!r}, expected "
                             f"{benchmark.expected_output!r}\n{result.stderr.strip()}")


# -- setup ----------------------------------------------------------------------


def index_image(benchmark: BootBenchmark, registry: Registry, store: Store) -> IndexedImage:
    """Push the benchmark image to the registry, then index it from there into the store."""
    layout, tag = benchmark.image()
    started = time.perf_counter()
    registry.push(layout, tag, benchmark.repository, benchmark.name)
    push_s = time.perf_counter() - started

    reference = f"{registry.host}/{benchmark.repository}:{benchmark.name}"
    index_s, result = timed_step(
        "lazyfs-index",
        [str(console_script("lazyfs-index")), "--store", store.url, "--endpoint-url", store.endpoint_url,
         "--plain-http", "--json", f"docker://{reference}"])
    layer_bytes = sum(layer["size"] for layer in read_manifest(layout, tag)["layers"])
    return IndexedImage(layout, tag, reference, json.loads(result.stdout), layer_bytes, push_s, index_s)


def read_manifest(layout: Path, tag: str) -> dict:
    """Return the manifest that ``tag`` names in an OCI image layout."""
    index = json.loads((layout / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads(read_blob(layout, descriptor["digest"]))
    raise BenchmarkError(f"the OCI layout {layout} has no manifest tagged {tag!r}")


def read_blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hex_digest = digest.partition(":")
    return (layout / "blobs" / algorithm / hex_digest).read_bytes()


@dataclass
class SkopeoSettings:
    """Global options and environment that keep the host's container configuration out of skopeo."""

    options: list[str]
    env: dict[str, str]


def write_skopeo_settings(directory: Path) -> SkopeoSettings:
    """Write an accept-all trust policy and empty registry settings under ``directory``.

    They keep the host's registry mirrors, credentials and signature lookups
    out of the pulls.
    """
    directory.mkdir(parents=True)
    (directory / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    (directory / "registries.conf").write_text("")
    (directory / "registries.d").mkdir()
    return SkopeoSettings(
        options=["--policy", str(directory / "policy.json"), "--registries.d", str(directory / "registries.d")],
        env=dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(directory / "registries.conf")))


def record_trace(benchmark: BootBenchmark, store: Store, image: IndexedImage, work: Path) -> None:
    """Run the workload once in a recording daemon, which writes the image's boot trace."""
    with timed_daemon(store, work / "recording-daemon", work / "recording-lmdb", RECORDING) as (daemon, _s):
        measure_lazyfs_run(benchmark, "recording", daemon, image, work, Measurements())
        trace = daemon.status()["traces"].get(image.digest, {})
    if trace.get("state") != "saved":
        raise BenchmarkError(f"the recording run wrote no boot trace: {trace}")
    image.trace_chunks = trace["saved_chunks"]
    log.info("recorded a boot trace of %d chunks", image.trace_chunks)
    remove_tree(work / "recording-daemon")
    remove_tree(work / "recording-lmdb")


# -- lazyfs states ------------------------------------------------------------


@contextmanager
def timed_daemon(store: Store, directory: Path, disk_cache: Path,
                 traces: dict[str, bool]) -> Iterator[tuple[DaemonProcess, float]]:
    """Run a lazyfs daemon for the block and yield it with the seconds until its mount served.

    Its Prometheus endpoint is on, because only the metrics count FUSE requests.
    """
    defaults = DaemonConfig()
    started = time.perf_counter()
    # The test fixture's smaller tiers and shorter fetch timeout are set back to the defaults.
    with running_daemon(directory=directory, store_url=store.url, s3_endpoint_url=store.endpoint_url,
                        disk_cache_path=str(disk_cache), log_level="info",
                        ram_cache_bytes=defaults.ram_cache_bytes, disk_cache_bytes=defaults.disk_cache_bytes,
                        fetch_timeout_s=defaults.fetch_timeout_s,
                        metrics_address=f"127.0.0.1:{free_port()}", **traces) as daemon:
        yield daemon, time.perf_counter() - started


def fuse_requests(daemon: DaemonProcess) -> int:
    """Return the FUSE requests the daemon has handled, from its Prometheus endpoint."""
    url = f"http://{daemon.config.metrics_address}/metrics"
    # A plain opener: proxy variables must not send a loopback request elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=STEP_TIMEOUT_S) as response:
        text = response.read().decode()
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("lazyfs_fuse_operations_total{")))


def process_cpu_ms(pid: int) -> int:
    """Return the user and system CPU time of a process, in milliseconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")


def machine_cpu_ms() -> int:
    """Return the CPU time all cores spent neither idle nor waiting for I/O, in milliseconds."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) * 1000 // os.sysconf("SC_CLK_TCK")


def daemon_counters(daemon: DaemonProcess, digest: str) -> dict[str, int]:
    """Return the counters the report lists: the daemon's for one image, its CPU and the machine's."""
    return {**lazyfs_counters(daemon.status(), digest),
            "FUSE requests": fuse_requests(daemon),
            "daemon CPU time (ms)": process_cpu_ms(daemon.process.pid),
            "CPU time of the whole machine (ms)": machine_cpu_ms()}


def lazyfs_counters(status: dict, digest: str) -> dict[str, int]:
    """Return the daemon's request and byte counters that the report lists, for one image."""
    tiers = status["tiers"]
    return {
        "store requests": sum(status["store_requests"].values()),
        "chunk requests": tiers["store"]["requests"],
        "chunk requests of the trace replay": tiers["store"].get("background_requests", 0),
        "fetched bytes, compressed": tiers["store"]["bytes"],
        "fetched bytes, uncompressed": tiers["store"]["bytes_served"],
        "LMDB tier hits": tiers.get("disk", {}).get("hits", 0),
        "LMDB tier bytes served, uncompressed": tiers.get("disk", {}).get("bytes_served", 0),
        # Only hits, because the RAM tier's bytes_served counts the whole chunk on every hit.
        "RAM tier hits": tiers.get("ram", {}).get("hits", 0),
        # FUSE reads of the image, so the kernel's readahead is included.
        "bytes read through the mount": status["images"].get(digest, {}).get("bytes_read", 0),
    }


def measure_lazyfs_run(benchmark: BootBenchmark, state: str, daemon: DaemonProcess, image: IndexedImage,
                       work: Path, measurements: Measurements) -> None:
    """Time one ``lazyfs-run`` of the workload and record its timings and the daemon's counters.

    FUSE requests and CPU times are read when ``lazyfs-run`` exits; the other
    counters after a ``sync`` request, so a trace replay that outlasts the
    workload is counted in full.
    """
    if daemon.process.poll() is not None:
        raise BenchmarkError(f"{state}: the lazyfs daemon exited with status {daemon.process.returncode}. "
                             f"The end of its log:\n{daemon.log_text()[-3000:]}")
    stats_path = work / f"stats-{secrets.token_hex(4)}.json"
    command = lazyfs_run_command(benchmark, daemon, image, work, stats_path)
    before = daemon_counters(daemon, image.digest)
    wall_s, result = timed_step(f"lazyfs-run ({state})", command)
    after = daemon_counters(daemon, image.digest)
    daemon_client(daemon).request({"op": "sync"})
    after.update(lazyfs_counters(daemon.status(), image.digest))
    check_workload_output(benchmark, f"lazyfs-run ({state})", result)

    seconds = json.loads(stats_path.read_text())["seconds"]
    stats_path.unlink()
    measurements.seconds[state].append(wall_s)
    measurements.seconds[f"{state}: startup"].append(wall_s - seconds["total"])
    for part in ("daemon", "resolve", "run"):
        measurements.seconds[f"{state}: {part}"].append(seconds[part])
    measurements.add_counters(state, {name: after[name] - before[name] for name in after})
    log.info("%s: %.3f s", state, wall_s)


def lazyfs_run_command(benchmark: BootBenchmark, daemon: DaemonProcess, image: IndexedImage, work: Path,
                       stats_path: Path) -> list[str]:
    """Return the ``lazyfs-run`` command line of the workload against ``daemon``."""
    # The daemon options only matter if lazyfs-run had to start a daemon itself.
    # They point at this daemon's mount point, which the benchmark unmounts.
    return [str(console_script("lazyfs-run")), "--control-socket", str(daemon.control_socket),
            "--mountpoint", str(daemon.mountpoint), "--store", daemon.config.store_url,
            "--endpoint-url", daemon.config.s3_endpoint_url, "--state-dir", str(work / "containers"),
            "--stats-json", str(stats_path), image.lazyfs_name, "--", *benchmark.workload]


def measure_concurrent_runs(benchmark: BootBenchmark, daemon: DaemonProcess, image: IndexedImage, work: Path,
                            measurements: Measurements) -> None:
    """Start CONCURRENT_BOOTS runs of the workload at once; record the time until the last one ended.

    The counters cover all the runs together, so the chunk requests equal
    those of one cold boot when every chunk is fetched once.
    """
    before = daemon_counters(daemon, image.digest)
    started = time.perf_counter()
    processes = []
    for number in range(CONCURRENT_BOOTS):
        command = lazyfs_run_command(benchmark, daemon, image, work, work / f"stats-concurrent-{number}.json")
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=STEP_TIMEOUT_S)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    wall_s = time.perf_counter() - started
    after = daemon_counters(daemon, image.digest)
    daemon_client(daemon).request({"op": "sync"})
    after.update(lazyfs_counters(daemon.status(), image.digest))
    for number, result in enumerate(results):
        if result.returncode != 0:
            raise BenchmarkError(f"lazyfs-run ({CONCURRENT}, run {number}) failed with exit code "
                                 f"{result.returncode}: {result.stderr.strip()}")
        check_workload_output(benchmark, f"lazyfs-run ({CONCURRENT}, run {number})", result)
    measurements.seconds[CONCURRENT].append(wall_s)
    measurements.add_counters(CONCURRENT, {name: after[name] - before[name] for name in after})
    log.info("%s: %.3f s", CONCURRENT, wall_s)


def daemon_client(daemon: DaemonProcess):
    from lazyfs.control_client import ControlClient

    # A replay of a large trace over a slow store may take a while.
    return ControlClient(daemon.control_socket, timeout_s=STEP_TIMEOUT_S)


def measure_lazyfs_round(benchmark: BootBenchmark, store: Store, image: IndexedImage, work: Path,
                         measurements: Measurements) -> None:
    """Measure every lazyfs state once; warm disk and hot run on the tiers that the cold run left."""
    with timed_daemon(store, work / "first-daemon", work / "first-lmdb", TRACES_OFF) as (daemon, start_s):
        measurements.seconds[DAEMON_START].append(start_s)
        drop_page_cache()
        measure_lazyfs_run(benchmark, FIRST, daemon, image, work, measurements)
    remove_tree(work / "first-lmdb")

    host, port = store.endpoint_url.removeprefix("http://").rsplit(":", 1)
    with LatencyProxy(host, int(port), round_trip_s=STORE_RTT_S) as proxy:
        delayed = Store(store.url, proxy.endpoint_url)
        for state, traces in ((FIRST_RTT, TRACES_OFF), (COLD_RTT, DEFAULTS)):
            with timed_daemon(delayed, work / "rtt-daemon", work / "rtt-lmdb", traces) as (daemon, _s):
                drop_page_cache()
                measure_lazyfs_run(benchmark, state, daemon, image, work, measurements)
            remove_tree(work / "rtt-lmdb")
            remove_tree(work / "rtt-daemon")

    with timed_daemon(store, work / "concurrent-daemon", work / "concurrent-lmdb", DEFAULTS) as (daemon, _s):
        drop_page_cache()
        measure_concurrent_runs(benchmark, daemon, image, work, measurements)
    remove_tree(work / "concurrent-lmdb")

    disk_cache = work / "lmdb"
    with timed_daemon(store, work / "cold-daemon", disk_cache, DEFAULTS) as (daemon, start_s):
        measurements.seconds[DAEMON_START].append(start_s)
        drop_page_cache()
        measure_lazyfs_run(benchmark, COLD, daemon, image, work, measurements)

    with timed_daemon(store, work / "warm-daemon", disk_cache, DEFAULTS) as (daemon, start_s):
        measurements.seconds[DAEMON_RESTART].append(start_s)
        drop_page_cache()
        measure_lazyfs_run(benchmark, WARM, daemon, image, work, measurements)
        measure_lazyfs_run(benchmark, HOT, daemon, image, work, measurements)


# -- pull + unpack and local states -------------------------------------------


def write_runtime_config(benchmark: BootBenchmark, bundle: Path, layout: Path, tag: str) -> None:
    """Write the bundle's config.json as lazyfs-run would for this image, replacing umoci's."""
    config = json.loads(read_blob(layout, read_manifest(layout, tag)["config"]["digest"])).get("config", {})
    rootfs = bundle / "rootfs"
    user = resolve_user(rootfs, config.get("User", ""))
    spec = runtime_spec(rootfs=rootfs, args=benchmark.workload,
                        env=merge_env(config.get("Env") or [], [], user),
                        cwd=config.get("WorkingDir") or "/", user=user, hostname=benchmark.name.replace("_", "-"))
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))


def run_container(benchmark: BootBenchmark, state: str, bundle: Path, runc_root: Path) -> float:
    """Run the bundle with ``runc run``, check the output and return the wall-clock seconds."""
    return run_containers(benchmark, state, bundle, runc_root, 1)


def run_containers(benchmark: BootBenchmark, state: str, bundle: Path, runc_root: Path, count: int) -> float:
    """Start ``count`` containers of the bundle at once and return the seconds until the last one ended."""
    prefix = benchmark.name.replace("_", "-")
    container_ids = [f"{prefix}-{secrets.token_hex(4)}" for _ in range(count)]
    runc = ["runc", "--root", str(runc_root)]
    processes = []
    try:
        started = time.perf_counter()
        for container_id in container_ids:
            processes.append(subprocess.Popen([*runc, "run", "--bundle", str(bundle), container_id],
                                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
        results = []
        for process in processes:
            try:
                stdout, stderr = process.communicate(timeout=STEP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise BenchmarkError(f"runc run ({state}) timed out after {STEP_TIMEOUT_S:.0f} s") from None
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        seconds = time.perf_counter() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        # runc run removes the container when it exits, but not after a timeout.
        for container_id in container_ids:
            subprocess.run([*runc, "delete", "--force", container_id], capture_output=True)
    for result in results:
        if result.returncode != 0:
            raise BenchmarkError(f"runc run ({state}) failed with exit code {result.returncode}: "
                                 f"{' '.join(result.args)}\n{result.stderr.strip()}")
        check_workload_output(benchmark, f"runc run ({state})", result)
    return seconds


def measure_pull_unpack(benchmark: BootBenchmark, image: IndexedImage, skopeo: SkopeoSettings, work: Path,
                        measurements: Measurements) -> Path:
    """Pull, unpack and run the image as users do without lazyfs, and return the bundle."""
    layout = work / "layout"
    bundle = work / "bundle"
    drop_page_cache()
    pull_s, _ = timed_step("skopeo copy", [
        "skopeo", *skopeo.options, "copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
        f"docker://{image.reference}", f"oci:{layout}:{image.tag}"], env=skopeo.env)
    unpack_s, _ = timed_step("umoci unpack", ["umoci", "unpack", "--image", f"{layout}:{image.tag}", str(bundle)])
    write_runtime_config(benchmark, bundle, layout, image.tag)
    run_s = run_container(benchmark, "pull + unpack", bundle, work / "runc")

    for row, value in ((PULL, pull_s), (UNPACK, unpack_s), (PULL_RUN, run_s),
                       (PULL_TOTAL, pull_s + unpack_s + run_s)):
        measurements.seconds[row].append(value)
    log.info("pull + unpack: %.3f s (pull %.3f s, unpack %.3f s, run %.3f s)",
             pull_s + unpack_s + run_s, pull_s, unpack_s, run_s)
    return bundle


def measure_local(benchmark: BootBenchmark, bundle: Path, work: Path, measurements: Measurements) -> None:
    drop_page_cache()
    seconds = run_container(benchmark, "local", bundle, work / "runc")
    measurements.seconds[LOCAL].append(seconds)
    log.info("local: %.3f s", seconds)
    # The reference for the hot state: the files are in the page cache now.
    seconds = run_container(benchmark, LOCAL_HOT, bundle, work / "runc")
    measurements.seconds[LOCAL_HOT].append(seconds)
    log.info("%s: %.3f s", LOCAL_HOT, seconds)
    # The same number of boots as CONCURRENT without lazyfs: the time this machine's cores allow.
    drop_page_cache()
    seconds = run_containers(benchmark, LOCAL_CONCURRENT, bundle, work / "runc", CONCURRENT_BOOTS)
    measurements.seconds[LOCAL_CONCURRENT].append(seconds)
    log.info("%s: %.3f s", LOCAL_CONCURRENT, seconds)


# -- the whole run --------------------------------------------------------------


def run_benchmark(benchmark: BootBenchmark, runs: int, work: Path) -> tuple[IndexedImage, Measurements]:
    """Start the servers, index the image, record its trace and measure every state ``runs`` times."""
    measurements = Measurements()
    measurements.start_load = load_average()
    skopeo = write_skopeo_settings(work / "skopeo")
    with ExitStack() as servers:
        registry = servers.enter_context(Registry())
        moto = servers.enter_context(MotoServer())
        store = Store(f"s3://{moto.create_bucket(benchmark.bucket)}/images", moto.endpoint_url)
        image = index_image(benchmark, registry, store)
        log.info("indexed %s as %s in %.1f s", image.reference, image.digest, image.index_s)
        record_trace(benchmark, store, image, work)

        for number in range(1, runs + 1):
            log.info("round %d of %d, load average %.2f", number, runs, load_average())
            measurements.round_loads.append(load_average())
            round_dir = work / f"round-{number}"
            measure_lazyfs_round(benchmark, store, image, round_dir, measurements)
            bundle = measure_pull_unpack(benchmark, image, skopeo, round_dir, measurements)
            measure_local(benchmark, bundle, round_dir, measurements)
            remove_tree(round_dir)
    return image, measurements


def remove_tree(path: Path) -> None:
    """Remove ``path`` without leaving its file system, after lazily unmounting anything below it."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        # Field 5 is the mount point, with spaces and tabs octal-escaped.
        mount_points = [line.split()[4].encode().decode("unicode_escape") for line in mountinfo]
    for mount_point in sorted((m for m in mount_points if m.startswith(prefix)), reverse=True):
        log.warning("unmounting %s, which a failed step left behind", mount_point)
        subprocess.run(["umount", "--lazy", mount_point], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# -- report ---------------------------------------------------------------------


def seconds_cells(values: list[float]) -> str:
    """Return the median, min and max of ``values`` as the last cells of a table row."""
    return f"| {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |"


def format_bytes(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def seconds_table(measurements: Measurements) -> list[str]:
    seconds = measurements.seconds
    lines = ["| measurement | median (s) | min (s) | max (s) |", "|---|---:|---:|---:|"]
    for state in LAZYFS_STATES:
        lines.append(f"| {state}: `lazyfs-run` wall clock {seconds_cells(seconds[state])}")
        for part, label in RUN_PARTS.items():
            lines.append(f"| - {label} {seconds_cells(seconds[f'{state}: {part}'])}")
    lines.append(f"| {CONCURRENT}: until the last one ended {seconds_cells(seconds[CONCURRENT])}")
    lines.append(f"| pull + unpack: total {seconds_cells(seconds[PULL_TOTAL])}")
    for row in (PULL, UNPACK, PULL_RUN):
        lines.append(f"| - {row} {seconds_cells(seconds[row])}")
    lines.append(f"| {LOCAL} {seconds_cells(seconds[LOCAL])}")
    lines.append(f"| {LOCAL_HOT} {seconds_cells(seconds[LOCAL_HOT])}")
    lines.append(f"| {LOCAL_CONCURRENT}: until the last one ended {seconds_cells(seconds[LOCAL_CONCURRENT])}")
    for row in (DAEMON_START, DAEMON_RESTART):
        lines.append(f"| {row} (not in the times above) {seconds_cells(seconds[row])}")
    return lines


def counters_table(measurements: Measurements) -> list[str]:
    states = (*LAZYFS_STATES, f"{CONCURRENT} (all of them)")
    lines = ["| per run, median | " + " | ".join(states) + " |",
             "|---" + "|---:" * len(states) + "|"]
    for name in measurements.counters[COLD]:
        cells = []
        for state in (*LAZYFS_STATES, CONCURRENT):
            value = statistics.median(measurements.counters[state][name])
            cells.append(format_bytes(value) if "bytes" in name else f"{value:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ratio_lines(image: IndexedImage, measurements: Measurements) -> list[str]:
    seconds = {row: statistics.median(values) for row, values in measurements.seconds.items()}
    cold = {name: statistics.median(values) for name, values in measurements.counters[COLD].items()}
    ratios = [
        ("lazyfs cold / pull + unpack total", seconds[COLD] / seconds[PULL_TOTAL]),
        ("lazyfs cold, first boot / pull + unpack total", seconds[FIRST] / seconds[PULL_TOTAL]),
        ("lazyfs cold / lazyfs cold, first boot", seconds[COLD] / seconds[FIRST]),
        ("lazyfs cold, 20 ms store RTT / pull + unpack total", seconds[COLD_RTT] / seconds[PULL_TOTAL]),
        ("lazyfs cold, first boot, 20 ms store RTT / pull + unpack total",
         seconds[FIRST_RTT] / seconds[PULL_TOTAL]),
        (f"{CONCURRENT}, until the last ended / lazyfs cold", seconds[CONCURRENT] / seconds[COLD]),
        (f"{LOCAL_CONCURRENT}, until the last ended / lazyfs cold", seconds[LOCAL_CONCURRENT] / seconds[COLD]),
        (f"{CONCURRENT} / {LOCAL_CONCURRENT}", seconds[CONCURRENT] / seconds[LOCAL_CONCURRENT]),
        (f"{CONCURRENT}: chunk requests / one cold boot's",
         statistics.median(measurements.counters[CONCURRENT]["chunk requests"]) / max(cold["chunk requests"], 1)),
        ("lazyfs warm disk / local", seconds[WARM] / seconds[LOCAL]),
        ("lazyfs hot / local", seconds[HOT] / seconds[LOCAL]),
        (f"lazyfs hot / {LOCAL_HOT}", seconds[HOT] / seconds[LOCAL_HOT]),
        ("cold fetched, compressed / compressed layers", cold["fetched bytes, compressed"] / image.layer_bytes),
        ("cold fetched, uncompressed / image file bytes",
         cold["fetched bytes, uncompressed"] / image.index["file_bytes"]),
        ("cold fetched, uncompressed / read through the mount",
         cold["fetched bytes, uncompressed"] / max(cold["bytes read through the mount"], 1)),
        ("cold fetched, compressed / read through the mount",
         cold["fetched bytes, compressed"] / max(cold["bytes read through the mount"], 1)),
        ("cold fetched, compressed / image file bytes", cold["fetched bytes, compressed"] / image.index["file_bytes"]),
    ]
    return ["| ratio of medians | value |", "|---|---:|"] + [f"| {name} | {value:.3f} |" for name, value in ratios]


def image_lines(benchmark: BootBenchmark, image: IndexedImage) -> list[str]:
    index = image.index
    return [
        f"Image: {benchmark.image_description}, {index['layers']} gzip layers, "
        f"{format_bytes(image.layer_bytes)} compressed, {index['files']} files with "
        f"{format_bytes(index['file_bytes'])} of data, {index['chunks']} chunks, "
        f"an index of {format_bytes(index['index_bytes'])}.",
        f"Set-up, once and not timed below: push to the registry {image.push_s:.1f} s, "
        f"`lazyfs-index` from the registry into moto S3 {image.index_s:.1f} s, one recording run "
        f"whose boot trace lists {image.trace_chunks} chunks.",
    ]


def load_line(measurements: Measurements) -> str:
    started = measurements.start_load
    verdict = "" if started < 1 else " (not under 1, so other work on the machine affected these numbers)"
    rounds = ", ".join(f"{value:.2f}" for value in measurements.round_loads)
    return (f"One-minute load average when the benchmark started: {started:.2f}{verdict}. At the start "
            f"of each round, which includes this benchmark's own work: {rounds}.")


def format_report(benchmark: BootBenchmark, image: IndexedImage, measurements: Measurements, runs: int,
                  machine: list[tuple[str, str]], total_s: float) -> str:
    lines = [
        f"Workload: `python3 -c \"{benchmark.program}\"` in a runc container, {runs} runs per state, "
        f"the states taking turns. Registry, moto S3, daemon and containers all on 127.0.0.1.",
        "",
        "Every daemon runs at its defaults, with its Prometheus endpoint on to count FUSE requests. "
        "Cold: new daemon, so with `trace_replay = true` and the image's boot trace in the store, empty "
        "RAM and LMDB tiers, page cache dropped. Cold, first boot: the same with boot traces off, as for "
        "an image that has no trace yet. Warm disk: daemon restarted over the LMDB tier of the cold run, "
        "page cache dropped. Hot: the same daemon again, nothing dropped. Pull + unpack: `skopeo copy` "
        "into a new OCI layout, `umoci unpack`, `runc run`, page cache dropped first, so only its run "
        "step finds the files that umoci has just written in the page cache. The registry reads its "
        "blobs from disk after the drop, while moto keeps its objects in memory. Local: `runc run` on "
        "that unpacked rootfs, page cache dropped; then once more with the page cache kept, the "
        f"reference for hot; then {CONCURRENT_BOOTS} containers at once, page cache dropped. FUSE "
        "requests and CPU times cover the run of `lazyfs-run` alone; the other counters are read after "
        "a `sync` request, so a replay that outlasts the workload is counted in full. The CPU time of "
        "the whole machine includes the workload, runc, moto, the daemon and anything else running.",
        "",
        *image_lines(benchmark, image),
        "",
        *seconds_table(measurements),
        "",
        *counters_table(measurements),
        "",
        *ratio_lines(image, measurements),
        "",
        load_line(measurements),
        "",
        "Machine:",
        "",
        *[f"- {label}: {value}" for label, value in machine],
        "",
        f"Command: `.venv/bin/python -m benchmarks.{benchmark.name} --runs {runs}` on "
        f"{time.strftime('%Y-%m-%d')}, {total_s / 60:.1f} minutes in all.",
    ]
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------


def parse_args(benchmark: BootBenchmark, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{benchmark.name}",
        description=f"Time `python3 -c` imports in a runc container from {benchmark.image_description}: "
                    "lazyfs cold, cold first boot, warm disk and hot against skopeo pull + umoci unpack "
                    "and an unpacked local rootfs. Needs root.")
    parser.add_argument("--runs", type=positive_int, default=benchmark.default_runs, metavar="N",
                        help="measured runs per state (default: %(default)s)")
    add_output_arguments(parser, "the LMDB tiers, OCI layouts and bundles")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def exit_on_sigterm(number: int, _frame: object) -> None:
    # SystemExit unwinds through the cleanup of daemons, mounts and servers.
    raise SystemExit(128 + number)


def main(benchmark: BootBenchmark, argv: list[str] | None = None) -> int:
    """Run a boot benchmark from the command line; return the exit status."""
    args = parse_args(benchmark, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    problem = missing_requirement()
    if problem is not None:
        print(f"{benchmark.name}: error: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    isolate_aws_environment()

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"lazyfs-{benchmark.name}-", dir=args.work_dir))
    # lazyfs-run maps the container's root to an unprivileged host uid, which
    # must reach the container state directory below.
    work.chmod(0o711)
    try:
        image, measurements = run_benchmark(benchmark, args.runs, work)
    except (RuntimeError, LazyfsError) as error:
        # BenchmarkError and the start and build errors of the servers, the daemon
        # and the image are RuntimeErrors. LazyfsError comes from the control socket.
        print(f"{benchmark.name}: error: {error}", file=sys.stderr)
        return 1
    finally:
        remove_tree(work)

    machine = describe_machine(args.work_dir)

    report = format_report(benchmark, image, measurements, args.runs, machine, time.monotonic() - started)
    print(report, end="")
    if args.write_results:
        replace_section(args.results_file, benchmark.section_heading, report)
    return 0
