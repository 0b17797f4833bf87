"""An OCI image layout directory as an image source.

The layout contains ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``. A
tag is looked up in index.json through the annotation
``org.opencontainers.image.ref.name``; a digest names a blob directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

from . import mediatypes
from .errors import ImageError, SourceError, UsageError
from .manifest import MAX_MANIFEST_BYTES, Descriptor, ImageIndex, parse_manifest_document
from .source import RootDocument, Source
from .verify import check_digest, verify_bytes

REF_NAME = "org.opencontainers.image.ref.name"


class OciLayoutSource(Source):
    """Images in a local OCI image layout."""

    def __init__(self, directory: str | Path, tag: str | None, digest: str | None):
        self.directory = Path(directory)
        self.tag = tag
        self.digest = digest
        if digest is not None:
            try:
                check_digest(digest, "source")
            except ImageError as exc:
                raise UsageError(str(exc)) from None
        self.label = f"oci:{self.directory}"
        if tag:
            self.label += f":{tag}"
        elif digest:
            self.label += f"@{digest}"
        self.names = [tag] if tag else []

    def resolve(self) -> RootDocument:
        index = self._load_index()
        if self.digest is not None:
            declared = next((d for d in index.manifests if d.digest == self.digest), None)
            if declared is None:
                data = self._read_blob(self.digest, MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise ImageError(f"manifest {self.digest} is larger than the {MAX_MANIFEST_BYTES} "
                                     "bytes allowed")
                verify_bytes(data, self.digest, None, f"manifest {self.digest}")
                return RootDocument(None, self.digest, data)
        else:
            declared = self._find_tagged(index)
        data = self.read_manifest(declared)
        verify_bytes(data, declared.digest, declared.size, f"manifest {declared.digest}")
        return RootDocument(declared.media_type, declared.digest, data)

    def read_manifest(self, descriptor: Descriptor) -> bytes:
        if descriptor.size > MAX_MANIFEST_BYTES:
            raise ImageError(f"manifest {descriptor.digest} declares {descriptor.size} bytes, "
                             f"more than the {MAX_MANIFEST_BYTES} allowed")
        return self._read_blob(descriptor.digest, descriptor.size + 1)

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        path = self._blob_path(descriptor.digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise SourceError(f"blob {descriptor.digest} is missing from layout {self.directory}") from None
        except OSError as exc:
            raise SourceError(f"opening blob {path} failed: {exc.strerror}") from None

    def _load_index(self) -> ImageIndex:
        try:
            marker = json.loads((self.directory / "oci-layout").read_bytes())
            index_data = (self.directory / "index.json").read_bytes()
        except FileNotFoundError as exc:
            raise SourceError(f"{self.directory} is not an OCI image layout: {exc.filename} is missing") from None
        except (OSError, ValueError) as exc:
            raise SourceError(f"reading OCI layout {self.directory} failed: {exc}") from None
        if not isinstance(marker, dict) or marker.get("imageLayoutVersion") != "1.0.0":
            raise ImageError(f"{self.directory}/oci-layout: unsupported imageLayoutVersion "
                             f"{marker.get('imageLayoutVersion') if isinstance(marker, dict) else marker!r}")
        index = parse_manifest_document(index_data, mediatypes.OCI_INDEX, f"{self.directory}/index.json")
        if not isinstance(index, ImageIndex):
            raise ImageError(f"{self.directory}/index.json is not an image index")
        return index

    def _find_tagged(self, index: ImageIndex) -> Descriptor:
        if not index.manifests:
            raise SourceError(f"{self.directory}/index.json lists no images")
        names = [d.annotations.get(REF_NAME) for d in index.manifests]
        if self.tag is None:
            if len(index.manifests) == 1:
                return index.manifests[0]
            listed = ", ".join(sorted(n for n in set(names) if n)) or "none"
            raise UsageError(f"{self.directory} contains {len(index.manifests)} images; choose one with "
                             f"oci:DIR:TAG or --tag (tags: {listed})")
        matches = [d for d, name in zip(index.manifests, names) if name == self.tag]
        if not matches:
            listed = ", ".join(sorted(n for n in set(names) if n)) or "none"
            raise SourceError(f"tag {self.tag!r} not found in {self.directory}/index.json (tags: {listed})")
        if len(matches) > 1:
            raise ImageError(f"tag {self.tag!r} names {len(matches)} manifests in "
                             f"{self.directory}/index.json; choose one with oci:DIR@DIGEST")
        return matches[0]

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = check_digest(digest, "blob").partition(":")
        return self.directory / "blobs" / algorithm / encoded

    def _read_blob(self, digest: str, limit: int) -> bytes:
        """Read at most ``limit`` bytes, enough for the verification to see an overlong blob."""
        with self.open_blob(Descriptor("", digest, 0)) as stream:
            return stream.read(limit)
