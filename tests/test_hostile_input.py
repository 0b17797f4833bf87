"""Hostile and broken images: each is rejected with one error line and its exit code.

Every case runs the ``lazyfs-index`` command as a subprocess with a fresh
TMPDIR and HOME and a working directory in an empty directory tree, and checks:

- the exact exit code of the failure's class, an empty stdout and a single
  error line that names the image, the layer digest and the tar entry where
  there is one;
- nothing under ``refs/`` or ``indexes/`` of the store;
- nothing created, changed or removed outside TMPDIR and the store: the test
  directory (layout, working tree, HOME, traversal targets) is compared file
  by file before and after;
- the peak RSS of the subprocess stays below ``BOMB_RSS_BYTES`` for the
  cases built to exhaust memory. It is the indexer process's own VmHWM, which
  it writes at exit: ``ru_maxrss`` from ``os.wait4`` would include the RSS
  that the child inherited from this large pytest process when it forked.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zstandard

from tests.support import oci
from tests.support.net import LOOPBACK
from tests.support.oci import Layer, directory, file, hardlink, symlink

# Runs the indexer's main in a fresh interpreter and, at exit, writes the
# process's peak RSS in KiB (VmHWM, counted from the exec on) to the file
# named by its first argument.
INDEXER_WITH_PEAK = """
import atexit, sys
from pathlib import Path

report = Path(sys.argv.pop(1))

def write_peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            report.write_text(line.split()[1])

atexit.register(write_peak)
sys.argv[0] = "lazyfs-index"
from lazyfs.indexer.cli import main
sys.exit(main())
"""
RUN_TIMEOUT_S = 60.0
# lazyfs-index peaks at about 35 MiB when it rejects a header and about 100 MiB
# when it streams a layer. A 1 GiB long name read whole takes 2 GiB.
BOMB_RSS_BYTES = 256 << 20
GIB = 1 << 30


@dataclass
class Sandbox:
    """The directories of one case. Everything under ``root`` except ``tmpdir`` and ``store`` must stay unchanged."""

    root: Path
    layout: Path
    store: Path
    tmpdir: Path
    work: Path
    home: Path
    output: Path

    @property
    def store_url(self) -> str:
        return self.store.as_uri()


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    peak_rss_bytes: int

    @property
    def line(self) -> str:
        return self.stderr.splitlines()[0] if self.stderr else ""


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    box = Sandbox(root=tmp_path, layout=tmp_path / "layout", store=tmp_path / "store",
                  tmpdir=tmp_path / "tmp", work=tmp_path / "work" / "a" / "b", home=tmp_path / "home",
                  output=tmp_path / "output")
    for path in (box.tmpdir, box.work, box.home, box.output, tmp_path / "target-dir"):
        path.mkdir(parents=True)
    return box


def snapshot(box: Sandbox) -> dict[str, tuple]:
    """Return every path under the sandbox root except TMPDIR, the store and the output files."""
    skipped = {box.tmpdir, box.store, box.output}
    entries = {}
    for directory_path, directories, files in os.walk(box.root):
        directories[:] = [name for name in directories if Path(directory_path, name) not in skipped]
        for name in directories + files:
            path = Path(directory_path, name)
            status = path.lstat()
            content = os.readlink(path) if path.is_symlink() else (
                hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
            entries[str(path.relative_to(box.root))] = (status.st_mode, status.st_size,
                                                        status.st_mtime_ns, content)
    return entries


def run_indexer(box: Sandbox, *args: str, store_url: str | None = None) -> Run:
    """Run ``lazyfs-index --store STORE ARGS`` in the sandbox; check it changed nothing outside it."""
    before = snapshot(box)
    env = dict(os.environ, TMPDIR=str(box.tmpdir), HOME=str(box.home),
               DOCKER_CONFIG=str(box.home / ".docker"))
    stdout_path, stderr_path = box.output / "stdout", box.output / "stderr"
    peak_path = box.output / "peak-rss-kib"
    peak_path.unlink(missing_ok=True)
    command = [sys.executable, "-c", INDEXER_WITH_PEAK, str(peak_path),
               "--store", store_url or box.store_url, *args]
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, cwd=box.work, env=env, stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=stderr)
    watchdog = threading.Timer(RUN_TIMEOUT_S, process.kill)
    watchdog.start()
    try:
        process.wait()
    finally:
        watchdog.cancel()
    run = Run(process.returncode, stdout_path.read_text(), stderr_path.read_text(),
              int(peak_path.read_text()) * 1024)

    assert snapshot(box) == before, "the indexer changed files outside TMPDIR and the store"
    assert list(box.work.iterdir()) == []
    assert list(box.home.iterdir()) == []
    return run


def assert_rejected(box: Sandbox, run: Run, code: int, *fragments: str) -> None:
    """Check the exit code, the one error line and its fragments, and an unpublished store."""
    assert run.code == code, run.stderr
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.line.startswith("lazyfs-index: error: ")
    for fragment in fragments:
        assert fragment in run.line
    assert not (box.store / "refs").exists()
    assert not (box.store / "indexes").exists()


def assert_tar_entry_rejected(box: Sandbox, image: oci.Image, run: Run, layer: int, entry: str | None,
                             message: str) -> None:
    """Check a rejection with exit code 3 that names the image, the layer and the entry."""
    fragments = [f"{image.source} layer {image.layer_digests[layer]}: ", message]
    if entry is not None:
        fragments.append(f"entry {entry!r}")
    assert_rejected(box, run, 3, *fragments)


# -- tar building blocks --------------------------------------------------------------


def number_field(value: int, width: int) -> bytes:
    """Encode a tar number field: octal when it fits, else GNU base-256 (two's complement)."""
    if 0 <= value < 8 ** (width - 1):
        return f"{value:0{width - 1}o}".encode() + b"\0"
    prefix = b"\xff" if value < 0 else b"\x80"
    return prefix + (value % 256 ** (width - 1)).to_bytes(width - 1, "big")


def raw_header(name: str, typeflag: bytes, size: int = 0, devmajor: int = 0, devminor: int = 0,
               checksum_delta: int = 0) -> bytes:
    """Return one ustar header block with exactly these fields, bypassing tarfile's own checks."""
    block = bytearray(tarfile.BLOCKSIZE)
    encoded = name.encode()
    block[0:len(encoded)] = encoded
    block[100:108] = number_field(0o644, 8)
    block[108:116] = number_field(0, 8)
    block[116:124] = number_field(0, 8)
    block[124:136] = number_field(size, 12)
    block[136:148] = number_field(0, 12)
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[329:337] = number_field(devmajor, 8)
    block[337:345] = number_field(devminor, 8)
    block[148:156] = b" " * 8
    checksum = sum(block) + checksum_delta
    block[148:156] = f"{checksum:06o}".encode() + b"\0 "
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def pax_records(records: dict[str, str]) -> bytes:
    """Encode PAX records, each "LENGTH KEY=VALUE\\n" where LENGTH counts the whole record."""
    encoded = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + len(str(len(body)))
        if len(str(length)) + len(body) != length:
            length += 1
        encoded += str(length).encode() + body
    return encoded


def pax_entry(records: dict[str, str], name: str = "f", data: bytes = b"data") -> bytes:
    """A PAX extended header with ``records``, then a regular file entry."""
    extension = pax_records(records)
    return (raw_header("././@PaxHeader", tarfile.XHDTYPE, len(extension)) + padded(extension)
            + raw_header(name, tarfile.REGTYPE, len(data)) + padded(data))


END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


def zstd_layer_with_filler(prefix: bytes, filler_bytes: int, filler: bytes = b"a") -> Layer:
    """A zstd layer: ``prefix``, then ``filler_bytes`` of one repeated byte, streamed.

    1 GiB of filler compresses to about 32 KB, so the blob stays tiny while
    the tar declares or contains a gigabyte.
    """
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    digest = hashlib.sha256(prefix)
    pieces = [compressor.compress(prefix)]
    block = filler * (1 << 20)
    remaining = filler_bytes
    while remaining:
        piece = block[:min(remaining, len(block))]
        pieces.append(compressor.compress(piece))
        digest.update(piece)
        remaining -= len(piece)
    pieces.append(compressor.flush())
    return Layer(tar=b"", compression="zstd", blob=b"".join(pieces), diff_id="sha256:" + digest.hexdigest())


# -- layout editing ---------------------------------------------------------------------


def retag_manifest(image: oci.Image, tag: str, edit, manifest_media_type: str = oci.OCI_MANIFEST) -> str:
    """Write an edited copy of the image's manifest under ``tag``; return its source argument."""
    manifest = json.loads(image.blob_path(image.manifest_digest).read_bytes())
    edit(manifest)
    data = json.dumps(manifest).encode()
    oci.add_to_index(image.layout, {"mediaType": manifest_media_type,
                                    "digest": oci.write_blob(image.layout, data), "size": len(data)}, tag)
    return f"oci:{image.layout}:{tag}"


SIMPLE = [directory("etc"), file("etc/hostname", b"lazyfs\n")]


# -- path traversal -----------------------------------------------------------------------


def test_dotdot_name(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE + [file("../escape", b"x")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "../escape", "the name contains a '..' component")
    assert not (sandbox.root / "escape").exists()
    assert not (sandbox.work.parent / "escape").exists()


def test_absolute_name(sandbox):
    target = sandbox.root / "absolute-escape"
    image = oci.write_image(sandbox.layout, [Layer([file(str(target), b"x")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, str(target), "the name is an absolute path")
    assert not target.exists()


def test_symlink_parent_in_same_layer(sandbox):
    target = sandbox.root / "target-dir"
    image = oci.write_image(sandbox.layout, [Layer([symlink("link", str(target)), file("link/pwned", b"x")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "link/pwned", "leads through the symlink 'link'")
    assert list(target.iterdir()) == []


def test_symlink_parent_across_layers(sandbox):
    target = sandbox.root / "target-dir"
    image = oci.write_image(sandbox.layout, [Layer([symlink("link", str(target))]),
                                             Layer([file("link/pwned", b"x")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 1, "link/pwned", "leads through the symlink 'link'")
    assert list(target.iterdir()) == []


def test_hardlink_outside_image(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE + [hardlink("h", "../../etc/passwd")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "h",
                             "hardlink target '../../etc/passwd' contains a '..' component")


def test_hardlink_absolute_target(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE + [hardlink("h", "/etc/shadow")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "h", "hardlink target '/etc/shadow' is an absolute path")


def test_hardlink_missing_target(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE + [hardlink("h", "etc/missing")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "h", "hardlink target 'etc/missing' does not exist")


def test_hardlink_through_symlink_parent(sandbox):
    image = oci.write_image(sandbox.layout, [Layer([symlink("link", "/etc")]),
                                             Layer([hardlink("h", "link/passwd")])])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 1, "h", "hardlink target leads through the symlink 'link'")


# -- blob integrity ----------------------------------------------------------------------


def test_layer_digest_mismatch(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    digest = image.layer_digests[0]
    blob = bytearray(image.blob_path(digest).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    oci.replace_blob(image.layout, digest, bytes(blob))

    run = run_indexer(sandbox, image.source)

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({digest}): content has digest sha256:", f"not {digest}")


def test_layer_size_larger_in_manifest(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    size = image.blob_path(image.layer_digests[0]).stat().st_size
    source = retag_manifest(image, "size", lambda manifest: manifest["layers"][0].update(size=size + 100))

    run = run_indexer(sandbox, source)

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({image.layer_digests[0]}) ended after {size} of the "
                                    f"{size + 100} bytes its descriptor declares")


def test_layer_size_smaller_in_manifest(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    size = image.blob_path(image.layer_digests[0]).stat().st_size
    source = retag_manifest(image, "size", lambda manifest: manifest["layers"][0].update(size=size - 1))

    run = run_indexer(sandbox, source)

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({image.layer_digests[0]}) is longer than the "
                                    f"{size - 1} bytes its descriptor declares")


def test_diff_id_mismatch(sandbox):
    wrong = "sha256:" + "0" * 64
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE, diff_id=wrong)])

    run = run_indexer(sandbox, image.source)

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({image.layer_digests[0]}): uncompressed content "
                                    f"(diff_id {wrong}): content has digest sha256:")


# -- registry responses ----------------------------------------------------------------


class FakeRegistry:
    """A registry API v2 on 127.0.0.1 serving one layout; ``bodies`` replaces response bodies by path."""

    repository = "hostile/image"

    def __init__(self, image: oci.Image):
        self.image = image
        self.bodies: dict[str, bytes] = {}
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                registry.answer(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.host = f"{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def reference(self, suffix: str = ":v1") -> str:
        return f"docker://{self.host}/{self.repository}{suffix}"

    def path(self, kind: str, reference: str) -> str:
        return f"/v2/{self.repository}/{kind}/{reference}"

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        prefix = f"/v2/{self.repository}/"
        kind, _, reference = request.path.removeprefix(prefix).partition("/")
        headers = {}
        if kind == "manifests":
            digest = self.image.manifest_digest if reference == "v1" else reference
            headers = {"Content-Type": oci.OCI_MANIFEST, "Docker-Content-Digest": digest}
        elif kind == "blobs":
            digest = reference
        else:
            request.send_response(404)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        body = self.bodies.get(request.path)
        if body is None:
            body = self.image.blob_path(digest).read_bytes()
        request.send_response(200)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def registry(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)], tag="v1")
    fake = FakeRegistry(image)
    yield fake
    fake.close()


def test_registry_empty_blob_body(sandbox, registry):
    digest = registry.image.layer_digests[0]
    size = registry.image.blob_path(digest).stat().st_size
    registry.bodies[registry.path("blobs", digest)] = b""

    run = run_indexer(sandbox, "--plain-http", registry.reference())

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({digest}) ended after 0 of the {size} bytes "
                                    "its descriptor declares")


def test_registry_altered_blob_body(sandbox, registry):
    digest = registry.image.layer_digests[0]
    blob = bytearray(registry.image.blob_path(digest).read_bytes())
    blob[-10] ^= 0x01
    registry.bodies[registry.path("blobs", digest)] = bytes(blob)

    run = run_indexer(sandbox, "--plain-http", registry.reference())

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({digest})", f"not {digest}")


def test_registry_empty_manifest_body(sandbox, registry):
    registry.bodies[registry.path("manifests", "v1")] = b""
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()

    run = run_indexer(sandbox, "--plain-http", registry.reference())

    assert_rejected(sandbox, run, 3, f"manifest {registry.reference()}: content has "
                                    f"digest {empty}, but the registry sent Docker-Content-Digest "
                                    f"{registry.image.manifest_digest}")


def test_registry_altered_manifest_by_digest(sandbox, registry):
    digest = registry.image.manifest_digest
    manifest = registry.image.blob_path(digest).read_bytes()
    registry.bodies[registry.path("manifests", digest)] = manifest.replace(b'"size"', b'"size" ')

    run = run_indexer(sandbox, "--plain-http", registry.reference(f"@{digest}"))

    assert_rejected(sandbox, run, 3, f"manifest {digest}: content has digest sha256:",
                   "not the digest that names it")


# -- decompression bombs and absurd header sizes ----------------------------------------------


def test_bomb_after_end_of_archive(sandbox):
    tar = oci.tar_bytes(SIMPLE)
    layer = zstd_layer_with_filler(tar, 512 << 20, filler=b"\0")
    image = oci.write_image(sandbox.layout, [layer])

    run = run_indexer(sandbox, "--max-image-bytes", str(64 << 20), image.source)

    assert_rejected(sandbox, run, 3, f"layer 1 of 1 ({image.layer_digests[0]}): uncompressed layers exceed "
                                    "the limit of 67108864 bytes per image (--max-image-bytes)")
    assert run.peak_rss_bytes < BOMB_RSS_BYTES


def test_bomb_in_file_data(sandbox):
    entries = [file(f"zeros{number}", bytes(8 << 20)) for number in range(8)]
    image = oci.write_image(sandbox.layout, [Layer(entries)])

    run = run_indexer(sandbox, "--max-image-bytes", str(20 << 20), image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "zeros2", "file data exceeds the limit of 20971520 "
                                                               "bytes per image (--max-image-bytes)")
    assert run.peak_rss_bytes < BOMB_RSS_BYTES


def test_file_size_field_2_pow_60(sandbox):
    tar = raw_header("huge", tarfile.REGTYPE, size=1 << 60) + b"x" * 512 + END_OF_ARCHIVE
    image = oci.write_image(sandbox.layout, [Layer(tar=tar)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "huge", "file data exceeds the limit of 68719476736 "
                                                             "bytes per image (--max-image-bytes)")


def test_long_name_size_field_2_pow_60(sandbox):
    tar = raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size=1 << 60) + padded(b"name") + END_OF_ARCHIVE
    image = oci.write_image(sandbox.layout, [Layer(tar=tar)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, f"invalid tar stream: GNU long name header at "
                                                           f"byte 0 declares {1 << 60} bytes of data, more "
                                                           "than the 1048576 allowed")


def test_long_name_1_gib_small_layer(sandbox):
    layer = zstd_layer_with_filler(raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size=GIB), GIB)
    image = oci.write_image(sandbox.layout, [layer])
    assert image.blob_path(image.layer_digests[0]).stat().st_size < 1 << 20

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, f"GNU long name header at byte 0 declares {GIB} "
                                                           "bytes of data, more than the 1048576 allowed")
    assert run.peak_rss_bytes < BOMB_RSS_BYTES


def test_pax_header_of_1_gib(sandbox):
    layer = zstd_layer_with_filler(raw_header("././@PaxHeader", tarfile.XHDTYPE, size=GIB), GIB)
    image = oci.write_image(sandbox.layout, [layer])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, f"PAX extended header at byte 0 declares {GIB} "
                                                           "bytes of data, more than the 1048576 allowed")
    assert run.peak_rss_bytes < BOMB_RSS_BYTES


@pytest.mark.parametrize("value", ["-1", "12abc"], ids=["negative", "not-numeric"])
def test_pax_size_invalid(sandbox, value):
    image = oci.write_image(sandbox.layout, [Layer(tar=pax_entry({"size": value}) + END_OF_ARCHIVE)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "f", f"PAX record size={value!r} is not a decimal "
                                                          "integer of at most 20 digits")


def test_pax_uid_not_numeric(sandbox):
    # tarfile reads an invalid uid record as 0, which would make the file root's.
    image = oci.write_image(sandbox.layout, [Layer(tar=pax_entry({"uid": "1000x"}) + END_OF_ARCHIVE)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "f", "PAX record uid='1000x' is not a decimal integer")


@pytest.mark.parametrize("major, minor", [(1 << 40, 0), (1, -1), (4096, 0), (0, 1 << 20)],
                         ids=["huge-major", "negative-minor", "major-over-12-bits", "minor-over-20-bits"])
def test_device_numbers_out_of_range(sandbox, major, minor):
    tar = raw_header("dev/evil", tarfile.CHRTYPE, devmajor=major, devminor=minor) + END_OF_ARCHIVE
    image = oci.write_image(sandbox.layout, [Layer(tar=tar)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, "dev/evil", f"device number {major}:{minor} is out of range")


def test_truncated_tar_header(sandbox):
    tar = oci.tar_bytes([file("first", b"1")])[:1024] + raw_header("second", tarfile.REGTYPE)[:300]
    image = oci.write_image(sandbox.layout, [Layer(tar=tar)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, "tar header at byte 1024 is truncated: the stream "
                                                           "ends after 300 of its 512 bytes")


def test_bad_checksum_after_first_entry(sandbox):
    # tarfile alone would end the archive at the bad header and drop "second".
    tar = (raw_header("first", tarfile.REGTYPE, size=1) + padded(b"1")
           + raw_header("second", tarfile.REGTYPE, size=1, checksum_delta=1) + padded(b"2") + END_OF_ARCHIVE)
    image = oci.write_image(sandbox.layout, [Layer(tar=tar)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, "tar header at byte 1024 is invalid: bad checksum")


def test_truncated_gnu_sparse_extension(sandbox):
    header = bytearray(raw_header("sparse", tarfile.GNUTYPE_SPARSE, size=0))
    header[482] = 1  # isextended: an extension block follows, but the stream ends.
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    image = oci.write_image(sandbox.layout, [Layer(tar=bytes(header))])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, "tar header at byte 0 is invalid: tarfile failed "
                                                           "to parse it (IndexError: index out of range)")


def test_extension_header_chain_too_long(sandbox):
    chain = (raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size=4) + padded(b"name")) * 400
    image = oci.write_image(sandbox.layout, [Layer(tar=chain + raw_header("f", tarfile.REGTYPE) + END_OF_ARCHIVE)])

    run = run_indexer(sandbox, image.source)

    assert_tar_entry_rejected(sandbox, image, run, 0, None, "tar header at byte 0: more than 8 extension "
                                                           "headers in front of one entry")


# -- manifests, configs and the layout ---------------------------------------------------


def test_manifest_references_missing_blob(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    image.blob_path(image.config_digest).unlink()

    run = run_indexer(sandbox, image.source)

    assert_rejected(sandbox, run, 4, f"blob {image.config_digest} is missing from layout {image.layout}")


def test_manifest_of_unknown_media_type(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    media_type = "application/vnd.example.manifest.v1+json"
    source = retag_manifest(image, "odd", lambda manifest: manifest.update(mediaType=media_type),
                            manifest_media_type=media_type)

    run = run_indexer(sandbox, source)

    assert_rejected(sandbox, run, 3, f"unsupported manifest media type {media_type!r}")


def test_index_of_unknown_media_type(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)], tag=None)
    media_type = "application/vnd.example.index.v1+json"
    index = {"schemaVersion": 2, "mediaType": media_type,
             "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": image.manifest_digest,
                            "size": image.manifest_size}]}
    data = json.dumps(index).encode()
    digest = oci.write_blob(image.layout, data)
    oci.add_to_index(image.layout, {"mediaType": media_type, "digest": digest, "size": len(data)}, "odd")

    run = run_indexer(sandbox, f"oci:{image.layout}:odd")

    assert_rejected(sandbox, run, 3, f"manifest {digest}: unsupported manifest media type {media_type!r}")


def test_config_not_json(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    config = b"\x89PNG not a JSON document"
    config_digest = oci.write_blob(image.layout, config)
    source = retag_manifest(image, "png", lambda manifest: manifest["config"].update(
        digest=config_digest, size=len(config)))

    run = run_indexer(sandbox, source)

    assert_rejected(sandbox, run, 3, f"image config {config_digest}: invalid JSON")


def test_index_json_names_missing_manifest(sandbox):
    oci.init_layout(sandbox.layout)
    missing = "sha256:" + "ab" * 32
    oci.add_to_index(sandbox.layout, {"mediaType": oci.OCI_MANIFEST, "digest": missing, "size": 100}, "gone")

    run = run_indexer(sandbox, f"oci:{sandbox.layout}:gone")

    assert_rejected(sandbox, run, 4, f"blob {missing} is missing from layout {sandbox.layout}")


def test_index_json_without_images(sandbox):
    oci.init_layout(sandbox.layout)

    run = run_indexer(sandbox, f"oci:{sandbox.layout}")

    assert_rejected(sandbox, run, 4, f"{sandbox.layout}/index.json lists no images")


def test_layer_of_unknown_media_type(sandbox):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE, media_type="application/vnd.example.layer.v1.tar+lz4")])

    run = run_indexer(sandbox, image.source)

    assert_rejected(sandbox, run, 3, f"manifest {image.manifest_digest}: layer {image.layer_digests[0]} has "
                                    "unsupported media type 'application/vnd.example.layer.v1.tar+lz4'")


# -- store -----------------------------------------------------------------------------------


def test_missing_s3_bucket(sandbox, s3_server):
    image = oci.write_image(sandbox.layout, [Layer(SIMPLE)])
    bucket = "lazyfs-no-such-bucket"

    run = run_indexer(sandbox, "--endpoint-url", s3_server.endpoint_url, image.source,
                      store_url=f"s3://{bucket}/images")

    assert_rejected(sandbox, run, 6, f"S3 bucket '{bucket}' of store s3://{bucket}/images does not exist: "
                                    f"create it (for example with aws s3 mb s3://{bucket}) or correct "
                                    "the store URL")
