"""The host id range of containers and the runtime spec of a user namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.errors import LazyfsError
from lazyfs.notebook.imageuser import ProcessUser
from lazyfs.notebook.runtime_spec import runtime_spec
from lazyfs.notebook.userns import DEFAULT_BASE, IdRange, check_searchable, host_id_range
from tests.support.containers import searchable_directory


def write_ids(tmp_path: Path, subuid: str | None, subgid: str | None) -> tuple[Path, Path]:
    paths = tmp_path / "subuid", tmp_path / "subgid"
    for path, text in zip(paths, (subuid, subgid)):
        if text is not None:
            path.write_text(text)
    return paths


@pytest.mark.parametrize("subuid, subgid, expected", [
    (None, None, IdRange(DEFAULT_BASE, DEFAULT_BASE)),
    ("alice:100000:65536\n", "alice:100000:65536\n", IdRange(DEFAULT_BASE, DEFAULT_BASE)),
    ("alice:100000:65536\nroot:1000000:65536\n", "root:2000000:131072\n", IdRange(1000000, 2000000)),
    ("0:300000:65536\n", "0:400000:65536\n", IdRange(300000, 400000)),
    ("root:300000:65536\n", None, IdRange(DEFAULT_BASE, DEFAULT_BASE)),
])
def test_host_id_range_choice(tmp_path: Path, subuid, subgid, expected):
    assert host_id_range(None, *write_ids(tmp_path, subuid, subgid)) == expected


def test_host_id_range_base_overrides_files(tmp_path: Path):
    paths = write_ids(tmp_path, "root:300000:65536\n", "root:300000:65536\n")

    assert host_id_range(500000, *paths) == IdRange(500000, 500000)


@pytest.mark.parametrize("subuid, message", [
    ("root:300000:1000\n", "the root entry of .*subuid has 1000 ids, but containers need 65536"),
    ("root:x:65536\n", r"invalid entry 'root:x:65536' in .*subuid: expected root:FIRST:COUNT"),
])
def test_host_id_range_invalid_root_entry(tmp_path: Path, subuid: str, message: str):
    paths = write_ids(tmp_path, subuid, "root:300000:65536\n")

    with pytest.raises(LazyfsError, match=message):
        host_id_range(None, *paths)


@pytest.mark.parametrize("base", [0, -1, 2**32 - 65536])
def test_id_range_invalid_base(base: int):
    with pytest.raises(LazyfsError, match=f"invalid user namespace uid base {base}"):
        IdRange(base, DEFAULT_BASE)


def test_id_range_shift_and_mappings():
    ids = IdRange(100000, 200000)

    assert ids.shift == "100000:200000:65536"
    assert ids.mappings() == {
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}],
    }


def test_runtime_spec_user_namespace(tmp_path: Path):
    spec = runtime_spec(tmp_path, ["true"], [], "/", ProcessUser(0, 0), "host", id_range=IdRange(100000, 100000))
    plain = runtime_spec(tmp_path, ["true"], [], "/", ProcessUser(0, 0), "host")

    assert [entry["type"] for entry in spec["linux"]["namespaces"]] == [
        "pid", "network", "ipc", "uts", "mount", "user"]
    assert spec["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert spec["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert [entry["type"] for entry in plain["linux"]["namespaces"]] == ["pid", "network", "ipc", "uts", "mount"]
    assert "uidMappings" not in plain["linux"]
    assert {key: value for key, value in spec.items() if key != "linux"} == {
        key: value for key, value in plain.items() if key != "linux"}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another owner needs root")
def test_check_searchable():
    with searchable_directory(prefix="lazyfs-search-") as directory:
        open_directory = directory / "open"
        owned = open_directory / "owned"
        closed = owned / "closed"
        closed.mkdir(parents=True)
        os.chmod(open_directory, 0o701)
        os.chmod(owned, 0o700)
        os.chown(owned, 100000, 100000)
        os.chmod(closed, 0o770)

        check_searchable(owned / "below", 100000, 100000)
        with pytest.raises(LazyfsError, match=f"{owned} is not searchable by host uid 100001"):
            check_searchable(owned / "below", 100001, 100001)
        with pytest.raises(LazyfsError, match=f"{closed} is not searchable by host uid 100000"):
            check_searchable(closed / "below", 100000, 100000)


@pytest.mark.parametrize("arguments, message", [
    (("--no-userns", "--userns-base", "200000"), "--userns-base and --no-userns exclude each other"),
    (("--userns-base", "0"), "invalid --userns-base 0: expected 1 to 4294901759"),
    (("--userns-base", "4294901760"), "invalid --userns-base 4294901760: expected 1 to 4294901759"),
])
def test_run_rejects_bad_userns_arguments(arguments, message):
    process = subprocess.run([sys.executable, "-m", "lazyfs.notebook.run", *arguments, "image", "true"],
                             capture_output=True, text=True, timeout=60)

    assert process.returncode == 2
    assert process.stderr.endswith(f"lazyfs-run: error: {message}\n")
