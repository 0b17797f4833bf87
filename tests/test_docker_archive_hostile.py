"""Hostile and damaged ``docker save`` archives given to ``lazyfs-index``.

Every bad archive must end the run with exit code 3 (invalid image) or 4
(source failed) and one line on stderr that names the archive, and must leave
nothing under ``indexes/`` or ``refs/`` in the store. Archives are built here:
``oci.tar_bytes`` writes the members, a few headers are written byte by byte,
and GNU tar writes the sparse and hard-link members. Inputs that could make the
indexer loop or block (negative sizes, a FIFO) run it in a child process with a
time limit.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lazyfs.indexer.docker_archive import DockerArchiveSource
from lazyfs.indexer.errors import ImageError
from lazyfs.store import open_store
from tests.support import oci
from tests.support.oci import directory, file, symlink

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# Indexing these small archives takes about 0.1 s on 2 cores, so a child
# indexer still running after this limit is looping or blocked.
HANG_LIMIT_S = 10

LAYER = oci.tar_bytes([directory("etc"), file("etc/hello", b"hello\n")])
CONFIG_NAME = "config.json"
LAYER_NAME = "base/layer.tar"
TRUNCATED = "the archive is truncated or damaged ("
TRUNCATED_END = "); write it again with docker save\n"


def config_bytes(*layers: bytes) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [oci.digest_of(layer) for layer in layers]}},
                      sort_keys=True).encode()


def manifest_bytes(config: object = CONFIG_NAME, layers: object = (LAYER_NAME,),
                   tags: object = ("team/app:v1",)) -> bytes:
    return json.dumps([{"Config": config, "Layers": list(layers) if isinstance(layers, tuple) else layers,
                        "RepoTags": list(tags) if isinstance(tags, tuple) else tags}]).encode()


def image_members(layer: bytes = LAYER, layer_name: str = LAYER_NAME) -> list[oci.Entry]:
    return [file(CONFIG_NAME, config_bytes(layer)), file(layer_name, layer)]


def write(path: Path, members: list[oci.Entry], manifest: bytes | None = None) -> Path:
    """Write ``members`` and then a manifest.json (the default one unless ``manifest`` is given)."""
    path.write_bytes(oci.tar_bytes(members + [file("manifest.json", manifest or manifest_bytes())]))
    return path


def write_around(path: Path, middle: bytes, manifest: bool = True) -> Path:
    """Write the config and layer members, then the raw bytes ``middle``, then manifest.json."""
    head = oci.without_end_marker(oci.tar_bytes(image_members()))
    tail = oci.tar_bytes([file("manifest.json", manifest_bytes())]) if manifest else b""
    path.write_bytes(head + middle + tail)
    return path


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytearray:
    """Return one GNU-format header block, for the caller to damage and then checksum."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return bytearray(info.tobuf(tarfile.GNU_FORMAT))


def checksummed(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_entry(name: str, records: dict[str, str], data: bytes = b"") -> bytes:
    """Return a PAX extended header with ``records``, the entry's header and its padded data."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = records
    padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return info.tobuf(tarfile.PAX_FORMAT) + data + padding


def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def index(tmp_path: Path, archive: Path | str, *extra: str) -> oci.IndexerRun:
    return oci.run_indexer("--store", store_url(tmp_path), "--json", *extra, f"docker-archive:{archive}")


def index_in_child(tmp_path: Path, archive: Path | str) -> tuple[int, str]:
    """Run ``lazyfs-index`` on ``archive`` in a child process; fail the test if it runs too long."""
    command = [sys.executable, "-m", "lazyfs.indexer.cli", "--store", store_url(tmp_path), "--quiet",
               f"docker-archive:{archive}"]
    try:
        completed = subprocess.run(command, cwd=REPOSITORY_ROOT, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lazyfs-index still ran after {HANG_LIMIT_S} s on {archive}")
    return completed.returncode, completed.stderr


def published(tmp_path: Path) -> list[str]:
    store = open_store(store_url(tmp_path))
    return store.list("indexes/") + store.list("refs/")


def error_line(archive: Path | str) -> str:
    return f"lazyfs-index: error: docker-archive:{archive}: "


def assert_rejected(tmp_path: Path, code: int, stderr: str, archive: Path | str, expected_code: int = 3) -> None:
    assert code == expected_code, (stderr, published(tmp_path))
    assert stderr.startswith(error_line(archive)), stderr
    assert stderr.endswith("\n"), stderr
    assert stderr.count("\n") == 1, stderr
    assert published(tmp_path) == []


def gnu_tar_or_skip() -> None:
    if shutil.which("tar") is None or b"GNU tar" not in subprocess.run(
            ["tar", "--version"], capture_output=True).stdout:
        pytest.skip("GNU tar is missing")


# Damaged headers in the middle of the archive. tarfile raises on a bad first
# header but silently ends its member list at a bad later one, so manifest.json,
# which follows, goes missing unless the source checks every header.
DAMAGED_HEADERS = {
    "bad checksum": bytes(header("evil")[:148]) + b"0000000\0" + bytes(header("evil")[156:]),
    "garbage block": b"\x01" * tarfile.BLOCKSIZE,
    "PAX size not a number": pax_entry("evil", {"size": "abc"}, b"x" * 600),
}


@pytest.mark.parametrize("middle", DAMAGED_HEADERS.values(), ids=DAMAGED_HEADERS.keys())
def test_damaged_header_reported_as_damage(tmp_path, middle):
    archive = write_around(tmp_path / "image.tar", middle)

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr.startswith(error_line(archive) + TRUNCATED), run.stderr
    assert run.stderr.endswith(TRUNCATED_END)


def test_cut_inside_header_reported_as_damage(tmp_path):
    whole = write(tmp_path / "whole.tar", image_members())
    with tarfile.open(whole) as tar:
        manifest_header = tar.getmember("manifest.json").offset
    archive = tmp_path / "image.tar"
    archive.write_bytes(whole.read_bytes()[:manifest_header + 100])

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr.startswith(error_line(archive) + TRUNCATED), run.stderr


def _negative_base256_size() -> bytes:
    block = header("evil")
    # A size of -512 makes tarfile step back onto this same header.
    block[124:136] = (-512).to_bytes(12, "big", signed=True)
    return checksummed(block)


# The PAX header block, its data block and the entry's header take 1536 bytes,
# so a size of -1536 sends tarfile back to the PAX header.
NEGATIVE_SIZES = {
    "base-256 size -512": _negative_base256_size(),
    "PAX size -1536": pax_entry("evil", {"size": "-1536"}),
}


@pytest.mark.parametrize("middle", NEGATIVE_SIZES.values(), ids=NEGATIVE_SIZES.keys())
def test_negative_size_does_not_hang(tmp_path, middle):
    archive = write_around(tmp_path / "image.tar", middle)

    code, stderr = index_in_child(tmp_path, archive)

    assert_rejected(tmp_path, code, stderr, archive)
    assert stderr.startswith(error_line(archive) + TRUNCATED), stderr


def _long_name_chain(count: int) -> bytes:
    block = header("././@LongLink", size=6, kind=tarfile.GNUTYPE_LONGNAME)
    return (checksummed(block) + b"name1\0".ljust(tarfile.BLOCKSIZE, b"\0")) * count + bytes(header("x"))


def _pax_chain(count: int) -> bytes:
    block = header("././@PaxHeader", size=12, kind=tarfile.XHDTYPE)
    return (checksummed(block) + b"12 path=abc\n".ljust(tarfile.BLOCKSIZE, b"\0")) * count + bytes(header("x"))


def _gnu_sparse_without_extension_block() -> bytes:
    block = header("evil", kind=tarfile.GNUTYPE_SPARSE)
    block[482] = 1  # isextended: a sparse extension block follows, but the archive ends
    return checksummed(block)


SPARSE_1_0 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "evil",
              "GNU.sparse.realsize": "10"}
# (raw bytes, whether manifest.json follows them)
MALFORMED_HEADERS = {
    "PAX 0.1 sparse map not numbers": (
        pax_entry("evil", {"GNU.sparse.map": "a,b", "GNU.sparse.size": "10", "GNU.sparse.numblocks": "1"},
                  b"x" * 10), True),
    "PAX 1.0 sparse map not numbers": (pax_entry("evil", SPARSE_1_0, b"zz\nq\n".ljust(512, b"\0")), True),
    "PAX 1.0 sparse map without newline": (pax_entry("evil", SPARSE_1_0) + b"9" * 512, False),
    "GNU sparse extension block missing": (_gnu_sparse_without_extension_block(), False),
    "3000 GNU long name headers": (_long_name_chain(3000), True),
    "3000 PAX headers": (_pax_chain(3000), True),
}


@pytest.mark.parametrize("middle, manifest", MALFORMED_HEADERS.values(), ids=MALFORMED_HEADERS.keys())
def test_malformed_extension_header_is_image_error(tmp_path, middle, manifest):
    archive = write_around(tmp_path / "image.tar", middle, manifest=manifest)

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr.startswith(error_line(archive) + TRUNCATED), run.stderr


@pytest.mark.parametrize("tags, reference", [
    ("team/app:v1", None),
    ("xteam/app:v1y", "team/app:v1"),
    ({"team/app:v1": 1}, None),
    (["team/app:v1", 5], None),
], ids=["string", "string containing the reference", "object", "list with a number"])
def test_repo_tags_must_be_list_of_strings(tmp_path, tags, reference):
    archive = write(tmp_path / "image.tar", image_members(), manifest_bytes(tags=tags))
    source = f"{archive}:{reference}" if reference else archive

    run = index(tmp_path, source)

    assert_rejected(tmp_path, run.code, run.stderr, source)
    assert run.stderr.startswith(error_line(source) + "manifest.json: RepoTags "), run.stderr


@pytest.mark.parametrize("tag", ["team/app:v1\n", "..", "a" * 513],
                         ids=["control character", "dot dot", "513 characters"])
def test_invalid_repo_tag_publishes_nothing(tmp_path, tag):
    archive = write(tmp_path / "image.tar", image_members(), manifest_bytes(tags=[tag]))

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert "invalid image name" in run.stderr


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "image.tar")
    return tmp_path / "image.tar"


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "image.tar").mkdir()
    return tmp_path / "image.tar"


@pytest.mark.parametrize("make_path", [_fifo, lambda _tmp_path: Path("/dev/zero"), _directory],
                         ids=["fifo", "/dev/zero", "directory"])
def test_archive_not_regular_file(tmp_path, make_path):
    path = make_path(tmp_path)

    code, stderr = index_in_child(tmp_path, path)

    assert_rejected(tmp_path, code, stderr, path, expected_code=4)
    assert "not a regular file" in stderr


@pytest.mark.parametrize("config_last", [False, True], ids=["manifest.json", "config"])
def test_archive_cut_while_documents_read(tmp_path, config_last):
    layer = file(LAYER_NAME, LAYER)
    config = file(CONFIG_NAME, config_bytes(LAYER))
    manifest = file("manifest.json", manifest_bytes())
    members = [layer, manifest, config] if config_last else [config, layer, manifest]
    archive = tmp_path / "image.tar"
    archive.write_bytes(oci.tar_bytes(members))
    cut_member = CONFIG_NAME if config_last else "manifest.json"
    with tarfile.open(archive) as tar:
        cut = tar.getmember(cut_member).offset_data + 10
    source = DockerArchiveSource(str(archive), None)
    try:
        os.truncate(archive, cut)

        with pytest.raises(ImageError) as raised:
            source.resolve()
    finally:
        source.close()

    assert str(raised.value) == (f"docker-archive:{archive}: the archive ends inside member {cut_member!r}; "
                                 "was it truncated while it was read?")


def test_config_blob_name_must_match_digest(tmp_path):
    config = config_bytes(LAYER)
    named = "blobs/sha256/" + "b" * 64
    archive = write(tmp_path / "image.tar", [file(named, config), file(LAYER_NAME, LAYER)],
                    manifest_bytes(config=named))

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert "sha256:" + "b" * 64 in run.stderr
    assert oci.digest_of(config) in run.stderr


_GZIP_LAYER = gzip.compress(LAYER, mtime=0)
# (member name, member bytes, bytes whose digest the config lists as diff_id, text of the message)
LAYER_FAILURES = {
    "blob name not its digest": ("blobs/sha256/" + "a" * 64, LAYER, LAYER, "content has digest"),
    "gzip stream cut short": (LAYER_NAME, _GZIP_LAYER[:len(_GZIP_LAYER) // 2], LAYER, "invalid gzip data"),
    "empty layer file": (LAYER_NAME, b"", b"", "the layer blob is empty"),
}


@pytest.mark.parametrize("name, data, content, problem", LAYER_FAILURES.values(), ids=LAYER_FAILURES.keys())
def test_layer_error_names_archive(tmp_path, name, data, content, problem):
    archive = write(tmp_path / "image.tar", [file(CONFIG_NAME, config_bytes(content)), file(name, data)],
                    manifest_bytes(layers=[name]))

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert problem in run.stderr


# Hostile archives that the source rejects with the expected message, or reads correctly.

def _member_cuts() -> dict[str, tuple[str, int]]:
    """Cut points (member, bytes into its data), inside the data or the padding of each member."""
    return {"in config data": (CONFIG_NAME, 40), "in config padding": (CONFIG_NAME, len(config_bytes(LAYER)) + 10),
            "in layer data": (LAYER_NAME, 700), "in manifest data": ("manifest.json", 30)}


@pytest.mark.parametrize("member, into", _member_cuts().values(), ids=_member_cuts().keys())
def test_cut_inside_member_data(tmp_path, member, into):
    whole = write(tmp_path / "whole.tar", image_members())
    with tarfile.open(whole) as tar:
        cut = tar.getmember(member).offset_data + into
    archive = tmp_path / "image.tar"
    archive.write_bytes(whole.read_bytes()[:cut])

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == error_line(archive) + TRUNCATED + "unexpected end of data" + TRUNCATED_END


def test_cut_inside_first_header(tmp_path):
    whole = write(tmp_path / "whole.tar", image_members())
    archive = tmp_path / "image.tar"
    archive.write_bytes(whole.read_bytes()[:300])

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)


def test_declared_size_past_end_of_file(tmp_path):
    whole = write(tmp_path / "image.tar", image_members())
    data = bytearray(whole.read_bytes())
    with tarfile.open(whole) as tar:
        offset = tar.getmember(LAYER_NAME).offset
    block = bytearray(data[offset:offset + tarfile.BLOCKSIZE])
    block[124:136] = b"%011o\0" % (len(data) * 4)
    data[offset:offset + tarfile.BLOCKSIZE] = checksummed(block)
    whole.write_bytes(bytes(data))

    run = index(tmp_path, whole)

    assert_rejected(tmp_path, run.code, run.stderr, whole)
    assert run.stderr == error_line(whole) + TRUNCATED + "unexpected end of data" + TRUNCATED_END


@pytest.mark.parametrize("keep_blocks", [0, 1])
def test_cut_in_end_blocks_still_indexes(tmp_path, keep_blocks):
    whole = oci.tar_bytes(image_members() + [file("manifest.json", manifest_bytes())])
    archive = tmp_path / "image.tar"
    archive.write_bytes(whole[:oci.tar_end(whole) + keep_blocks * tarfile.BLOCKSIZE])

    run = index(tmp_path, archive)

    assert run.code == 0, run.stderr
    view = oci.TreeView(open_store(store_url(tmp_path)), run.result["manifest_digest"])
    assert view.read(b"etc/hello") == b"hello\n"


@pytest.mark.parametrize("options", [["--format=gnu", "--sparse"],
                                     ["--format=posix", "--sparse", "--sparse-version=0.1"],
                                     ["--format=posix", "--sparse", "--sparse-version=1.0"]],
                         ids=["GNU", "PAX 0.1", "PAX 1.0"])
def test_sparse_layer_member_rejected(tmp_path, options):
    gnu_tar_or_skip()
    save = tmp_path / "save"
    (save / "base").mkdir(parents=True)
    with open(save / LAYER_NAME, "wb") as stream:
        stream.write(LAYER)
        stream.truncate(1 << 20)  # zero blocks after a tar's end leave it valid
    layer = (save / LAYER_NAME).read_bytes()
    (save / CONFIG_NAME).write_bytes(config_bytes(layer))
    (save / "manifest.json").write_bytes(manifest_bytes())
    archive = tmp_path / "image.tar"
    archive.write_bytes(oci.gnu_tar(save, [CONFIG_NAME, LAYER_NAME, "manifest.json"], *options))
    with tarfile.open(archive) as tar:
        assert tar.getmember(LAYER_NAME).sparse is not None

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == (error_line(archive) + f"member {LAYER_NAME!r} is a sparse file, which a "
                          "docker-archive source does not read\n")


@pytest.mark.parametrize("linked", [LAYER_NAME, CONFIG_NAME], ids=["layer", "config"])
def test_hard_link_member_rejected(tmp_path, linked):
    gnu_tar_or_skip()
    save = tmp_path / "save"
    (save / "base").mkdir(parents=True)
    (save / LAYER_NAME).write_bytes(LAYER)
    (save / CONFIG_NAME).write_bytes(config_bytes(LAYER))
    alias = "other.json" if linked == CONFIG_NAME else "other/layer.tar"
    (save / alias).parent.mkdir(exist_ok=True)
    os.link(save / linked, save / alias)
    if linked == CONFIG_NAME:
        manifest, role = manifest_bytes(config=alias), "the config"
    else:
        manifest, role = manifest_bytes(layers=[alias]), f"layer {alias}"
    (save / "manifest.json").write_bytes(manifest)
    archive = tmp_path / "image.tar"
    archive.write_bytes(oci.gnu_tar(save, [CONFIG_NAME, LAYER_NAME, alias, "manifest.json"], "--format=gnu"))
    with tarfile.open(archive) as tar:
        assert tar.getmember(alias).islnk()

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == error_line(archive) + f"{role}: member {alias!r} is not a regular file\n"


# (symbolic links added to the archive, message after the archive's name); manifest.json names
# link/layer.tar as the layer.
LINKS = {
    "relative, outside": ([symlink("link/layer.tar", "../../../etc/passwd")],
                          "layer link/layer.tar: member '../../etc/passwd' is missing from the archive"),
    "absolute": ([symlink("link/layer.tar", "/etc/passwd")],
                 "layer link/layer.tar: member '/etc/passwd' is missing from the archive"),
    "at a directory": ([directory("somewhere"), symlink("link/layer.tar", "../somewhere")],
                       "layer link/layer.tar: member 'somewhere' is not a regular file"),
    "at itself": ([symlink("link/layer.tar", "layer.tar")],
                  "layer link/layer.tar: more than 8 links from member 'link/layer.tar'"),
    "in a loop": ([symlink("link/layer.tar", "../loop/layer.tar"), symlink("loop/layer.tar", "../link/layer.tar")],
                  "layer link/layer.tar: more than 8 links from member 'link/layer.tar'"),
}


@pytest.mark.parametrize("links, message", LINKS.values(), ids=LINKS.keys())
def test_bad_symlink_rejected(tmp_path, links, message):
    archive = write(tmp_path / "image.tar", image_members() + links, manifest_bytes(layers=["link/layer.tar"]))

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == error_line(archive) + message + "\n"


@pytest.mark.parametrize("config, layer, message", [
    ("/config.json", LAYER_NAME, "the config: member '/config.json' is missing from the archive"),
    ("../config.json", LAYER_NAME, "the config: member '../config.json' is missing from the archive"),
    (CONFIG_NAME, "/base/layer.tar", "layer /base/layer.tar: member '/base/layer.tar' is missing from the archive"),
    (CONFIG_NAME, "base/../base/layer.tar",
     "layer base/../base/layer.tar: member 'base/../base/layer.tar' is missing from the archive"),
], ids=["absolute config", "config above the root", "absolute layer", "layer through .."])
def test_manifest_path_outside_rejected(tmp_path, config, layer, message):
    archive = write(tmp_path / "image.tar", image_members(), manifest_bytes(config=config, layers=[layer]))

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == error_line(archive) + message + "\n"


def test_duplicate_manifest_last_wins(tmp_path):
    first = file("manifest.json", manifest_bytes(tags=["team/app:first"]))
    archive = write(tmp_path / "image.tar", image_members() + [first], manifest_bytes(tags=["team/app:last"]))

    run = index(tmp_path, archive)

    assert run.code == 0, run.stderr
    assert run.result["names"] == ["team/app:last"]


@pytest.mark.parametrize("last_good", [True, False], ids=["good layer last", "bad layer last"])
def test_duplicate_layer_last_wins(tmp_path, last_good):
    good, bad = file(LAYER_NAME, LAYER), file(LAYER_NAME, oci.tar_bytes([file("other", b"x")]))
    members = [file(CONFIG_NAME, config_bytes(LAYER))] + ([bad, good] if last_good else [good, bad])
    archive = write(tmp_path / "image.tar", members)

    run = index(tmp_path, archive)

    if last_good:
        assert run.code == 0, run.stderr
        view = oci.TreeView(open_store(store_url(tmp_path)), run.result["manifest_digest"])
        assert view.paths() == {b"etc", b"etc/hello"}
    else:
        assert run.code == 3
        assert f"not {oci.digest_of(LAYER)}" in run.stderr
        assert published(tmp_path) == []


def test_oversized_manifest_rejected(tmp_path):
    manifest = json.dumps([{"Config": CONFIG_NAME, "Layers": [LAYER_NAME], "Padding": "x" * (4 << 20)}]).encode()
    archive = write(tmp_path / "image.tar", image_members(), manifest)

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == (error_line(archive) + f"manifest.json (manifest.json) is {len(manifest)} bytes, "
                          f"more than the {4 << 20} allowed\n")


def test_oversized_config_rejected(tmp_path):
    config = json.dumps({"architecture": "amd64", "os": "linux", "padding": "x" * (16 << 20),
                         "rootfs": {"type": "layers", "diff_ids": [oci.digest_of(LAYER)]}}).encode()
    archive = write(tmp_path / "image.tar", [file(CONFIG_NAME, config), file(LAYER_NAME, LAYER)])

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == (error_line(archive) + f"the image config ({CONFIG_NAME}) is {len(config)} bytes, "
                          f"more than the {16 << 20} allowed\n")


def test_deeply_nested_manifest_rejected(tmp_path):
    archive = write(tmp_path / "image.tar", image_members(), b"[" * 100_000 + b"]" * 100_000)

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr.startswith(error_line(archive) + "manifest.json: invalid JSON: "), run.stderr


def test_archive_cut_while_layer_read(tmp_path, monkeypatch):
    archive = write(tmp_path / "image.tar", image_members())
    with tarfile.open(archive) as tar:
        cut = tar.getmember(LAYER_NAME).offset_data + 100
    resolve = DockerArchiveSource.resolve

    def resolve_then_truncate(source):
        root = resolve(source)
        os.truncate(source.path, cut)
        return root

    monkeypatch.setattr(DockerArchiveSource, "resolve", resolve_then_truncate)

    run = index(tmp_path, archive)

    assert_rejected(tmp_path, run.code, run.stderr, archive)
    assert run.stderr == (error_line(archive) + f"the archive ends inside member {LAYER_NAME!r}; was it "
                          "truncated while it was read?\n")


def test_archive_replaced_while_read_indexes_original(tmp_path, monkeypatch):
    archive = write(tmp_path / "image.tar", image_members())
    other = tmp_path / "other.tar"
    other_layer = oci.tar_bytes([file("other", b"other\n")])
    write(other, image_members(other_layer))
    resolve = DockerArchiveSource.resolve

    def replace_then_resolve(source):
        os.replace(other, source.path)
        return resolve(source)

    monkeypatch.setattr(DockerArchiveSource, "resolve", replace_then_resolve)

    run = index(tmp_path, archive)

    assert run.code == 0, run.stderr
    view = oci.TreeView(open_store(store_url(tmp_path)), run.result["manifest_digest"])
    assert view.paths() == {b"etc", b"etc/hello"}


def test_repo_tags_null_publishes_no_name(tmp_path):
    # docker save writes "RepoTags": null for an image saved by its ID.
    archive = write(tmp_path / "image.tar", image_members(), manifest_bytes(tags=None))

    run = index(tmp_path, archive)

    assert run.code == 0, run.stderr
    assert run.result["names"] == []
    assert open_store(store_url(tmp_path)).list("refs/names/") == []
