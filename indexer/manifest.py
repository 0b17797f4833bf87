"""Manifests, image indexes, platform selection and the image config.

Parses OCI image manifests and indexes and their Docker schema 2 equivalents
(manifest and manifest list) into small typed records, rejecting anything
malformed with an ImageError that names the document. JSON objects with a
duplicate key are rejected too, because two parsers may pick different values.
"""

from __future__ import annotations

import json
import platform as host_platform
import re
from dataclasses import dataclass, field
from typing import Any

from . import mediatypes
from .errors import ImageError, UsageError
from .verify import check_digest

# Manifests and configs are read into memory whole; real ones are a few KiB.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20

# The image config fields copied into the index for the runtime, unchanged.
RUNTIME_CONFIG_FIELDS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "ExposedPorts",
                         "Labels", "StopSignal", "Volumes")

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386",
                 "i686": "386"}
_PLATFORM_PART = re.compile(r"[a-z0-9_.-]+")


@dataclass(frozen=True)
class Platform:
    """An os/architecture[/variant] triple as in an image index."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """Parse ``os/arch[/variant]``, e.g. "linux/arm64/v8"; raise UsageError if malformed."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(_PLATFORM_PART.fullmatch(p) for p in parts):
            raise UsageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        os_name, architecture = parts[0], _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(os_name, architecture, parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> "Platform":
        """Return the Linux platform of this machine's CPU (variants are not detected)."""
        machine = host_platform.machine().lower()
        if machine.startswith("armv") and machine[4:5].isdigit():
            return cls("linux", "arm", "v" + machine[4])
        return cls("linux", _ARCH_ALIASES.get(machine, machine))

    def matches(self, candidate: "Platform") -> bool:
        """Return whether an index entry's platform satisfies this request.

        An empty requested variant accepts any variant; arm64 entries without a
        variant count as v8, the only arm64 variant in use.
        """
        if (candidate.os, _ARCH_ALIASES.get(candidate.architecture, candidate.architecture)) != (
                self.os, self.architecture):
            return False
        if not self.variant:
            return True
        variant = candidate.variant or ("v8" if self.architecture == "arm64" else "")
        return variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and its exact size."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_json(cls, value: Any, label: str) -> "Descriptor":
        """Build a descriptor from its JSON object; raise ImageError if it is malformed."""
        if not isinstance(value, dict):
            raise ImageError(f"{label}: descriptor must be a JSON object")
        media_type = value.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise ImageError(f"{label}: descriptor has no mediaType")
        digest = check_digest(value.get("digest"), label)
        size = value.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{label}: descriptor size must be a non-negative integer, not {size!r}")
        annotations = value.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise ImageError(f"{label}: annotations must map strings to strings")
        return cls(media_type, digest, size, _platform_from_json(value.get("platform"), label),
                   annotations)


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and the layers, bottom layer first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageIndex:
    """An image index or manifest list: one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config that the indexer uses."""

    platform: Platform
    diff_ids: tuple[str, ...]
    runtime: dict[str, Any]


def load_json(data: bytes, label: str) -> Any:
    """Parse JSON bytes; raise ImageError on invalid JSON or a duplicate key."""

    def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = {}
        for key, value in pairs:
            if key in result:
                raise ImageError(f"{label}: duplicate JSON key {key!r}")
            result[key] = value
        return result

    try:
        return json.loads(data, object_pairs_hook=reject_duplicates)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{label}: invalid JSON: {exc}") from None


def parse_manifest_document(data: bytes, declared_type: str | None, label: str) -> Manifest | ImageIndex:
    """Parse a manifest or image index.

    ``declared_type`` is the media type of the descriptor or the HTTP
    Content-Type that delivered it, None when unknown. The document's own
    ``mediaType`` field must agree with it. When both are missing, the type is
    inferred from the structure, which the OCI spec allows for older images.
    """
    document = load_json(data, label)
    if not isinstance(document, dict):
        raise ImageError(f"{label}: manifest must be a JSON object")
    media_type = _document_media_type(document, declared_type, label)
    if document.get("schemaVersion") != 2:
        raise ImageError(f"{label}: unsupported schemaVersion {document.get('schemaVersion')!r} (expected 2)")
    if media_type in mediatypes.INDEXES:
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{label}: image index has no manifests list")
        manifests = tuple(Descriptor.from_json(entry, f"{label} manifests[{i}]")
                          for i, entry in enumerate(entries))
        return ImageIndex(media_type, manifests)

    config = Descriptor.from_json(document.get("config"), f"{label} config")
    if config.media_type not in mediatypes.CONFIGS:
        raise ImageError(
            f"{label}: config media type {config.media_type!r} is not a container image config "
            f"(the manifest describes an artifact, not an image)")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{label}: manifest has no layers list")
    descriptors = []
    for i, entry in enumerate(layers):
        layer = Descriptor.from_json(entry, f"{label} layers[{i}]")
        if layer.media_type not in mediatypes.LAYERS:
            raise ImageError(f"{label}: layer {layer.digest} has unsupported media type {layer.media_type!r}")
        descriptors.append(layer)
    return Manifest(media_type, config, tuple(descriptors))


def _document_media_type(document: dict, declared_type: str | None, label: str) -> str:
    own = document.get("mediaType")
    if own is not None and not isinstance(own, str):
        raise ImageError(f"{label}: mediaType must be a string")
    known = mediatypes.MANIFESTS | mediatypes.INDEXES
    if declared_type not in known:
        # A registry may label manifests "application/json"; the body decides then.
        if declared_type in mediatypes.DOCKER_SCHEMA1:
            own = own or declared_type
        declared_type = None
    if own and declared_type and own != declared_type:
        raise ImageError(f"{label}: mediaType {own!r} contradicts the descriptor's {declared_type!r}")
    media_type = own or declared_type
    if media_type is None:
        if "manifests" in document and "layers" not in document:
            media_type = mediatypes.OCI_INDEX
        elif "layers" in document and "manifests" not in document:
            media_type = mediatypes.OCI_MANIFEST
        else:
            raise ImageError(f"{label}: document has no mediaType and is neither a manifest nor an index")
    if media_type in mediatypes.DOCKER_SCHEMA1:
        raise ImageError(f"{label}: Docker schema 1 manifests are not supported; push the image again "
                         "with a current client to convert it")
    if media_type not in known:
        raise ImageError(f"{label}: unsupported manifest media type {media_type!r}")
    return media_type


def _platform_from_json(value: Any, label: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ImageError(f"{label}: platform must be a JSON object")
    os_name, architecture = value.get("os"), value.get("architecture")
    variant = value.get("variant", "")
    if not all(isinstance(v, str) for v in (os_name, architecture, variant)):
        raise ImageError(f"{label}: platform os, architecture and variant must be strings")
    return Platform(os_name, architecture, variant)


def select_manifest(index: ImageIndex, requested: Platform, label: str) -> Descriptor:
    """Return the first entry of ``index`` for platform ``requested``.

    Raise ImageError when none matches, listing the platforms the index has.
    An index with one entry and no platform field is taken as it is.
    """
    if len(index.manifests) == 1 and index.manifests[0].platform is None:
        return index.manifests[0]
    for descriptor in index.manifests:
        if descriptor.platform is not None and requested.matches(descriptor.platform):
            return descriptor
    available = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
    raise ImageError(f"{label}: no manifest for platform {requested}; the index has "
                     f"{', '.join(available) or 'no platform entries'} (choose one with --platform)")


def parse_config(data: bytes, label: str) -> ImageConfig:
    """Parse an image config: platform, rootfs.diff_ids and the runtime fields."""
    document = load_json(data, label)
    if not isinstance(document, dict):
        raise ImageError(f"{label}: image config must be a JSON object")
    platform = _platform_from_json(
        {"os": document.get("os"), "architecture": document.get("architecture"),
         "variant": document.get("variant", "")}, label)
    rootfs = document.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError(f"{label}: rootfs must be an object of type \"layers\"")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ImageError(f"{label}: rootfs.diff_ids must be a list")
    diff_ids = tuple(check_digest(d, f"{label} rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids))

    settings = document.get("config") or {}
    if not isinstance(settings, dict):
        raise ImageError(f"{label}: config must be a JSON object")
    runtime = {name: settings[name] for name in RUNTIME_CONFIG_FIELDS if settings.get(name) is not None}
    _check_runtime_types(runtime, label)
    return ImageConfig(platform, diff_ids, runtime)


def _check_runtime_types(runtime: dict[str, Any], label: str) -> None:
    def is_string_list(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    for name in ("Entrypoint", "Cmd", "Env"):
        if name in runtime and not is_string_list(runtime[name]):
            raise ImageError(f"{label}: config.{name} must be a list of strings")
    for name in ("WorkingDir", "User", "StopSignal"):
        if name in runtime and not isinstance(runtime[name], str):
            raise ImageError(f"{label}: config.{name} must be a string")
    for name in ("ExposedPorts", "Labels", "Volumes"):
        if name in runtime and not isinstance(runtime[name], dict):
            raise ImageError(f"{label}: config.{name} must be a JSON object")
