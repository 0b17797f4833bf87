"""The debootstrap test image indexed into an S3 bucket, with its reference tree.

``index_image`` runs ``lazyfs-index`` from the OCI layout into a bucket of a
moto server and unpacks the same layout with ``umoci unpack``. The unpacked
rootfs is the reference that reads through a mount are compared against.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3

from lazyfs.index import Index
from tests.support import images
from tests.support.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

INDEX_TIMEOUT_S = 300.0
_READ_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class ReferenceFile:
    """One regular file of the reference tree."""

    size: int
    sha256: str


@dataclass(frozen=True)
class IndexedImage:
    """An indexed image in ``s3://bucket/prefix`` and its unpacked reference rootfs."""

    endpoint_url: str
    bucket: str
    prefix: str
    digest: str
    index: Index
    reference: Path
    # Regular files by path relative to the image root.
    files: dict[bytes, ReferenceFile]

    @property
    def store_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def chunk_key(self, address: bytes) -> str:
        """Return the S3 object key of a chunk."""
        return f"{self.prefix}/chunks/{address.hex()}"

    def chunks_of(self, path: bytes) -> list[bytes]:
        """Return the chunk addresses of a regular file, in file order."""
        inode = _lookup(self.index, path)
        return [self.index.chunk(extent.chunk)[0] for extent in self.index.extents(inode)]


def index_image(layout: Path, tag: str, endpoint_url: str, bucket: str, bundle: Path,
                prefix: str = "images") -> IndexedImage:
    """Index ``layout:tag`` into ``s3://bucket/prefix`` and unpack it into ``bundle``."""
    command = [sys.executable, "-m", "lazyfs.indexer.cli", "--store", f"s3://{bucket}/{prefix}",
               "--endpoint-url", endpoint_url, "--json", f"oci:{layout}:{tag}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=INDEX_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"lazyfs-index exited with status {result.returncode}: {result.stderr}")
    digest = json.loads(result.stdout)["index_digest"]
    index = Index(_download(endpoint_url, bucket, f"{prefix}/indexes/{digest}"), digest)
    rootfs = images.umoci_unpack(layout, tag, bundle)
    return IndexedImage(endpoint_url, bucket, prefix, digest, index, rootfs, regular_files(rootfs))


def regular_files(root: Path) -> dict[bytes, ReferenceFile]:
    """Return size and SHA-256 of every regular file under ``root``, by relative path."""
    files = {}
    root_bytes = os.fsencode(root)
    for directory, _dirs, names in os.walk(root_bytes):
        for name in names:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                files[os.path.relpath(path, root_bytes)] = ReferenceFile(os.lstat(path).st_size,
                                                                         file_sha256(path))
    return files


def file_sha256(path: bytes | str | Path) -> str:
    """Return the SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def s3_client(endpoint_url: str):
    """Return a boto3 S3 client for a moto server with the test credentials."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=REGION, aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY)


def _download(endpoint_url: str, bucket: str, key: str) -> bytes:
    client = s3_client(endpoint_url)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    finally:
        client.close()


def _lookup(index: Index, path: bytes) -> int:
    inode = 0
    for name in path.split(b"/"):
        found = index.lookup(inode, name)
        if found is None:
            raise KeyError(f"{path!r} is not in index {index.digest}")
        inode = found
    return inode
