"""The ``lazyfs`` command: mount, resolve, status, trace and unmount."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import urllib.parse
from pathlib import Path
from typing import Any

from . import __version__
from .config import DaemonConfig, load_config
from .errors import (ConfigError, ControlError, DaemonError, IndexFormatError, IntegrityError,
                     InvalidReference, LazyfsError, RefNotFound, StoreError)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_STORE = 4
EXIT_NOT_FOUND = 5
EXIT_DAEMON = 6
EXIT_INTEGRITY = 7
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_INTERNAL}    internal error (a bug: please report it with the traceback)
  {EXIT_USAGE}    invalid command line, or an invalid image reference in it
  {EXIT_CONFIG}    invalid configuration file, key or value
  {EXIT_STORE}    the store failed or could not be reached
  {EXIT_NOT_FOUND}    not found: no such image reference, or no daemon at the control socket
  {EXIT_DAEMON}    mounting, starting or unmounting failed (also: nothing mounted to unmount)
  {EXIT_INTEGRITY}    stored data failed verification (index or chunk digest mismatch)
"""


def exit_code_for(error: LazyfsError) -> int:
    """Return the exit status for a lazyfs error class (listed in EXIT_CODES_HELP)."""
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, InvalidReference):
        return EXIT_USAGE
    if isinstance(error, (RefNotFound, ControlError)):
        return EXIT_NOT_FOUND
    if isinstance(error, StoreError):
        return EXIT_STORE
    if isinstance(error, (IntegrityError, IndexFormatError)):
        return EXIT_INTEGRITY
    if isinstance(error, DaemonError):
        return EXIT_DAEMON
    return EXIT_INTERNAL


def _store_url(value: str) -> str:
    """Accept a store URL, or a local directory path that becomes a file:// URL."""
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme in ("s3", "file"):
        return value
    if "://" in value:
        raise argparse.ArgumentTypeError(
            f"unsupported store URL {value!r}: use s3://BUCKET/PREFIX, file:///DIR or a directory path")
    return Path(value).resolve().as_uri()


def _byte_count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of bytes") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Mount container images lazily from a chunk store.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount", help="mount the image tree and serve it",
        description="Mount <MOUNTPOINT>/images/<index digest>/ for every image in the store.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(mount)
    mount.add_argument("--ram-cache-bytes", type=_byte_count, metavar="N",
                       help="RAM tier size in bytes (0 turns it off)")
    mount.add_argument("--disk-cache-path", metavar="DIR", help="directory of the disk (LMDB) tier")
    mount.add_argument("--disk-cache-bytes", type=_byte_count, metavar="N",
                       help="disk tier size in bytes (0 turns it off)")
    mount.add_argument("--control-socket", metavar="PATH", help="path of the control socket")
    mount.add_argument("--log-file", metavar="PATH",
                       help="log file in background mode (default: lazyfs.log next to the control socket)")
    mount.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    mount.add_argument("--metrics-address", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    mount.add_argument("--allow-other", action="store_true", default=None,
                       help="let users other than the mounting one access the mount")
    mode = mount.add_mutually_exclusive_group()
    mode.add_argument("--foreground", dest="background", action="store_false", default=False,
                      help="serve in this process until unmounted or SIGTERM (the default)")
    mode.add_argument("--background", dest="background", action="store_true",
                      help="start a detached daemon and exit once the mount serves")
    mount.add_argument("--ready-fd", type=int, metavar="FD",
                       help="in the foreground, write 'ready' and a newline to this file "
                            "descriptor once the mount serves")
    mount.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                       help="where to mount (default: the configured mountpoint)")

    resolve = commands.add_parser(
        "resolve", help="print the index digest of an image reference",
        description="Print the index digest of an image name, manifest digest or index digest.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(resolve)
    resolve.add_argument("reference", metavar="REF",
                         help="image name (registry/repo:tag), sha256:<manifest digest> or index digest")

    status = commands.add_parser(
        "status", help="show the daemon's images and cache statistics",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("--config", metavar="FILE", help="TOML configuration file")
    status.add_argument("--socket", metavar="PATH", help="control socket (default: the configured one)")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")

    unmount = commands.add_parser(
        "unmount", help="unmount; the daemon serving the mount then exits",
        description="Unmount a lazyfs mount; its daemon then exits. When the configured control socket "
                    "belongs to the daemon of that mount point, wait until the daemon has exited.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    unmount.add_argument("--config", metavar="FILE", help="TOML configuration file")
    unmount.add_argument("--lazy", action="store_true",
                         help="detach now even while files are open (fusermount3 -z)")
    unmount.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                         help="mount point (default: the configured mountpoint)")

    trace = commands.add_parser(
        "trace", help="end an image's boot trace recording and write the trace",
        description="trace save IMAGE: end the daemon's boot trace recording of IMAGE and write the "
                    "trace to the store, unless a valid trace exists there.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    trace.add_argument("action", choices=("save",), help="what to do with the trace")
    trace.add_argument("reference", metavar="IMAGE",
                       help="image name (registry/repo:tag), sha256:<manifest digest> or index digest")
    trace.add_argument("--config", metavar="FILE", help="TOML configuration file")
    trace.add_argument("--socket", metavar="PATH", help="control socket (default: the configured one)")
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--store", type=_store_url, metavar="URL",
                        help="store: s3://BUCKET/PREFIX, file:///DIR or a directory path")
    parser.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint URL (S3-compatible services)")


def _config(arguments: argparse.Namespace, **overrides: Any) -> DaemonConfig:
    overrides.setdefault("store_url", getattr(arguments, "store", None))
    overrides.setdefault("s3_endpoint_url", getattr(arguments, "endpoint_url", None))
    return load_config(arguments.config, overrides)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def _mount(arguments: argparse.Namespace) -> int:
    from . import daemon

    config = _config(
        arguments,
        mountpoint=_absolute(arguments.mountpoint),
        ram_cache_bytes=arguments.ram_cache_bytes,
        disk_cache_path=_absolute(arguments.disk_cache_path),
        disk_cache_bytes=arguments.disk_cache_bytes,
        control_socket=_absolute(arguments.control_socket),
        log_file=_absolute(arguments.log_file),
        log_level=arguments.log_level,
        allow_other=arguments.allow_other,
        metrics_address=arguments.metrics_address,
    )
    if arguments.background:
        if arguments.ready_fd is not None:
            raise ConfigError("the command line: --ready-fd works only with --foreground")
        pid = daemon.start_background(config, arguments.config)
        print(f"lazyfs daemon {pid} serves {config.mountpoint}")
        return EXIT_OK
    daemon.configure_logging(config.log_level)
    notify_ready = None
    if arguments.ready_fd is not None:
        notify_ready = daemon.ReadinessPipe(arguments.ready_fd).ready
    return daemon.run(config, notify_ready)


def _resolve(arguments: argparse.Namespace) -> int:
    from . import daemon, refs

    config = _config(arguments)
    store = daemon.open_configured_store(config)
    try:
        print(refs.resolve(store, arguments.reference))
    finally:
        store.close()
    return EXIT_OK


def _status(arguments: argparse.Namespace) -> int:
    from .control_client import ControlClient

    socket_path = arguments.socket or load_config(arguments.config).control_socket
    status = ControlClient(socket_path).status()
    if arguments.json:
        # Unsorted, because the tiers are listed nearest first.
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return EXIT_OK


def _trace(arguments: argparse.Namespace) -> int:
    from .control_client import ControlClient

    client = ControlClient(arguments.socket or load_config(arguments.config).control_socket)
    digest = client.resolve(arguments.reference)
    response = client.request({"op": "trace_save", "index": digest})
    if response["saved"]:
        print(f"saved the boot trace of {digest} with {response['chunks']} chunks")
        return EXIT_OK
    state = response["state"]
    if state == "not attached":
        print(f"lazyfs trace: image {digest} is not attached to the daemon, so nothing was recorded: "
              "read from the image first, with trace_record = true", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"wrote no boot trace for {digest}: {_TRACE_STATES.get(state, state)}")
    return EXIT_OK


# Reasons a trace_save request wrote nothing, by the image's trace state.
_TRACE_STATES = {
    "saved": "its trace was saved already",
    "exists": "the store has a valid trace for it already, which was kept",
    "present": "the store has a valid trace for it already, which was kept",
    "replaying": "the store has a valid trace for it already, which the daemon is replaying",
    "replayed": "the store has a valid trace for it already, which the daemon replayed",
    "empty": "the recording ended with no chunk read",
    "none": "the daemon is not recording it (trace_record is off, or the recording ended)",
    "loading": "the daemon is still looking for its trace in the store; try again",
}


# How long ``lazyfs unmount`` waits for the daemon to exit after the unmount.
UNMOUNT_WAIT_S = 30.0


def _unmount(arguments: argparse.Namespace) -> int:
    from . import daemon

    config = load_config(arguments.config)
    mountpoint = arguments.mountpoint or config.mountpoint
    pid = _daemon_pid(config.control_socket, mountpoint)
    daemon.unmount(mountpoint, lazy=arguments.lazy)
    if pid is not None and not daemon.wait_for_exit(pid, UNMOUNT_WAIT_S):
        print(f"lazyfs unmount: {mountpoint} is unmounted, but its daemon (pid {pid}) is still running "
              f"{UNMOUNT_WAIT_S:g} s later; see its log", file=sys.stderr)
        return EXIT_DAEMON
    return EXIT_OK


def _daemon_pid(control_socket: str, mountpoint: str | Path) -> int | None:
    """Return the pid of the daemon at ``control_socket`` if it serves ``mountpoint``, else None."""
    from .control_client import ControlClient

    try:
        status = ControlClient(control_socket).status()
    except ControlError:
        return None
    if Path(status["mountpoint"]).resolve() != Path(mountpoint).resolve():
        return None
    return status["pid"]


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _hit_ratio(counters: dict[str, int]) -> str:
    total = counters["hits"] + counters["misses"]
    return "-" if total == 0 else f"{100 * counters['hits'] / total:.1f} %"


def format_status(status: dict[str, Any]) -> str:
    """Return the status as aligned text for people; ``--json`` prints every counter."""
    lines = [
        f"mount point   {status['mountpoint']}",
        f"store         {status['store_url']}",
        f"pid           {status['pid']}",
        f"images        {len(status['images'])}",
    ]
    for digest, image in status["images"].items():
        lines += _image_lines(digest, image)
    lines += _tier_lines(status["tiers"])
    chain, readahead = status["chain"], status["readahead"]
    lines.append(f"in flight     {chain['in_flight']} chunk fetches, {readahead['prefetching']} prefetches, "
                 f"{chain['fill_queue']} chunks waiting for the disk tier")
    lines += _store_lines(status)
    return "\n".join(lines)


def _image_lines(digest: str, image: dict[str, int]) -> list[str]:
    return [
        f"  {digest}",
        f"    {_size(image['size_bytes'])} in {image['inodes']} inodes and {image['chunks']} chunks",
        f"    read {_size(image['bytes_read'])} in {image['reads']} reads, "
        f"fetched {_size(image['fetched_bytes'])} in {image['fetched_chunks']} chunks, "
        f"{image['read_errors']} read errors",
    ]


def _tier_lines(tiers: dict[str, dict[str, int]]) -> list[str]:
    lines = [f"{'tier':<8}{'hits':>8}{'misses':>8}{'hit ratio':>11}{'served':>12}  cache or store"]
    for name, tier in tiers.items():
        line = (f"  {name:<6}{tier['hits']:>8}{tier['misses']:>8}{_hit_ratio(tier):>11}"
                f"{_size(tier['bytes_served']):>12}  ")
        if "capacity_bytes" in tier:
            line += (f"{_size(tier['used_bytes'])} of {_size(tier['capacity_bytes'])}, "
                     f"{tier['entries']} chunks, {tier['evictions']} evicted")
            if "corrupt" in tier:
                line += f", {tier['corrupt']} corrupt"
        elif "requests" in tier:
            line += f"{tier['requests']} requests, {_size(tier['bytes'])} received"
        lines.append(line)
    return lines


def _store_lines(status: dict[str, Any]) -> list[str]:
    lines = []
    for name, tier in status["tiers"].items():
        if "requests" in tier:
            lines.append(f"store errors  {name}: {tier['not_found']} not found, "
                         f"{tier['integrity_errors']} failed verification, {tier['timeouts']} timed out, "
                         f"{tier['errors']} other")
    requests = []
    for operation, count in sorted(status["store_requests"].items()):
        results = status["store_results"].get(operation, {})
        detail = ", ".join(f"{number} {result}" for result, number in sorted(results.items()))
        requests.append(f"{operation} {count}" + (f" ({detail})" if detail else ""))
    retries = sum(status["store_retries"].values())
    lines.append(f"store client  {'; '.join(requests) or 'no requests'}; {retries} retries")
    return lines


_COMMANDS = {"mount": _mount, "resolve": _resolve, "status": _status, "unmount": _unmount,
             "trace": _trace}


def main(argv: list[str] | None = None) -> int:
    """Run one ``lazyfs`` command and return its exit status."""
    arguments = _build_parser().parse_args(argv)
    if arguments.command != "mount":
        logging.basicConfig(level=logging.WARNING, format="lazyfs: %(levelname)s: %(message)s")
    try:
        return _COMMANDS[arguments.command](arguments)
    except LazyfsError as exc:
        print(f"lazyfs {arguments.command}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        print(f"lazyfs {arguments.command}: internal error:", file=sys.stderr)
        traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
