"""A minimal pyfuse3 file system: the per-request floor that pyfuse3 and trio set.

It serves a fixed read-only tree from memory with the same kernel caching as
lazyfs (entries and attributes for a day, ``keep_cache``, an ENOSYS reply to
FLUSH) and no other work, so ``benchmarks.fuse_requests`` can tell the cost
of pyfuse3 and trio from the cost of lazyfs. The tree::

    file       FILE_BYTES bytes
    link       symlink to "file"
    dir/NNN    DIR_ENTRIES files of 16 bytes

Run as root: ``python -m benchmarks.barefs MOUNTPOINT``; it serves until SIGTERM
or SIGINT, then unmounts.
"""

from __future__ import annotations

import errno
import signal
import stat
import sys

import pyfuse3
import trio

FILE_BYTES = 4096
DIR_ENTRIES = 100
SMALL_BYTES = 16
CACHE_TIMEOUT_S = 86400.0

ROOT = pyfuse3.ROOT_INODE
FILE, LINK, DIR = ROOT + 1, ROOT + 2, ROOT + 3
FIRST_SMALL = ROOT + 4


def small_name(number: int) -> bytes:
    return f"{number:03d}".encode()


class BareOperations(pyfuse3.Operations):
    """Read-only handlers over the fixed tree; nothing beyond what each request needs."""

    def __init__(self) -> None:
        super().__init__()
        self.names = {ROOT: {b"file": FILE, b"link": LINK, b"dir": DIR},
                      DIR: {small_name(number): FIRST_SMALL + number for number in range(DIR_ENTRIES)}}

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = entry.attr_timeout = CACHE_TIMEOUT_S
        if inode in (ROOT, DIR):
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == LINK:
            entry.st_mode, entry.st_nlink, entry.st_size = stat.S_IFLNK | 0o777, 1, 4
        else:
            entry.st_mode, entry.st_nlink = stat.S_IFREG | 0o644, 1
            entry.st_size = FILE_BYTES if inode == FILE else SMALL_BYTES
        entry.st_blksize = 4096
        return entry

    async def getattr(self, inode, ctx=None):
        return self._attributes(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.names.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        children = list(self.names[fh].items())
        for position in range(start_id, len(children)):
            name, inode = children[position]
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), position + 1):
                return

    async def releasedir(self, fh):
        return None

    async def readlink(self, inode, ctx):
        return b"file"

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        length = FILE_BYTES if fh == FILE else SMALL_BYTES
        return b"x" * max(0, min(size, length - off))

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        return None


async def serve(mountpoint: str) -> None:
    """Serve the tree at ``mountpoint`` until SIGINT or SIGTERM, then unmount."""
    pyfuse3.init(BareOperations(), mountpoint, {"ro", "fsname=barefs", "default_permissions"})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _number in signals:
            scope.cancel()
            return


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.barefs MOUNTPOINT", file=sys.stderr)
        return 2
    trio.run(serve, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
