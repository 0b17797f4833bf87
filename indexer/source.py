"""Image sources and the SOURCE argument of ``lazyfs-index``.

A source hands out an image's documents and blobs; it does not verify them.
The pipeline checks every byte against the digest that names it, so a source
can be as simple as a directory of files.

SOURCE forms::

    oci:DIR[:TAG|@DIGEST]                  an OCI image layout directory
    DIR                                    the same, with the tag from --tag
    docker://HOST[:PORT]/REPO[:TAG|@DIGEST]  a registry (distribution API v2)
    docker-archive:PATH[:REPO:TAG]         a ``docker save`` archive
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO

from .errors import UsageError
from .manifest import Descriptor

# A tag as the OCI distribution spec defines it.
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_SUFFIX = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+")


@dataclass(frozen=True)
class RootDocument:
    """The document a reference resolves to, already checked against ``digest``.

    ``media_type`` is the type its descriptor or HTTP response declared, None
    when nothing declared one.
    """

    media_type: str | None
    digest: str
    data: bytes


class Source:
    """Interface of an image source."""

    label: str
    """The source as the user wrote it, for messages."""

    names: list[str]
    """Image names to publish refs under when the user gives no ``--name``."""

    def resolve(self) -> RootDocument:
        """Return the manifest or image index the reference names."""
        raise NotImplementedError

    def read_manifest(self, descriptor: Descriptor) -> bytes:
        """Return the bytes of a manifest named by ``descriptor``, unverified."""
        raise NotImplementedError

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        """Open a config or layer blob as a raw, unverified byte stream."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections or files held by the source."""


def split_digest_suffix(text: str) -> tuple[str, str | None]:
    """Split "NAME@ALGORITHM:ENCODED" into (NAME, digest); no '@' gives (text, None)."""
    name, at, digest = text.rpartition("@")
    if at and _DIGEST_SUFFIX.fullmatch(digest):
        return name, digest
    return text, None


def open_source(text: str, tag: str | None = None, registry_options=None) -> Source:
    """Open the source a SOURCE argument names; raise UsageError if it is malformed.

    ``tag`` is the ``--tag`` option, for a layout given without one.
    ``registry_options`` is a ``registry.RegistryOptions`` for docker:// sources.
    """
    if text.startswith("docker://"):
        if tag is not None:
            raise UsageError("--tag applies to OCI layouts; put the tag in the docker:// reference")
        from .registry import RegistryOptions, RegistrySource

        return RegistrySource.from_reference(text, registry_options or RegistryOptions())

    if text.startswith("docker-archive:"):
        if tag is not None:
            raise UsageError("--tag applies to OCI layouts; use docker-archive:PATH:REPO:TAG")
        from .docker_archive import DockerArchiveSource, parse_archive_reference

        return DockerArchiveSource(*parse_archive_reference(text))

    from .oci_layout import OciLayoutSource

    if text.startswith("oci:"):
        directory, reference_tag, digest = parse_oci_reference(text)
        if tag is not None and (reference_tag is not None or digest is not None):
            raise UsageError(f"both --tag and a reference in {text!r}: give one of them")
        return OciLayoutSource(directory, reference_tag or tag, digest)
    if "://" in text:
        raise UsageError(f"unsupported source {text!r}: use oci:DIR[:TAG] or docker://HOST/REPO[:TAG] "
                         "or docker-archive:PATH[:REPO:TAG]")
    if not os.path.isdir(text):
        raise UsageError(f"source {text!r} is not a directory: use oci:DIR[:TAG] or docker://HOST/REPO[:TAG] "
                         "or docker-archive:PATH[:REPO:TAG]")
    return OciLayoutSource(text, tag, None)


def parse_oci_reference(text: str) -> tuple[str, str | None, str | None]:
    """Split "oci:DIR[:TAG|@DIGEST]" into (DIR, TAG, DIGEST).

    A suffix after the last ':' counts as a tag only when it is a valid tag,
    so a directory name may contain ':' when no tag follows.
    """
    body = text.removeprefix("oci:")
    directory, digest = split_digest_suffix(body)
    tag = None
    if digest is None:
        head, colon, suffix = body.rpartition(":")
        if colon and TAG.fullmatch(suffix):
            directory, tag = head, suffix
    if not directory:
        raise UsageError(f"invalid source {text!r}: missing directory (oci:DIR[:TAG|@DIGEST])")
    return directory, tag, digest
