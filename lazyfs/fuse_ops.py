"""The pyfuse3 adapter over ``lazyfs.tree``.

Every handler is wrapped by ``_translate_errors``, the one place where
exceptions become errno values, because pyfuse3 lets nothing but FUSEError
escape a handler (anything else ends its main loop):

- FilesystemError             -> its errno (ENOENT, ENOTDIR, ENODATA, ...)
- ChunkReadError              -> EIO, logged with the image digest and chunk address,
                                 once per address per ERROR_LOG_INTERVAL_S with a count of repeats
- StoreError, IndexFormatError, IntegrityError (an index that cannot be loaded)
                              -> EIO, logged, rate-limited like ChunkReadError per handler and error
- any other Exception         -> EIO, logged with its traceback

Writes of any kind are EROFS. The mount is also read-only in the kernel
("ro"), so most writes never reach the daemon.

Caching: images never change, so entries and attributes inside an image are
cached by the kernel for IMAGE_CACHE_TIMEOUT_S, so are negative entries for
names missing inside an image (a lookup answer with inode 0), and files open
with ``keep_cache`` so the page cache survives close and reopen. FLUSH answers
ENOSYS once, after which the kernel stops sending it. The mount root,
images/, shifted/ and the id range directories in it change when images attach,
so they get SHORT_CACHE_TIMEOUT_S. Direct I/O
stays off: it would bypass the page cache and break shared mmap.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Sequence

import pyfuse3

from .errors import ChunkReadError, FilesystemError, IndexFormatError, IntegrityError, StoreError
from .logutil import RateLimitedLog
from .tree import Attributes, Tree

if TYPE_CHECKING:
    from .metrics import FuseMetrics

log = logging.getLogger(__name__)

IMAGE_CACHE_TIMEOUT_S = 86400.0
SHORT_CACHE_TIMEOUT_S = 1.0

# Read errors of one chunk address are logged once per interval; the next line counts the repeats.
ERROR_LOG_INTERVAL_S = 60.0

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _translate_errors(handler):
    """Turn every exception of a handler into FUSEError; see the module docstring.

    With ``Operations.metrics`` set, the wrapper also records each request's
    handler time and errno there.
    """

    @functools.wraps(handler)
    async def wrapper(self: "Operations", *args):
        if self.metrics is None:
            return await _call_translated(handler, self, args)
        started = time.perf_counter()
        error = None
        try:
            return await _call_translated(handler, self, args)
        except pyfuse3.FUSEError as exc:
            error = exc.errno
            raise
        finally:
            self.metrics.observe(handler.__name__, time.perf_counter() - started, error)

    return wrapper


async def _call_translated(handler, self: "Operations", args: tuple):
    try:
        return await handler(self, *args)
    except pyfuse3.FUSEError:
        raise
    except FilesystemError as exc:
        log.debug("%s%r: %s", handler.__name__, args[:2], exc)
        raise pyfuse3.FUSEError(exc.errno) from None
    except ChunkReadError as exc:
        self.error_log.log(logging.ERROR, exc.address,
                           "%s of inode %s failed with EIO: image %s, chunk %s: %s",
                           handler.__name__, args[0] if args else "-", exc.image_digest,
                           exc.address.hex(), exc.__cause__ or exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except (StoreError, IndexFormatError, IntegrityError) as exc:
        # A store that is down fails every lookup of an unloaded image the same way.
        self.error_log.log(logging.ERROR, (handler.__name__, str(exc)), "%s%r failed with EIO: %s",
                           handler.__name__, args[:2], exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except Exception:
        log.exception("unexpected error in %s%r; returning EIO", handler.__name__, args[:2])
        raise pyfuse3.FUSEError(errno.EIO) from None


def _read_only(handler):
    """Replace a mutating handler by one that fails with EROFS."""

    @functools.wraps(handler)
    async def wrapper(self: "Operations", *args):
        raise pyfuse3.FUSEError(errno.EROFS)

    return wrapper


class Operations(pyfuse3.Operations):
    """FUSE request handlers over a ``Tree``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, metrics: FuseMetrics | None = None):
        super().__init__()
        self.tree = tree
        self.error_log = RateLimitedLog(log, ERROR_LOG_INTERVAL_S)
        self.metrics = metrics

    def _entry(self, attributes: Attributes, timeout_s: float | None = None) -> pyfuse3.EntryAttributes:
        """Return the reply for one inode; ``timeout_s`` None picks its cache timeout from the inode."""
        if timeout_s is None:
            timeout_s = self._cache_timeout(attributes.st_ino)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attributes.st_ino
        entry.generation = 0
        entry.entry_timeout = entry.attr_timeout = timeout_s
        entry.st_mode = attributes.st_mode
        entry.st_nlink = attributes.st_nlink
        entry.st_uid = attributes.st_uid
        entry.st_gid = attributes.st_gid
        entry.st_rdev = attributes.st_rdev
        entry.st_size = attributes.st_size
        entry.st_blksize = attributes.st_blksize
        entry.st_blocks = attributes.st_blocks
        entry.st_atime_ns = entry.st_ctime_ns = entry.st_mtime_ns = attributes.st_mtime_ns
        return entry

    def _cache_timeout(self, inode: int) -> float:
        return IMAGE_CACHE_TIMEOUT_S if self.tree.is_image_inode(inode) else SHORT_CACHE_TIMEOUT_S

    # -- reading the namespace ---------------------------------------------

    @_translate_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            inode = await self.tree.lookup(parent_inode, name)
        except FilesystemError as error:
            if error.errno != errno.ENOENT or not self.tree.is_image_inode(parent_inode):
                raise
            # An image never changes, so the kernel may remember that the name
            # is missing: programs probe many names that do not exist.
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = IMAGE_CACHE_TIMEOUT_S
            return entry
        return self._entry(self.tree.getattr(inode))

    @_translate_errors
    async def getattr(self, inode, ctx=None):
        return self._entry(self.tree.getattr(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes live as long as the mount, so lookup counts need no tracking.
        return None

    @_translate_errors
    async def opendir(self, inode, ctx):
        self.tree.check_directory(inode)
        return inode

    @_translate_errors
    async def readdir(self, fh, start_id, token):
        # Every entry of a directory inside an image is inside the image too.
        timeout_s = IMAGE_CACHE_TIMEOUT_S if self.tree.is_image_inode(fh) else None
        for next_id, name, inode in self.tree.entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(self.tree.getattr(inode), timeout_s), next_id):
                return

    @_translate_errors
    async def releasedir(self, fh):
        return None

    @_translate_errors
    async def readlink(self, inode, ctx):
        return self.tree.readlink(inode)

    @_translate_errors
    async def getxattr(self, inode, name, ctx):
        return self.tree.getxattr(inode, name)

    @_translate_errors
    async def listxattr(self, inode, ctx):
        return self.tree.listxattr(inode)

    @_translate_errors
    async def statfs(self, ctx):
        totals = self.tree.statfs()
        result = pyfuse3.StatvfsData()
        result.f_bsize = totals.block_size
        result.f_frsize = totals.block_size
        result.f_blocks = totals.blocks
        result.f_bfree = 0
        result.f_bavail = 0
        result.f_files = totals.files
        result.f_ffree = 0
        result.f_favail = 0
        result.f_namemax = totals.name_max
        return result

    @_translate_errors
    async def access(self, inode, mode, ctx):
        # Only called without default_permissions; the daemon always sets it.
        self.tree.getattr(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # -- reading files -------------------------------------------------------

    @_translate_errors
    async def open(self, inode, flags, ctx):
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.tree.check_regular_file(inode)
        # The file handle is the inode: an open file needs no state of its own.
        return pyfuse3.FileInfo(fh=inode, direct_io=False, keep_cache=True)

    @_translate_errors
    async def read(self, fh, off, size):
        return await self.tree.read(fh, off, size)

    async def flush(self, fh):
        # Nothing is ever written, so there is nothing to flush. ENOSYS makes
        # the kernel stop sending FLUSH on every close of the mount.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translate_errors
    async def release(self, fh):
        return None

    @_translate_errors
    async def fsync(self, fh, datasync):
        # Nothing is ever dirty; succeed so that programs syncing read-only files work.
        return None

    @_translate_errors
    async def fsyncdir(self, fh, datasync):
        return None

    # -- every write is EROFS ----------------------------------------------

    @_read_only
    async def setattr(self, inode, attr, fields, fh, ctx): ...

    @_read_only
    async def mknod(self, parent_inode, name, mode, rdev, ctx): ...

    @_read_only
    async def mkdir(self, parent_inode, name, mode, ctx): ...

    @_read_only
    async def unlink(self, parent_inode, name, ctx): ...

    @_read_only
    async def rmdir(self, parent_inode, name, ctx): ...

    @_read_only
    async def symlink(self, parent_inode, name, target, ctx): ...

    @_read_only
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx): ...

    @_read_only
    async def link(self, inode, new_parent_inode, new_name, ctx): ...

    @_read_only
    async def create(self, parent_inode, name, mode, flags, ctx): ...

    @_read_only
    async def write(self, fh, off, buf): ...

    @_read_only
    async def setxattr(self, inode, name, value, ctx): ...

    @_read_only
    async def removexattr(self, inode, name, ctx): ...
