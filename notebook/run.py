"""``lazyfs-run IMAGE [-- CMD ARGS...]``: run a command in a container over a lazy image.

Steps: find the node's lazyfs daemon through its control socket (start it in
the background when none responds), resolve IMAGE to its index digest, mount an
overlayfs with the image's directory on the lazyfs mount as the lower layer, run the
command with runc using the image's Env, WorkingDir and User, then remove the
container and its upper directory, and send the daemon a ``trace_save`` request,
which ends a boot trace recording of the image. The exit code is the command's.

The container gets a user namespace: its ids 0..65535 are host ids from a
base (``lazyfs.notebook.userns`` says which), and the lower layer is the
daemon's view ``<mountpoint>/shifted/<uid base>:<gid base>:65536/<digest>``,
whose owners are shifted into that range. ``--no-userns`` runs the container
as host root over ``<mountpoint>/images/<digest>`` instead.

Exit codes of lazyfs-run itself (the command's own codes pass through, so
these apply only when no command ran), as Docker uses them: 125 lazyfs or
runc failed to set up the container, 126 the command could not be executed,
127 the command was not found in the image, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from lazyfs.config import load_config
from lazyfs.control_client import ControlClient
from lazyfs.errors import ControlError, LazyfsError
from lazyfs.idshift import MAX_ID

from .container import ContainerRequest, Runc, run_container
from .userns import CONTAINER_IDS, host_id_range

log = logging.getLogger("lazyfs.run")

EXIT_SETUP_FAILED = 125

DEFAULT_STATE_DIR = Path("/var/lib/lazyfs/containers")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs-run",
        usage="%(prog)s [options] IMAGE [--] [COMMAND [ARG ...]]",
        description="Run a command in a runc container whose root is a lazily fetched image.",
        epilog="Exit code: the command's own; 125 when the container could not be set up, "
               "126 when the command could not be executed, 127 when it was not found; 2 usage error.",
    )
    # Optional only for argparse: with a REMAINDER positional after it, a
    # missing image would be reported as "image, command" both required.
    parser.add_argument("image", nargs="?", help="image name, manifest digest (sha256:...) or index digest")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="command and arguments, optionally after --; default: the image's Entrypoint + Cmd")
    parser.add_argument("--config", type=Path, help="daemon configuration file (TOML)")
    parser.add_argument("--store", help="store URL for a daemon started by this command")
    parser.add_argument("--endpoint-url", help="S3 endpoint URL for a daemon started by this command")
    parser.add_argument("--mountpoint", help="lazyfs mount point for a daemon started by this command")
    parser.add_argument("--control-socket", help="control socket of the daemon")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"where container upper directories live (default {DEFAULT_STATE_DIR})")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set an environment variable (repeatable)")
    parser.add_argument("-w", "--workdir", help="working directory inside the container")
    parser.add_argument("-u", "--user", help="user[:group] inside the container (default: the image's)")
    parser.add_argument("--no-userns", action="store_true",
                        help="run without a user namespace, so root in the container is host root")
    parser.add_argument("--userns-base", type=int, metavar="ID",
                        help="first host uid and gid of the container's 65536 ids (default: root's "
                             "entry in /etc/subuid and /etc/subgid, else 100000)")
    parser.add_argument("--stats", action="store_true",
                        help="print timings and bytes fetched per tier to stderr after the run")
    parser.add_argument("--stats-json", type=Path, metavar="FILE",
                        help="write timings and bytes fetched per tier to FILE as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    for key, value in (("store_url", args.store), ("s3_endpoint_url", args.endpoint_url),
                       ("mountpoint", args.mountpoint), ("control_socket", args.control_socket)):
        if value is not None:
            overrides[key] = value
    return overrides


def connect_daemon(config, config_path: Path | None, overrides: dict) -> tuple[ControlClient, dict]:
    """Return a client of the running daemon and its status, starting one if none responds."""
    client = ControlClient(config.control_socket)
    if os.path.exists(config.control_socket):
        try:
            status = client.status()
        except ControlError as exc:
            # A socket with no listener is left by a daemon that died. Any other
            # failure (permissions, a hung daemon) must not start a second daemon.
            if "nothing listens" not in str(exc):
                raise
        else:
            _warn_ignored(status, overrides)
            return client, status
    # Imported here: the daemon pulls in pyfuse3, trio and lmdb, which a run
    # against an already running daemon never needs.
    from lazyfs.daemon import start_background

    start_background(config, config_path)
    print(f"lazyfs-run: started a lazyfs daemon serving {config.mountpoint}; "
          f"stop it with: lazyfs unmount {config.mountpoint}", file=sys.stderr)
    return client, client.status()


def _warn_ignored(status: dict, overrides: dict) -> None:
    running = {"store_url": status.get("store_url"), "mountpoint": status.get("mountpoint")}
    for key, value in running.items():
        if key in overrides and overrides[key] != value:
            print(f"lazyfs-run: warning: the running daemon uses {key} {value!r}; "
                  f"{overrides[key]!r} applies only to a daemon this command starts", file=sys.stderr)


def _check_arguments(args: argparse.Namespace) -> None:
    """Reject values runc would fail on later with a less clear message."""
    for item in args.env:
        name, equals, _value = item.partition("=")
        if not name or not equals:
            raise UsageError(f"invalid -e {item!r}: expected NAME=VALUE")
    if args.workdir is not None and not args.workdir.startswith("/"):
        raise UsageError(f"invalid -w {args.workdir!r}: the working directory must be an absolute path")
    if args.no_userns and args.userns_base is not None:
        raise UsageError("--userns-base and --no-userns exclude each other")
    if args.userns_base is not None and not 1 <= args.userns_base <= MAX_ID - CONTAINER_IDS + 1:
        raise UsageError(f"invalid --userns-base {args.userns_base}: "
                         f"expected 1 to {MAX_ID - CONTAINER_IDS + 1}")
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]


# Counters that only grow; sizes such as used_bytes are gauges and not diffed.
_TIER_COUNTERS = ("hits", "misses", "bytes_served", "requests", "bytes", "errors")


def tier_counters(status: dict) -> dict[str, dict[str, int]]:
    """Return {tier: {"hits": n, "bytes_served": n, ...}} from a daemon status."""
    return {name: {key: tier[key] for key in _TIER_COUNTERS if key in tier}
            for name, tier in status.get("tiers", {}).items()}


def counters_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    return {name: {key: value - before.get(name, {}).get(key, 0) for key, value in counters.items()}
            for name, counters in after.items()}


def _format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return str(count)


def _print_stats(stats: dict) -> None:
    image = stats["image"]
    lines = [f"lazyfs-run: image {image['index']}: {image['files']} files, "
             f"{_format_bytes(image['size_bytes'])} of file data"]
    for name, counters in stats["fetched"].items():
        parts = ", ".join(f"{key} {(_format_bytes(v) if 'bytes' in key else v)}" for key, v in sorted(counters.items()))
        lines.append(f"lazyfs-run:   {name}: {parts}")
    timings = ", ".join(f"{key} {value:.3f}s" for key, value in stats["seconds"].items())
    lines.append(f"lazyfs-run:   seconds: {timings}")
    print("\n".join(lines), file=sys.stderr)


def end_boot_trace(client: ControlClient, index_digest: str) -> None:
    """Ask the daemon to end the image's boot trace recording and write the trace.

    The daemon writes nothing unless it records the image (``trace_record``)
    and no valid trace exists yet. A failure costs only the trace, so it is a warning.
    """
    try:
        client.request({"op": "trace_save", "index": index_digest})
    except ControlError as exc:
        log.warning("ending the boot trace of image %s failed: %s", index_digest, exc)


def image_path(image: dict, shifted: bool) -> str:
    """Return the image's directory relative to the mount point from an ``image`` response."""
    if "path" in image:
        return image["path"]
    if shifted:
        # A daemon started before shifted views existed ignores "shift".
        raise LazyfsError("the running lazyfs daemon cannot shift owners for a user namespace: "
                          "restart it with this version (lazyfs unmount), or pass --no-userns")
    return f"images/{image['index']}"


def _exit_on_sigterm(number, _frame) -> None:
    # SystemExit unwinds through the cleanup of the overlay and the container.
    raise SystemExit(128 + number)


class UsageError(Exception):
    """An invalid command line (exit code 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.image is None:
        parser.error("the following argument is required: image (the command is optional)")
    try:
        _check_arguments(args)
    except UsageError as exc:
        parser.error(str(exc))
    if os.geteuid() != 0:
        print("lazyfs-run: error: containers need root (runc, overlayfs mounts): run as root",
              file=sys.stderr)
        return EXIT_SETUP_FAILED
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    started = time.monotonic()
    try:
        overrides = _overrides(args)
        config = load_config(args.config, overrides)
        client, status = connect_daemon(config, args.config, overrides)
        connected = time.monotonic()
        index_digest = client.resolve(args.image)
        id_range = None if args.no_userns else host_id_range(args.userns_base)
        image = client.image(index_digest, shift=id_range.shift if id_range is not None else None)
        image_dir = Path(status["mountpoint"]) / image_path(image, id_range is not None)
        before = tier_counters(client.status())
        request = ContainerRequest(
            image_dir=image_dir, image_config=image["config"], args=args.command,
            env=args.env, workdir=args.workdir, user=args.user, id_range=id_range)
        prepared = time.monotonic()
        exit_code = run_container(request, args.state_dir, Runc())
        finished = time.monotonic()
        fetched = counters_delta(before, tier_counters(client.status()))
        end_boot_trace(client, index_digest)
    except LazyfsError as exc:
        print(f"lazyfs-run: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_SETUP_FAILED)

    stats = {
        "image": {"index": index_digest, "files": image.get("files"), "size_bytes": image.get("size_bytes")},
        "exit_code": exit_code,
        "fetched": fetched,
        "seconds": {"daemon": connected - started, "resolve": prepared - connected,
                    "run": finished - prepared, "total": finished - started},
    }
    if args.stats:
        _print_stats(stats)
    if args.stats_json:
        try:
            args.stats_json.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            # The command ran: its exit code stays the result.
            print(f"lazyfs-run: warning: cannot write --stats-json {args.stats_json}: {exc.strerror}",
                  file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
