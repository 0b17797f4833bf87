"""The ``lazyfs-index`` command: index one OCI image into a store.

Exit codes, one per class of failure:

    0  the image is indexed and its refs are published
    1  internal error (a bug: rerun with -v for the traceback)
    2  usage: invalid arguments, a malformed SOURCE, --plain-http to a non-loopback host
    3  invalid or hostile image: digest or size mismatch, bad JSON, unknown media
       type, corrupt compression, unsafe tar entry or header, no manifest for the
       platform, more than --max-image-bytes uncompressed
    4  source failed: registry unreachable or returning an error, missing file or blob
    5  store failed: the chunk, index or ref could not be written
    6  store not found: the S3 bucket of --store does not exist

An error prints one line, ``lazyfs-index: error: ...``, naming the object
that failed (blob digest, layer, entry), and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..errors import BucketNotFound, IntegrityError, LazyfsError, StoreError
from ..refs import check_name
from ..store import StoreOptions, open_store
from .chunker import ChunkingParams
from .errors import ImageError, SourceError, UsageError
from .manifest import Platform
from .pipeline import DEFAULT_MAX_IMAGE_BYTES, IndexOptions, IndexResult, index_image
from .progress import DEFAULT_INTERVAL_S, Progress
from .registry import RegistryOptions
from .source import open_source

log = logging.getLogger(__name__)

DEFAULT_STORE = "file:///var/lib/lazyfs/store"

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_IMAGE = 3
EXIT_SOURCE = 4
EXIT_STORE = 5
EXIT_STORE_NOT_FOUND = 6

_EPILOG = """\
SOURCE is one of:
  oci:DIR[:TAG|@DIGEST]                    an OCI image layout directory
  DIR                                      the same; the tag comes from --tag
  docker://HOST[:PORT]/REPO[:TAG|@DIGEST]  a registry; the tag defaults to latest
  docker-archive:PATH[:REPO:TAG]           a docker save archive (uncompressed tar)

exit codes:
  0  indexed and published
  1  internal error (rerun with -v for the traceback)
  2  usage error
  3  invalid or hostile image (digest mismatch, corrupt layer, unsafe tar entry,
     more than --max-image-bytes, ...)
  4  source failed (registry unreachable or returning an error, missing blob)
  5  store failed
  6  store not found (the S3 bucket does not exist)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyfs-index",
        description="Index an OCI image into a lazyfs store: flatten its layers, cut file data "
                    "into chunks, upload new chunks, write the index, then publish refs.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="the image to index (see below)")

    store = parser.add_argument_group("store")
    store.add_argument("--store", default=os.environ.get("LAZYFS_STORE", DEFAULT_STORE),
                       help="store URL, file:///DIR or s3://BUCKET/PREFIX "
                            "(default: $LAZYFS_STORE or %(default)s)")
    store.add_argument("--endpoint-url", help="S3 endpoint URL for an s3:// store "
                                              "(default: boto3's configuration)")
    store.add_argument("--upload-workers", type=_positive_int, default=8, metavar="N",
                       help="concurrent chunk uploads (default: %(default)s)")

    image = parser.add_argument_group("image")
    image.add_argument("--platform", type=_platform, metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick from a multi-platform image "
                            "(default: linux and this machine's architecture)")
    image.add_argument("--tag", help="tag to look up in an OCI layout given as a plain DIR")
    image.add_argument("--max-image-bytes", type=_positive_int, default=DEFAULT_MAX_IMAGE_BYTES, metavar="N",
                       help="reject an image whose uncompressed layers or file data exceed N bytes, "
                            "against decompression bombs (default: %(default)s)")
    image.add_argument("--name", action="append", dest="names", metavar="NAME",
                       help="publish a ref under this image name; repeatable (default: the "
                            "registry reference HOST/REPO:TAG, or the layout tag)")

    registry = parser.add_argument_group("registry")
    registry.add_argument("--plain-http", action="store_true",
                          help="use HTTP instead of HTTPS; allowed only for loopback hosts "
                               "(127.0.0.0/8, ::1, localhost)")
    registry.add_argument("--username", help="registry user name; needs --password-stdin (default: the "
                                              "registry's auths entry in $DOCKER_CONFIG/config.json "
                                              "or ~/.docker/config.json, if any)")
    registry.add_argument("--password-stdin", action="store_true",
                          help="read the registry password from standard input")
    registry.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                          help="time limit of each registry request, connect and whole response, "
                               "in seconds; a blob that misses it is resumed (default: %(default)s)")
    registry.add_argument("--retries", type=_non_negative_int, default=5, metavar="N",
                          help="retries of a failed registry request, and resumes of a broken blob "
                               "download, with exponential backoff (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the result as one JSON object")
    output.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress to stderr; twice for debug output")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="write no progress to stderr (default: a bar on a terminal, "
                             "else a line every --progress-interval seconds)")
    output.add_argument("--progress-interval", type=_non_negative_float, default=DEFAULT_INTERVAL_S,
                        metavar="SECONDS", help="seconds between progress lines when stderr is "
                                                "not a terminal (default: %(default)s)")
    return parser


def _platform(text: str) -> Platform:
    try:
        return Platform.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING
    if args.verbose == 1:
        level = logging.INFO
    elif args.verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        result = run(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (ImageError, IntegrityError) as exc:
        return _fail(str(exc), EXIT_IMAGE)
    except SourceError as exc:
        return _fail(str(exc), EXIT_SOURCE)
    except BucketNotFound as exc:
        return _fail(str(exc), EXIT_STORE_NOT_FOUND)
    except StoreError as exc:
        return _fail(str(exc), EXIT_STORE)
    except LazyfsError as exc:
        return _fail(str(exc), EXIT_INTERNAL)
    except Exception as exc:
        log.info("internal error", exc_info=True)
        return _fail(f"internal error: {exc!r} (rerun with -v for the traceback)", EXIT_INTERNAL)
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True))
    else:
        print(format_summary(result))
    return EXIT_OK


def run(args: argparse.Namespace) -> IndexResult:
    """Index the image the parsed arguments name; raise the errors ``main`` maps to exit codes."""
    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username")
    if args.username and not args.password_stdin:
        raise UsageError("--username needs --password-stdin (passwords are never taken as arguments)")
    password = None
    if args.password_stdin:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    registry_options = RegistryOptions(plain_http=args.plain_http, username=args.username,
                                       password=password, timeout_s=args.timeout,
                                       retries=args.retries)
    for name in args.names or ():
        try:
            check_name(name)
        except LazyfsError as exc:
            raise UsageError(f"--name: {exc}") from None
    if args.plain_http and not args.source.startswith("docker://"):
        raise UsageError("--plain-http applies to docker:// sources only")
    source = open_source(args.source, tag=args.tag, registry_options=registry_options)
    try:
        store = open_store(args.store, StoreOptions(endpoint_url=args.endpoint_url))
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    options = IndexOptions(platform=args.platform,
                           names=tuple(args.names) if args.names is not None else None,
                           upload_workers=args.upload_workers,
                           max_image_bytes=args.max_image_bytes,
                           max_pending_chunks=2 * args.upload_workers,
                           chunking=ChunkingParams(),
                           progress=None if args.quiet else Progress.for_stream(
                               sys.stderr, args.progress_interval))
    try:
        return index_image(source, store, options)
    finally:
        source.close()
        store.close()


def format_summary(result: IndexResult) -> str:
    """Return the human-readable summary of a run."""
    stored = f"{result.bytes_stored / 1e6:.1f} MB stored ({result.bytes_new / 1e6:.1f} MB before compression)"
    lines = [
        f"indexed {result.manifest_digest} ({result.platform}, {result.layers} layers)",
        f"  index     {result.index_digest} ({result.index_bytes} bytes)",
        f"  files     {result.files} files, {result.file_bytes / 1e6:.1f} MB of file data, "
        f"{result.entries} tar entries",
        f"  chunks    {result.chunks} in the index; this run: {result.chunks_new} new, "
        f"{result.chunks_reused} reused, {stored}",
        f"  time      {result.seconds:.1f} s",
        f"  names     {', '.join(result.names) or '(none)'}",
        f"  refs      {len(result.refs)} written" + (f": {', '.join(result.refs)}" if result.refs else ""),
    ]
    return "\n".join(lines)


def _fail(message: str, code: int) -> int:
    print(f"lazyfs-index: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
