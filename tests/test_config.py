"""The daemon configuration: defaults, TOML files, overrides and every kind of rejection."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lazyfs.config import DaemonConfig, from_dict, load_config, to_dict
from lazyfs.errors import ConfigError


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lazyfs.toml"
    path.write_text(text)
    return path


def test_config_defaults():
    config = load_config()

    assert config == DaemonConfig()
    assert config.store_url == "file:///var/lib/lazyfs/store"
    assert config.s3_endpoint_url is None
    assert config.mountpoint == "/run/lazyfs/mnt"
    assert config.ram_cache_bytes == 512 << 20
    assert config.disk_cache_path == "/var/cache/lazyfs"
    assert config.disk_cache_bytes == 10 << 30
    assert config.fetch_concurrency == 16
    assert config.fetch_timeout_s == 30.0
    assert config.readahead_chunks == 2
    assert config.prefetch_concurrency == 4
    assert config.fill_queue_chunks == 64
    assert config.control_socket == "/run/lazyfs/control.sock"
    assert config.allow_other is False
    assert config.log_level == "info"
    assert config.log_path == "/run/lazyfs/lazyfs.log"


def test_config_is_frozen():
    config = DaemonConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mountpoint = "/elsewhere"


def test_config_file_values(tmp_path: Path):
    path = write_config(tmp_path, """
store_url = "s3://bucket/prefix"
s3_endpoint_url = "http://127.0.0.1:9000"
mountpoint = "/mnt/lazyfs"
ram_cache_bytes = 1048576
disk_cache_bytes = 0
fetch_timeout_s = 2
allow_other = true
log_level = "debug"
""")

    config = load_config(path)

    assert config.store_url == "s3://bucket/prefix"
    assert config.s3_endpoint_url == "http://127.0.0.1:9000"
    assert config.mountpoint == "/mnt/lazyfs"
    assert config.ram_cache_bytes == 1048576
    assert config.disk_cache_bytes == 0
    assert config.fetch_timeout_s == 2.0
    assert type(config.fetch_timeout_s) is float
    assert config.allow_other is True
    assert config.log_level == "debug"
    assert config.fetch_concurrency == 16


def test_config_overrides_win(tmp_path: Path):
    path = write_config(tmp_path, 'mountpoint = "/mnt/a"\nram_cache_bytes = 10\n')

    config = load_config(path, {"mountpoint": "/mnt/b", "ram_cache_bytes": None})

    assert config.mountpoint == "/mnt/b"
    assert config.ram_cache_bytes == 10


def test_config_relative_paths_from_file_directory(tmp_path: Path):
    path = write_config(tmp_path, 'mountpoint = "mnt"\ndisk_cache_path = "cache/disk"\n')

    config = load_config(path)

    assert config.mountpoint == str(tmp_path.resolve() / "mnt")
    assert config.disk_cache_path == str(tmp_path.resolve() / "cache/disk")


def test_config_unknown_key_names_key_and_file(tmp_path: Path):
    path = write_config(tmp_path, 'ram_cache_size = 10\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value).startswith(f"{path}: unknown key 'ram_cache_size'")


def test_config_unknown_override_names_command_line():
    with pytest.raises(ConfigError, match="^the command line: unknown key 'colour'"):
        load_config(None, {"colour": "blue"})


@pytest.mark.parametrize("line, message", [
    ('ram_cache_bytes = "512MiB"', "key 'ram_cache_bytes' must be an integer, not str '512MiB'"),
    ("ram_cache_bytes = 1.5", "key 'ram_cache_bytes' must be an integer, not float 1.5"),
    ("ram_cache_bytes = true", "key 'ram_cache_bytes' must be an integer, not bool True"),
    ('fetch_timeout_s = "30"', "key 'fetch_timeout_s' must be a number, not str '30'"),
    ("fetch_timeout_s = false", "key 'fetch_timeout_s' must be a number, not bool False"),
    ("allow_other = 1", "key 'allow_other' must be true or false, not int 1"),
    ("store_url = 5", "key 'store_url' must be a string, not int 5"),
    ("mountpoint = []", "key 'mountpoint' must be a string, not list []"),
    ("s3_endpoint_url = 1", "key 's3_endpoint_url' must be a string, not int 1"),
])
def test_config_wrong_type(tmp_path: Path, line: str, message: str):
    path = write_config(tmp_path, line + "\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize("line, message", [
    ("ram_cache_bytes = -1", "key 'ram_cache_bytes' must be >= 0, not -1"),
    ("disk_cache_bytes = -5", "key 'disk_cache_bytes' must be >= 0, not -5"),
    ("disk_cache_map_bytes = 4096", "key 'disk_cache_map_bytes' must be at least 1048576 (1 MiB), not 4096"),
    ("fetch_concurrency = 0", "key 'fetch_concurrency' must be >= 1, not 0"),
    ("store_max_attempts = 0", "key 'store_max_attempts' must be >= 1, not 0"),
    ("fuse_max_tasks = -2", "key 'fuse_max_tasks' must be >= 1, not -2"),
    ("readahead_chunks = -1", "key 'readahead_chunks' must be >= 0, not -1"),
    ("fill_queue_chunks = -1", "key 'fill_queue_chunks' must be >= 0, not -1"),
    ("prefetch_concurrency = 0", "key 'prefetch_concurrency' must be >= 1, not 0"),
    ("prefetch_concurrency = 16", "key 'prefetch_concurrency' must be less than fetch_concurrency, not 16"),
    ("fetch_timeout_s = 0", "key 'fetch_timeout_s' must be > 0, not 0.0"),
    ("store_read_timeout_s = -1.5", "key 'store_read_timeout_s' must be > 0, not -1.5"),
    ("fetch_timeout_s = nan", "key 'fetch_timeout_s' must be > 0, not nan"),
    ('log_level = "verbose"', "key 'log_level' must be one of debug, info, warning, error, not 'verbose'"),
    ('store_url = "http://example.invalid/x"',
     "key 'store_url' must be file:///DIR or s3://BUCKET/PREFIX, not 'http://example.invalid/x'"),
    ('store_url = "s3:///prefix"', "key 'store_url' must name a bucket (s3://BUCKET/PREFIX), not 's3:///prefix'"),
    ('store_url = "file://host/dir"', "key 'store_url' must be file:///ABSOLUTE/PATH, not 'file://host/dir'"),
    ('s3_endpoint_url = "127.0.0.1:9000"',
     "key 's3_endpoint_url' must be an http:// or https:// URL, not '127.0.0.1:9000'"),
    ('control_socket = "/' + "s" * 120 + '"', "key 'control_socket' must be at most 107 bytes long"),
])
def test_config_invalid_value(tmp_path: Path, line: str, message: str):
    path = write_config(tmp_path, line + "\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value).startswith(f"{path}: {message}")


def test_config_relative_override_rejected():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"mountpoint": "relative/mnt"})

    assert str(caught.value) == ("the command line: key 'mountpoint' must be an absolute path, "
                                 "not 'relative/mnt'")


def test_config_invalid_override_blamed_not_file(tmp_path: Path):
    path = write_config(tmp_path, "ram_cache_bytes = 10\n")

    with pytest.raises(ConfigError, match="^the command line: key 'fetch_concurrency'"):
        load_config(path, {"fetch_concurrency": 0})


def test_config_invalid_toml(tmp_path: Path):
    path = write_config(tmp_path, "ram_cache_bytes = \n")

    with pytest.raises(ConfigError, match=f"^{path}: invalid TOML: "):
        load_config(path)


def test_config_missing_file(tmp_path: Path):
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == f"{path}: configuration file not found"


def test_config_table_rejected(tmp_path: Path):
    path = write_config(tmp_path, "[daemon]\nram_cache_bytes = 1\n")

    with pytest.raises(ConfigError, match=f"^{path}: unknown key 'daemon'"):
        load_config(path)


def test_config_direct_construction_validates():
    with pytest.raises(ConfigError, match="key 'fetch_concurrency' must be >= 1, not 0"):
        DaemonConfig(fetch_concurrency=0)


def test_config_dict_round_trip():
    config = DaemonConfig(store_url="s3://bucket", ram_cache_bytes=3, allow_other=True)

    assert from_dict(to_dict(config), "a test") == config


def test_config_from_dict_names_source():
    with pytest.raises(ConfigError) as caught:
        from_dict({"ram_cache_bytes": -3}, "the parent process")

    assert str(caught.value) == "the parent process: key 'ram_cache_bytes' must be >= 0, not -3"
