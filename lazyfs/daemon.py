"""Mount wiring: store, tiers, tree, FUSE session, control socket and signals.

``run`` mounts in the calling process and serves until the file system is
unmounted or the process gets SIGTERM or SIGINT; either way it unmounts, closes
the tiers and returns exit status 0. Its steps, each a function here:

1. ``prepare_mountpoint``: create the directory. A mount left by a killed
   daemon fails statfs with ENOTCONN because its FUSE connection is gone, and
   is lazily unmounted. A live mount is an error.
2. ``open_configured_store``, ``build_tiers`` (RAM, disk, store) and ``build_tree``.
3. ``mount``: pyfuse3.init with ``fuse_options``.
4. ``_serve``: pyfuse3.main, the control socket, the signal watcher and, when
   configured, the metrics endpoint and the systemd watchdog in one trio
   nursery. ``notify_ready`` is called once they all run, and READY=1 goes to
   systemd at the same point. ``lazyfs.notify`` sends nothing when
   $NOTIFY_SOCKET is unset. STOPPING=1 follows the first SIGTERM or SIGINT,
   or the end of the FUSE session when the mount was unmounted from outside.

``start_background`` runs the same daemon detached (``python -m lazyfs.daemon``
forks once more, in a new session, output appended to the log file) and
returns its pid once the mount serves. The daemon gets its configuration as
JSON on stdin and reports on a readiness pipe, one line each: "pid N", then
"ready" or "failed CODE". If it exits or times out first, the error carries
the tail of its log. It does not inherit $NOTIFY_SOCKET or the watchdog
variables, because it is not the main process of the caller's service.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lmdb
import pyfuse3
import trio

from . import logutil, notify, refs
from .config import DaemonConfig, from_dict, to_dict
from .control import ControlClient, ControlServer
from .errors import ControlError, DaemonError, LazyfsError
from .fuse_ops import Operations
from .lmdb_tier import LmdbTier
from .metrics import FuseMetrics, MetricsServer, TierMetrics, build_registry
from .prefetch import BootTraces
from .store import Store, StoreOptions, open_store
from .store_tier import StoreTier
from .tiers import RamTier, Tier, TierChain
from .idshift import IdShift
from .tree import Tree

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 60.0
UNMOUNT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_BYTES = 4000
# The type /proc/self/mountinfo shows for our mounts ("fsname=lazyfs,subtype=lazyfs").
FILESYSTEM_TYPE = "fuse.lazyfs"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Service manager variables that a background daemon must not inherit.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# Libraries whose DEBUG lines print every request with its headers; they log
# at INFO at most, whatever the daemon's log level.
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def configure_logging(level: str) -> None:
    """Send log records at ``level`` and above to stderr, with secrets redacted."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(logutil.SecretFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))


def log_configuration(config: DaemonConfig) -> None:
    """Log every configuration value in one line; the log filter redacts secrets in it."""
    values = ", ".join(f"{key}={value!r}" for key, value in to_dict(config).items())
    log.info("configuration: %s", values)


# ---------------------------------------------------------------------------
# Mount points


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, position = [], 0
    while position < len(field):
        if field[position] == "\\" and field[position + 1:position + 4].isdigit():
            out.append(chr(int(field[position + 1:position + 4], 8)))
            position += 4
        else:
            out.append(field[position])
            position += 1
    return "".join(out)


def _canonical(path: str | Path) -> str:
    # The mount point itself may be a dead FUSE mount that fails stat, so only
    # its parent is resolved.
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounted_filesystem(mountpoint: str | Path) -> str | None:
    """Return the type of the file system mounted at ``mountpoint`` (topmost), or None."""
    target = _canonical(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found = fields[separator + 1]
    return found


def is_mounted(mountpoint: str | Path) -> bool:
    """Return whether any file system is mounted at ``mountpoint``."""
    return mounted_filesystem(mountpoint) is not None


def lazy_unmount(mountpoint: str | Path) -> None:
    """Detach a mount now (``fusermount3 -u -z``); raise DaemonError on failure."""
    _fusermount(mountpoint, lazy=True)


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` has exited; return False if it still runs after ``timeout_s``."""
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(descriptor, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(descriptor)


def unmount(mountpoint: str | Path, lazy: bool = False) -> None:
    """Unmount a lazyfs mount; the daemon serving it then exits. Raise DaemonError.

    Any other file system at ``mountpoint`` is left alone.
    """
    filesystem = mounted_filesystem(mountpoint)
    if filesystem is None:
        raise DaemonError(f"nothing is mounted at {mountpoint}")
    if filesystem != FILESYSTEM_TYPE:
        raise DaemonError(f"{mountpoint} is a {filesystem} mount, not a lazyfs mount; not unmounting it")
    _fusermount(mountpoint, lazy=lazy)


def _fusermount(mountpoint: str | Path, lazy: bool) -> None:
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [os.fspath(mountpoint)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT_S)
    except FileNotFoundError:
        raise DaemonError("fusermount3 is missing: install the fuse3 package") from None
    except subprocess.TimeoutExpired:
        raise DaemonError(f"unmounting {mountpoint} timed out after {UNMOUNT_TIMEOUT_S:g} s") from None
    if result.returncode != 0:
        message = result.stderr.strip() or f"fusermount3 exited with status {result.returncode}"
        raise DaemonError(f"unmounting {mountpoint} failed: {message}")


def prepare_mountpoint(mountpoint: str | Path) -> None:
    """Create the mount point; lazily unmount a dead mount there, reject a live one."""
    path = Path(mountpoint)
    filesystem = mounted_filesystem(path)
    if filesystem is not None and filesystem != FILESYSTEM_TYPE:
        raise DaemonError(f"{path} is already a {filesystem} mount; choose another mount point")
    if filesystem is not None:
        try:
            # statfs always reaches the daemon. stat does not, because the kernel
            # serves it from cached attributes for a while after the daemon died.
            os.statvfs(path)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise DaemonError(f"mount point {path} is mounted but unusable: {exc.strerror}") from None
            log.warning("%s is a stale mount of a daemon that is gone; unmounting it lazily", path)
            lazy_unmount(path)
        else:
            raise DaemonError(
                f"{path} is already mounted; unmount it first (lazyfs unmount {path})")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DaemonError(f"cannot create mount point {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise DaemonError(f"mount point {path} is not a directory")


# ---------------------------------------------------------------------------
# Building the pieces


def open_configured_store(config: DaemonConfig) -> Store:
    """Open the configured store with the configured timeouts and retry bound."""
    options = StoreOptions(
        endpoint_url=config.s3_endpoint_url,
        region=config.s3_region,
        connect_timeout_s=config.store_connect_timeout_s,
        read_timeout_s=config.store_read_timeout_s,
        max_attempts=config.store_max_attempts,
        max_connections=max(32, config.fetch_concurrency + config.trace_replay_concurrency),
    )
    return open_store(config.store_url, options)


def build_tiers(config: DaemonConfig, store: Store) -> TierChain:
    """Return the chain RAM -> disk -> store; a tier with a zero budget is left out."""
    tiers: list[Tier] = []
    if config.ram_cache_bytes > 0:
        tiers.append(RamTier(config.ram_cache_bytes))
    if config.disk_cache_bytes > 0:
        path = Path(config.disk_cache_path) / "chunks"
        try:
            tiers.append(LmdbTier(path, config.disk_cache_bytes,
                                  map_size_bytes=config.disk_cache_map_bytes))
        except (OSError, lmdb.Error) as exc:
            raise DaemonError(f"cannot open the disk cache at {path}: {exc}; check disk_cache_path "
                              "or set disk_cache_bytes = 0") from None
    tiers.append(StoreTier(store, fetch_concurrency=config.fetch_concurrency,
                           fetch_timeout_s=config.fetch_timeout_s,
                           background_concurrency=config.trace_replay_concurrency))
    return TierChain(tiers, fill_queue_size=config.fill_queue_chunks)


def build_tree(config: DaemonConfig, store: Store, chain: TierChain) -> Tree:
    """Return the namespace; with a disk tier, indexes are kept under the disk cache too."""
    index_cache_dir = None
    if config.disk_cache_bytes > 0:
        index_cache_dir = Path(config.disk_cache_path) / "indexes"
    return Tree(store, chain, index_cache_dir=index_cache_dir, index_timeout_s=config.fetch_timeout_s,
                readahead_chunks=config.readahead_chunks,
                prefetch_concurrency=config.prefetch_concurrency)


def fuse_options(config: DaemonConfig) -> set[str]:
    """Return the mount options: read-only, kernel permission checks, allow_other if configured."""
    options = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
    if config.allow_other:
        options.add("allow_other")
    return options


def mount(operations: Operations, config: DaemonConfig) -> None:
    """Mount the FUSE file system (pyfuse3.init); raise DaemonError on failure."""
    try:
        pyfuse3.init(operations, config.mountpoint, fuse_options(config))
    except RuntimeError as exc:
        raise DaemonError(
            f"mounting {config.mountpoint} failed ({exc}); libfuse printed the reason above") from None
    log.info("mounted lazyfs at %s", config.mountpoint)


def trace_cache_dir(config: DaemonConfig) -> Path | None:
    """Return where boot traces are kept locally: beside the disk tier, or nowhere without one."""
    if config.disk_cache_bytes <= 0:
        return None
    return Path(config.disk_cache_path) / "traces"


def build_boot_traces(config: DaemonConfig, store: Store, chain: TierChain, tree: Tree) -> BootTraces:
    """Return the boot trace recorder and replayer, following the tree's attaches and reads."""
    traces = BootTraces(store, chain, record=config.trace_record, replay=config.trace_replay,
                        window_s=config.trace_window_s, max_chunks=config.trace_max_chunks,
                        concurrency=config.trace_replay_concurrency,
                        store_timeout_s=config.fetch_timeout_s, cache_dir=trace_cache_dir(config))
    traces.attach_to(tree)
    return traces


def status_reporter(config: DaemonConfig, store: Store, tree: Tree, chain: TierChain,
                    started_at_ns: int, traces: BootTraces | None = None):
    """Return the function that builds the control socket's status response."""

    def status() -> dict[str, Any]:
        return {
            "mountpoint": config.mountpoint,
            "store_url": config.store_url,
            "pid": os.getpid(),
            "started_at_ns": started_at_ns,
            "images": tree.status(),
            "indexes": tree.index_stats(),
            "tiers": chain.stats(),
            "chain": chain.chain_stats(),
            "readahead": tree.readahead_stats(),
            "store_requests": store.request_counts(),
            "traces": traces.status() if traces is not None else {},
            "store_results": store.result_counts(),
            "store_retries": store.retry_counts(),
        }

    return status


def image_handlers(store: Store, tree: Tree, traces: BootTraces | None = None) -> dict[str, Any]:
    """Return the control socket's ``resolve``, ``image``, ``sync`` and ``trace_save`` request handlers."""

    async def resolve(request: dict[str, Any]) -> dict[str, Any]:
        reference = request.get("reference")
        if not isinstance(reference, str) or not reference:
            raise LazyfsError("resolve needs a non-empty string 'reference'")
        if refs.is_index_digest(reference):
            # An index digest names immutable content; attaching it checks that it
            # exists, from the local index cache when the store is unreachable.
            return {"index": reference}
        digest = await trio.to_thread.run_sync(refs.resolve, store, reference)
        return {"index": digest}

    async def image(request: dict[str, Any]) -> dict[str, Any]:
        digest = request.get("index")
        if not isinstance(digest, str) or not refs.is_index_digest(digest):
            raise LazyfsError(f"image needs 'index', a 64-digit hex index digest, not {digest!r}")
        shift = None
        if request.get("shift") is not None:
            name = request["shift"]
            shift = IdShift.from_name(name.encode()) if isinstance(name, str) else None
            if shift is None:
                raise LazyfsError(f"invalid 'shift' {name!r}: expected '<uid base>:<gid base>:<count>' in decimal")
        view = await tree.attach_view(digest, shift)
        attached = view.image
        config = attached.index.config
        return {"index": digest, "config": config.get("config", {}), "source": config.get("source", {}),
                "files": attached.file_count, "size_bytes": attached.size_bytes, "path": view.path}

    async def sync(_request: dict[str, Any]) -> dict[str, Any]:
        # Trace replays, then the background fills of the disk tier, finish before the response.
        if traces is not None:
            await traces.wait_idle()
        await tree.chain.wait_for_fills()
        return {}

    handlers = {"resolve": resolve, "image": image, "sync": sync}
    if traces is not None:
        handlers.update(traces.control_handlers())
    return handlers


# ---------------------------------------------------------------------------
# Running


def run(config: DaemonConfig, notify_ready: Callable[[], None] | None = None) -> int:
    """Mount and serve until unmounted, SIGTERM or SIGINT; return the exit status (0).

    ``notify_ready`` is called once the mount, the control socket and the
    signal handlers all work. Raises DaemonError, ConfigError or StoreError
    when the mount cannot start.
    """
    log.info("lazyfs daemon %d starting: store %s, mount point %s",
             os.getpid(), config.store_url, config.mountpoint)
    log_configuration(config)
    prepare_mountpoint(config.mountpoint)
    try:
        trio.run(_main, config, notify_ready)
    except ExceptionGroup as group:
        # A lazyfs error inside the nursery (a busy control socket, say) is a
        # start failure like any other, not an internal error.
        matched, rest = group.split(LazyfsError)
        if matched is None or rest is not None:
            raise
        raise _first_leaf(matched) from group
    finally:
        logutil.flush_suppressed()
    log.info("lazyfs daemon %d stopped", os.getpid())
    return 0


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _main(config: DaemonConfig, notify_ready: Callable[[], None] | None) -> None:
    store = await trio.to_thread.run_sync(open_configured_store, config)
    try:
        chain = build_tiers(config, store)
        try:
            tree = build_tree(config, store, chain)
            fuse_metrics = tier_metrics = None
            if config.metrics_address is not None:
                fuse_metrics, tier_metrics = FuseMetrics(), TierMetrics()
                chain.get_observer = tier_metrics.observe
            mount(Operations(tree, fuse_metrics), config)
            try:
                await _serve(config, store, tree, chain, notify_ready, fuse_metrics, tier_metrics)
            finally:
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", config.mountpoint)
        finally:
            await chain.aclose()
    finally:
        store.close()


async def _serve(config: DaemonConfig, store: Store, tree: Tree, chain: TierChain,
                 notify_ready: Callable[[], None] | None, fuse_metrics: FuseMetrics | None,
                 tier_metrics: TierMetrics | None) -> None:
    traces = build_boot_traces(config, store, chain, tree)
    status = status_reporter(config, store, tree, chain, time.time_ns(), traces)
    control = ControlServer(config.control_socket, status, image_handlers(store, tree, traces))
    stop_notice = _StopNotice()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve)
            if config.metrics_address is not None:
                registry = build_registry(status, fuse_metrics, tier_metrics)
                metrics_server = MetricsServer(config.metrics_address, registry)
                await nursery.start(metrics_server.serve)
            await nursery.start(_watch_signals, nursery.cancel_scope, stop_notice)
            nursery.start_soon(_run_fuse, config, nursery.cancel_scope)
            watchdog_interval_s = notify.watchdog_interval_s()
            if watchdog_interval_s is not None:
                nursery.start_soon(_ping_watchdog, watchdog_interval_s / 2)
            if notify_ready is not None:
                notify_ready()
            notify.ready(f"serving {config.mountpoint}")
            log.info("serving %s", config.mountpoint)
    finally:
        stop_notice.send()


class _StopNotice:
    """STOPPING=1 for the service manager, sent once when shutdown begins."""

    def __init__(self) -> None:
        self.sent = False

    def send(self) -> None:
        if not self.sent:
            self.sent = True
            notify.stopping()


async def _ping_watchdog(period_s: float) -> None:
    """Send WATCHDOG=1 every ``period_s`` seconds until cancelled."""
    log.info("sending systemd watchdog keep-alives every %g s", period_s)
    while True:
        notify.watchdog()
        await trio.sleep(period_s)


async def _run_fuse(config: DaemonConfig, cancel_scope: trio.CancelScope) -> None:
    await pyfuse3.main(min_tasks=1, max_tasks=config.fuse_max_tasks)
    log.info("FUSE session for %s ended", config.mountpoint)
    cancel_scope.cancel()


async def _watch_signals(cancel_scope: trio.CancelScope, stop_notice: _StopNotice, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """End the FUSE session on the first SIGTERM or SIGINT; stop waiting for requests on the second."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        terminated = False
        async for signum in signals:
            if not terminated:
                log.info("received %s; unmounting", signal.Signals(signum).name)
                stop_notice.send()
                pyfuse3.terminate()
                terminated = True
            else:
                log.warning("received %s again; abandoning requests in progress",
                            signal.Signals(signum).name)
                cancel_scope.cancel()


class ReadinessPipe:
    """The write end of a readiness pipe: "ready" once the mount serves, or "failed CODE".

    ``finish`` closes the descriptor after its message and ignores later
    calls, so a late message cannot land in a reused descriptor number.
    """

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def send(self, message: str) -> None:
        """Write one line, unless a final message was already sent."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, message.encode() + b"\n")
        except OSError as exc:
            log.warning("cannot write %r to readiness fd %d: %s", message, self._fd, exc.strerror)

    def ready(self) -> None:
        self.finish("ready")

    def finish(self, message: str) -> None:
        """Send a final message and close the descriptor."""
        if self._fd is None:
            return
        self.send(message)
        os.close(self._fd)
        self._fd = None


# ---------------------------------------------------------------------------
# Background mode


def start_background(config: DaemonConfig, config_path: str | Path | None = None, *,
                     log_path: str | Path | None = None,
                     timeout_s: float = DEFAULT_START_TIMEOUT_S) -> int:
    """Start the daemon as a detached process; return its pid once the mount serves.

    The daemon is not a child of the caller because it forks away from the
    process started here, so the caller never has to reap it. It runs in a
    session of its own. Its output is appended to ``log_path`` (default
    ``config.log_path``). ``config_path`` only labels the configuration in the
    daemon's error messages. Raises DaemonError, with the tail of the log, when
    the daemon exits or does not become ready within ``timeout_s`` seconds. A
    daemon that timed out is stopped first.
    """
    log_path = Path(log_path or config.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log_file:
            log_offset = log_file.tell()
            launcher = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.daemon", "--ready-fd", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
                pass_fds=(write_fd,), start_new_session=True, env=_environment_without_notify())
        os.close(write_fd)
        write_fd = -1
        payload = {"config": to_dict(config), "source": str(config_path or "start_background")}
        with launcher:
            try:
                launcher.stdin.write(json.dumps(payload).encode())
                launcher.stdin.close()
            except BrokenPipeError:
                pass
        pid = _wait_for_readiness(read_fd, timeout_s, config, lambda: _log_tail(log_path, log_offset))
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    log.info("lazyfs daemon %d serves %s (log: %s)", pid, config.mountpoint, log_path)
    return pid


def _environment_without_notify() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in NOTIFY_VARIABLES}


def _read_line(read_fd: int, deadline: float) -> bytes | None:
    """Return the next line from the readiness pipe, b"" at EOF, None at the deadline."""
    line = b""
    while not line.endswith(b"\n"):
        readable, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return None
        byte = os.read(read_fd, 1)
        if not byte:
            return b""
        line += byte
    return line


def _wait_for_readiness(read_fd: int, timeout_s: float, config: DaemonConfig, log_tail) -> int:
    """Follow the readiness protocol: "pid N", then "ready" or "failed CODE"; return N."""
    deadline = time.monotonic() + timeout_s
    pid = None
    while True:
        line = _read_line(read_fd, deadline)
        if line is None:
            if pid is not None:
                _stop_detached(pid, config.mountpoint)
            raise DaemonError(f"the lazyfs daemon did not become ready within {timeout_s:g} s and was "
                              f"stopped{log_tail()}")
        if line == b"":
            raise DaemonError(f"the lazyfs daemon exited before serving {config.mountpoint}{log_tail()}")
        word, _, argument = line.decode(errors="replace").strip().partition(" ")
        if word == "pid":
            pid = int(argument)
        elif word == "ready" and pid is not None:
            return pid
        elif word == "failed":
            raise DaemonError(f"the lazyfs daemon exited with status {argument} before serving "
                              f"{config.mountpoint}{log_tail()}")
        else:
            raise DaemonError(f"the lazyfs daemon sent an unexpected readiness message {line!r}")


def _stop_detached(pid: int, mountpoint: str) -> None:
    """Stop a daemon that is not our child: SIGTERM, then SIGKILL, then detach its mount."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None
    if pidfd is not None:
        try:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    break
                readable, _, _ = select.select([pidfd], [], [], STOP_TIMEOUT_S)
                if readable:
                    break
        finally:
            os.close(pidfd)
    if is_mounted(mountpoint):
        try:
            lazy_unmount(mountpoint)
        except DaemonError as exc:
            log.warning("%s", exc)


def _log_tail(log_path: Path, offset: int) -> str:
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read()[-LOG_TAIL_BYTES:].decode(errors="replace").strip()
    except OSError as exc:
        return f" (its log {log_path} cannot be read: {exc.strerror})"
    if not text:
        return f" (its log {log_path} is empty)"
    return f"; the end of its log {log_path}:\n{text}"


def wait_ready(mountpoint: str | Path, control_socket: str | Path,
               timeout_s: float = DEFAULT_START_TIMEOUT_S) -> dict[str, Any]:
    """Wait until a daemon serves ``mountpoint`` and responds on its control socket.

    Returns its status. Raises DaemonError after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    client = ControlClient(control_socket, timeout_s=min(5.0, timeout_s))
    delay_s = 0.01
    last_error = "not mounted"
    while True:
        if is_mounted(mountpoint):
            try:
                status = client.status()
            except ControlError as exc:
                last_error = str(exc)
            else:
                if _canonical(status.get("mountpoint", "")) == _canonical(mountpoint):
                    return status
                last_error = f"the daemon at {control_socket} serves {status.get('mountpoint')!r}"
        if time.monotonic() >= deadline:
            raise DaemonError(f"no lazyfs daemon serves {mountpoint} after {timeout_s:g} s: {last_error}")
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.5)


def _child_main(argv: list[str]) -> int:
    """Entry point of a background daemon: configuration as JSON on stdin, then detach.

    The process started by ``start_background`` forks; the parent exits at
    once and the child becomes the daemon. The child writes "pid N" to the
    readiness pipe, then "ready" once the mount serves (from ``run``) or
    "failed CODE" if it cannot start.
    """
    from .cli import exit_code_for

    parser = argparse.ArgumentParser(prog="python -m lazyfs.daemon")
    parser.add_argument("--ready-fd", type=int, required=True)
    arguments = parser.parse_args(argv)
    payload = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if os.fork() != 0:
        os._exit(0)
    readiness = ReadinessPipe(arguments.ready_fd)
    readiness.send(f"pid {os.getpid()}")
    try:
        config = from_dict(payload["config"], payload["source"])
        configure_logging(config.log_level)
        return run(config, readiness.ready)
    except LazyfsError as exc:
        log.error("%s", exc)
        code = exit_code_for(exc)
        readiness.finish(f"failed {code}")
        return code


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
