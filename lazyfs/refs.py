"""Refs: small records that map an image reference to an index digest.

Keys::

    refs/manifests/sha256/<hex>       by manifest digest
    refs/names/<percent-encoded name> by image name, e.g. "registry:5000/repo:tag"

Each ref is JSON: {"index": "<hex>", "manifest": "sha256:<hex>", "name": ...}.
A ref is written last, only after its index (and so every chunk) exists, so a
reader that finds a ref finds a whole image.
"""

from __future__ import annotations

import json
import re
import urllib.parse

from .errors import InvalidReference, LazyfsError, ObjectNotFound, RefNotFound
from .store import Store

# \Z, because $ also matches before a final newline.
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


def is_index_digest(value: str) -> bool:
    return bool(_HEX64.match(value))


def index_key(digest: str) -> str:
    return f"indexes/{digest}"


def chunk_key(address: bytes) -> str:
    return f"chunks/{address.hex()}"


MAX_NAME_CHARS = 512


def check_name(name: str) -> None:
    """Raise InvalidReference unless ``name`` can be an image name ref."""
    if name in ("", ".", "..") or len(name) > MAX_NAME_CHARS:
        raise InvalidReference(f"invalid image name {name!r}: expected 1 to {MAX_NAME_CHARS} characters, not . or ..")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        raise InvalidReference(f"invalid image name {name!r}: control characters are not allowed")


def name_key(name: str) -> str:
    check_name(name)
    return "refs/names/" + urllib.parse.quote(name, safe="")


def manifest_key(manifest_digest: str) -> str:
    algorithm, _, hexdigest = manifest_digest.partition(":")
    if algorithm != "sha256" or not _HEX64.match(hexdigest):
        raise InvalidReference(f"invalid manifest digest {manifest_digest!r}: expected sha256:<64 hex digits>")
    return f"refs/manifests/sha256/{hexdigest}"


def publish(store: Store, index_digest: str, manifest_digest: str, names: list[str]) -> list[str]:
    """Write the refs of an indexed image; return the keys written.

    Raises LazyfsError if the index is not in the store. A ref that already
    contains the same record is left untouched, so republishing uploads nothing.
    """
    if not store.exists(index_key(index_digest)):
        raise LazyfsError(f"refusing to publish refs: index {index_digest} is not in {store.url}")
    # Every key is built, and so every name checked, before the first write.
    keys = [(manifest_key(manifest_digest), None)] + [(name_key(name), name) for name in names]
    written = []
    for key, name in keys:
        record = {"index": index_digest, "manifest": manifest_digest}
        if name is not None:
            record["name"] = name
        data = json.dumps(record, sort_keys=True).encode() + b"\n"
        try:
            if store.get(key) == data:
                continue
        except ObjectNotFound:
            pass
        store.put(key, data)
        written.append(key)
    return written


def resolve(store: Store, reference: str) -> str:
    """Return the index digest (hex) for an index digest, manifest digest or image name."""
    candidate = reference.removeprefix("sha256:") if reference.startswith("sha256:") else reference
    if _HEX64.match(candidate) and store.exists(index_key(candidate)):
        return candidate
    keys = []
    if reference.startswith("sha256:"):
        keys.append(manifest_key(reference))
    keys.append(name_key(reference))
    for key in keys:
        try:
            record = json.loads(store.get(key))
        except ObjectNotFound:
            continue
        except ValueError:
            raise LazyfsError(f"ref {key} in {store.url} is not valid JSON") from None
        digest = record.get("index", "")
        if not _HEX64.match(digest):
            raise LazyfsError(f"ref {key} in {store.url} contains an invalid index digest {digest!r}")
        return digest
    raise RefNotFound(f"no image named {reference!r} in {store.url}: index it first with lazyfs-index")
