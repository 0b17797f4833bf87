"""Errors of the indexer, one class per exit code of ``lazyfs-index``.

Digest and size mismatches raise the core ``lazyfs.errors.IntegrityError``,
store failures ``lazyfs.errors.StoreError``, or its subclass
``BucketNotFound`` when the S3 bucket does not exist. ``lazyfs.indexer.cli``
maps every class to its exit code in one place.
"""

from ..errors import LazyfsError


class UsageError(LazyfsError):
    """An invalid argument: a malformed SOURCE, a rejected option combination."""


class ImageError(LazyfsError):
    """The image is invalid or hostile: bad JSON, unknown media type, unsafe tar entry."""


class SourceError(LazyfsError):
    """The image source failed: a registry is unreachable or rejects a request, a file is missing."""
