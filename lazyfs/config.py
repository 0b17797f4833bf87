"""The daemon's configuration: one frozen dataclass, read from TOML plus overrides.

A configuration file contains top-level keys named like the fields of
``DaemonConfig``, for example::

    store_url = "s3://images/prod"
    s3_endpoint_url = "http://127.0.0.1:9000"
    mountpoint = "/run/lazyfs/mnt"
    ram_cache_bytes = 1073741824
    disk_cache_bytes = 107374182400

Sizes are integers in bytes and durations are numbers in seconds, as the
field names state. Relative paths in a file are relative to the file's
directory. Unknown keys, values of the wrong type and invalid values are
ConfigErrors that name the key and the file (or the command line), never
silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .trace import MAX_TRACE_CHUNKS

MiB = 1 << 20
GiB = 1 << 30

LOG_LEVELS = ("debug", "info", "warning", "error")

# sockaddr_un.sun_path on Linux has room for 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107

COMMAND_LINE = "the command line"


@dataclass(frozen=True)
class DaemonConfig:
    """Settings of one lazyfs daemon; every field has a default."""

    # Object store with chunks/, indexes/ and refs/: file:///DIR or s3://BUCKET/PREFIX.
    store_url: str = "file:///var/lib/lazyfs/store"
    # S3 endpoint for S3-compatible services; None means boto3's default resolution.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    mountpoint: str = "/run/lazyfs/mnt"
    ram_cache_bytes: int = 512 * MiB
    disk_cache_path: str = "/var/cache/lazyfs"
    # Compressed chunk bytes in the disk tier; 0 turns it off.
    disk_cache_bytes: int = 10 * GiB
    # LMDB map size; None means lazyfs.lmdb_tier.default_map_size(disk_cache_bytes).
    disk_cache_map_bytes: int | None = None
    # Chunk fetches from the store that run at once (worker threads).
    fetch_concurrency: int = 16
    # Whole time one chunk fetch may take, queueing and retries included.
    fetch_timeout_s: float = 30.0
    store_connect_timeout_s: float = 5.0
    store_read_timeout_s: float = 15.0
    store_max_attempts: int = 5
    # Chunks fetched ahead of a sequential reader (0 turns read-ahead off).
    readahead_chunks: int = 2
    # Read-ahead fetches that run at once; kept below fetch_concurrency so that
    # demand reads always find a free fetch slot.
    prefetch_concurrency: int = 4
    # Chunks waiting to be written to the disk tier in the background; a fill
    # that finds the queue full is dropped and counted.
    fill_queue_chunks: int = 64
    # Boot traces (lazyfs.prefetch). Recording stores the order in which an
    # image's chunks are first read beside its index. Replay prefetches a
    # stored trace's chunks in the background when a daemon attaches the image.
    # Recording needs write access to the store, so only replay is on by default.
    trace_record: bool = False
    trace_replay: bool = True
    # A recording ends this long after the attach, unless a trace_save request
    # or trace_max_chunks ended it earlier.
    trace_window_s: float = 60.0
    trace_max_chunks: int = 4096
    # Replayed chunk fetches that run at once, in store worker threads of
    # their own beside the fetch_concurrency threads of demand reads.
    trace_replay_concurrency: int = 4
    control_socket: str = "/run/lazyfs/control.sock"
    # Daemon log in background mode; None means lazyfs.log next to the control socket.
    log_file: str | None = None
    allow_other: bool = False
    log_level: str = "info"
    # Maximum number of FUSE requests handled at once (pyfuse3 worker tasks).
    fuse_max_tasks: int = 64
    # HOST:PORT of the Prometheus metrics endpoint (http://HOST:PORT/metrics);
    # None turns it off. IPv6 hosts go in brackets: "[::1]:9477".
    metrics_address: str | None = None

    def __post_init__(self) -> None:
        problem = find_problem(self)
        if problem is not None:
            key, message = problem
            raise InvalidValue(key, f"key {key!r} {message}, not {getattr(self, key)!r}")

    @property
    def log_path(self) -> str:
        """Path of the background-mode log file."""
        if self.log_file is not None:
            return self.log_file
        return str(Path(self.control_socket).parent / "lazyfs.log")


class InvalidValue(ConfigError):
    """A field value out of range or of a wrong format; ``key`` names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


FIELDS = {field.name: field for field in dataclasses.fields(DaemonConfig)}
_HINTS = typing.get_type_hints(DaemonConfig)
_PATH_FIELDS = ("mountpoint", "disk_cache_path", "control_socket", "log_file")


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> DaemonConfig:
    """Read a TOML file (if given), apply ``overrides`` on top and validate everything.

    ``overrides`` come from the command line; None values in it are ignored,
    so absent flags leave the file's values in place. Raises ConfigError.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        for key, value in _read_toml(Path(path)).items():
            values[key] = value
            sources[key] = str(path)
        _resolve_relative_paths(values, Path(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
            sources[key] = COMMAND_LINE
    return _build(values, sources)


def from_dict(values: Mapping[str, Any], source: str) -> DaemonConfig:
    """Build a configuration from plain values, checked like a file's; raise ConfigError."""
    return _build(dict(values), {key: source for key in values})


def to_dict(config: DaemonConfig) -> dict[str, Any]:
    """Return the configuration as plain values (for JSON and for a child process)."""
    return dataclasses.asdict(config)


def _build(values: dict[str, Any], sources: dict[str, str]) -> DaemonConfig:
    for key in values:
        if key not in FIELDS:
            raise ConfigError(f"{sources[key]}: unknown key {key!r}; valid keys: {', '.join(FIELDS)}")
    checked = {key: _check_type(key, value, sources[key]) for key, value in values.items()}
    try:
        return DaemonConfig(**checked)
    except InvalidValue as exc:
        source = sources.get(exc.key, "the defaults")
        raise ConfigError(f"{source}: {exc}") from None


def _resolve_relative_paths(values: dict[str, Any], path: Path) -> None:
    base = path.resolve().parent
    for key in _PATH_FIELDS:
        if isinstance(values.get(key), str):
            values[key] = str(base / values[key])


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]


def _check_type(key: str, value: Any, source: str) -> Any:
    hint = _HINTS[key]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(arg for arg in typing.get_args(hint) if arg is not type(None)) if optional else hint
    if value is None and optional:
        return None
    # bool is a subclass of int, so it is rejected explicitly for numbers.
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base in (str, bool) and type(value) is base:
        return value
    raise ConfigError(
        f"{source}: key {key!r} must be {_type_name(base)}, not {type(value).__name__} {value!r}")


def find_problem(config: DaemonConfig) -> tuple[str, str] | None:
    """Return (key, what is wrong) for the first invalid value, or None."""
    for key in ("ram_cache_bytes", "disk_cache_bytes"):
        if getattr(config, key) < 0:
            return key, "must be >= 0"
    if config.disk_cache_map_bytes is not None and config.disk_cache_map_bytes < MiB:
        return "disk_cache_map_bytes", f"must be at least {MiB} (1 MiB)"
    for key in ("fetch_concurrency", "store_max_attempts", "fuse_max_tasks", "prefetch_concurrency",
                "trace_replay_concurrency"):
        if getattr(config, key) < 1:
            return key, "must be >= 1"
    for key in ("readahead_chunks", "fill_queue_chunks"):
        if getattr(config, key) < 0:
            return key, "must be >= 0"
    if config.prefetch_concurrency >= config.fetch_concurrency:
        return "prefetch_concurrency", "must be less than fetch_concurrency"
    if not 1 <= config.trace_max_chunks <= MAX_TRACE_CHUNKS:
        return "trace_max_chunks", f"must be 1 to {MAX_TRACE_CHUNKS}"
    for key in ("fetch_timeout_s", "store_connect_timeout_s", "store_read_timeout_s", "trace_window_s"):
        if not getattr(config, key) > 0:
            return key, "must be > 0"
    if config.log_level not in LOG_LEVELS:
        return "log_level", f"must be one of {', '.join(LOG_LEVELS)}"
    problem = _store_url_problem(config.store_url)
    if problem is not None:
        return "store_url", problem
    if config.s3_endpoint_url is not None:
        parsed = urllib.parse.urlsplit(config.s3_endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            return "s3_endpoint_url", "must be an http:// or https:// URL"
    for key in _PATH_FIELDS:
        value = getattr(config, key)
        if value is not None and not os.path.isabs(value):
            return key, "must be an absolute path"
    if len(os.fsencode(config.control_socket)) > MAX_SOCKET_PATH_BYTES:
        return "control_socket", f"must be at most {MAX_SOCKET_PATH_BYTES} bytes long (the Unix socket path limit)"
    if config.metrics_address is not None:
        try:
            parse_host_port(config.metrics_address)
        except ValueError as exc:
            return "metrics_address", str(exc)
    return None


def parse_host_port(address: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[IPv6]:PORT" into host and port; raise ValueError.

    The port must be 1 to 65535, because a scraper needs a fixed port.
    """
    host, separator, port_text = address.rpartition(":")
    if not separator or not host:
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:9477")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError("must put an IPv6 host in brackets, for example [::1]:9477")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("must put an IPv6 host in brackets, for example [::1]:9477")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError("must end with a port from 1 to 65535")
    return host, int(port_text)


def _store_url_problem(url: str) -> str | None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "s3":
        return None if parsed.netloc else "must name a bucket (s3://BUCKET/PREFIX)"
    if parsed.scheme == "file":
        if parsed.netloc in ("", "localhost") and parsed.path.startswith("/"):
            return None
        return "must be file:///ABSOLUTE/PATH"
    return "must be file:///DIR or s3://BUCKET/PREFIX"
