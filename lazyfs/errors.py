"""Domain exceptions.

Code below the edges raises these; the FUSE adapter maps them to errno values
and the command-line programs map them to exit codes, each in one place.
"""


class LazyfsError(Exception):
    """Base class of every error lazyfs raises on purpose."""


class ConfigError(LazyfsError):
    """An invalid configuration file, key or value."""


class StoreError(LazyfsError):
    """A store request failed after its retries."""


class ObjectNotFound(StoreError):
    """The store reported that the object does not exist (a definite result, not retried)."""

    def __init__(self, key: str):
        super().__init__(f"object not found in store: {key}")
        self.key = key


class BucketNotFound(StoreError):
    """The store's S3 bucket does not exist (a definite result, not retried)."""

    def __init__(self, bucket: str, url: str):
        super().__init__(f"S3 bucket {bucket!r} of store {url} does not exist: create it "
                         f"(for example with aws s3 mb s3://{bucket}) or correct the store URL")
        self.bucket = bucket


class StoreUnavailable(StoreError):
    """The store did not respond, or kept failing, within the retry budget."""


class IntegrityError(LazyfsError):
    """Bytes do not match the digest that names them."""


class IndexFormatError(LazyfsError):
    """An index cannot be parsed: wrong magic, version or a truncated section."""


class RefNotFound(LazyfsError):
    """No ref maps this image reference to an index."""


class InvalidReference(LazyfsError):
    """An image reference that is not a valid name, manifest digest or index digest."""


class FilesystemError(LazyfsError):
    """A request on the mounted tree failed with a definite errno (ENOENT, ENODATA, ...)."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno


class ChunkReadError(LazyfsError):
    """A read needed a chunk that could not be fetched or verified.

    The underlying StoreError or IntegrityError is the ``__cause__``.
    """

    def __init__(self, image_digest: str, address: bytes, cause: Exception):
        super().__init__(f"image {image_digest}: chunk {address.hex()}: {cause}")
        self.image_digest = image_digest
        self.address = address


class DaemonError(LazyfsError):
    """The daemon could not mount, start or stop."""


class ControlError(LazyfsError):
    """The control socket could not be reached or sent an invalid response."""
