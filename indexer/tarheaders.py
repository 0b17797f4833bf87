"""Checks on the tar headers of a layer, made before tarfile acts on them.

tarfile reads the data of a GNU long name or long link header, and of a PAX
extended header, into memory whole, in one ``read`` of the size the header
declares. It follows a chain of such headers by recursion. Some of its header
parsers raise ValueError or IndexError on malformed input, and a malformed
header after the first one ends the archive there without an error. Pass
``CheckedTarInfo`` to ``tarfile.open`` as ``tarinfo`` and a ``TarHeaderError``
rejects, before tarfile reads further:

- an extension header (GNU long name or link, PAX, Solaris) that declares
  more than ``MAX_EXTENSION_DATA_BYTES``, the limit Go's archive/tar (which
  Docker and containerd use) applies to such headers;
- more than ``MAX_EXTENSION_HEADERS`` extension headers in front of one entry,
  and more than ``MAX_ENTRY_HEADER_BYTES`` read for the headers of one entry
  (old GNU sparse extension blocks, the GNU sparse 1.0 map in the data);
- a truncated header, a bad checksum, an invalid number field and an invalid
  PAX record, wherever they are in the stream;
- a negative size, and PAX ``size``, ``uid`` and ``gid`` records that are not
  non-negative decimal integers (tarfile takes a non-numeric one as 0);
- a sparse map with a negative, overlapping or out-of-size data region;
- device numbers that Linux cannot represent: a major above 4095 or a minor
  above 1048575 (12 and 20 bits, as the kernel's ``dev_t`` and FUSE's
  ``fuse_attr.rdev`` store them).

The module subclasses ``tarfile.TarInfo`` and overrides ``fromtarfile``, so
it relies on tarfile's ``_proc_member`` step, which tarfile's source names as
the extension point for subclasses.
"""

from __future__ import annotations

import re
import tarfile

# Go's archive/tar limit for the data of one GNU long name or PAX header.
MAX_EXTENSION_DATA_BYTES = 1 << 20
# A real entry has a PAX header, a GNU long name and a long link at most,
# plus a global header now and then.
MAX_EXTENSION_HEADERS = 8
# All header blocks and extension data of one entry. Old GNU sparse files
# store 21 regions per 512-byte block, so this allows about 170,000 regions.
MAX_ENTRY_HEADER_BYTES = 4 << 20
MAX_DEVICE_MAJOR = (1 << 12) - 1
MAX_DEVICE_MINOR = (1 << 20) - 1

_EXTENSION_TYPES = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long link header",
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
}
_PAX_INTEGER_RECORDS = ("size", "uid", "gid")
# At most 20 digits: more is no real size or id, and int() rejects over 4300.
_DECIMAL = re.compile(r"[0-9]{1,20}")


class TarHeaderError(tarfile.TarError):
    """A tar header the indexer rejects; the message names its offset and entry."""


class _HeaderReader:
    """The archive's stream while tarfile parses the headers of one entry.

    It counts the bytes read and the extension headers, and raises before a
    read would pass ``MAX_ENTRY_HEADER_BYTES``.
    """

    def __init__(self, stream, offset: int):
        self.stream = stream
        self.offset = offset
        self.bytes_read = 0
        self.headers = 0

    def read(self, size: int) -> bytes:
        if self.bytes_read + size > MAX_ENTRY_HEADER_BYTES:
            raise TarHeaderError(f"tar header at byte {self.offset}: the headers of one entry "
                                 f"exceed {MAX_ENTRY_HEADER_BYTES} bytes")
        data = self.stream.read(size)
        self.bytes_read += len(data)
        return data

    def tell(self) -> int:
        return self.stream.tell()


class CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo whose headers are checked as they are read (see the module docstring)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> "CheckedTarInfo":
        if isinstance(tarfile_.fileobj, _HeaderReader):
            # An extension header's data is read; its entry's next header follows.
            return cls._read_header(tarfile_, tarfile_.fileobj)
        reader = _HeaderReader(tarfile_.fileobj, tarfile_.fileobj.tell())
        tarfile_.fileobj = reader
        try:
            info = cls._read_header(tarfile_, reader)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            # The end of the archive: tarfile's own handling applies.
            raise
        except (tarfile.InvalidHeaderError, tarfile.SubsequentHeaderError) as exc:
            raise TarHeaderError(f"tar header at byte {reader.offset} is invalid: {exc}") from None
        except (ValueError, IndexError) as exc:
            # tarfile's sparse and PAX number parsers raise these on bad input.
            raise TarHeaderError(f"tar header at byte {reader.offset} is invalid: tarfile failed to "
                                 f"parse it ({type(exc).__name__}: {exc})") from None
        finally:
            tarfile_.fileobj = reader.stream
        _check_entry(info, reader.offset)
        return info

    @classmethod
    def _read_header(cls, tarfile_: tarfile.TarFile, reader: _HeaderReader) -> "CheckedTarInfo":
        """Read one header block, check it and let tarfile process it; the body of ``fromtarfile``."""
        offset = reader.tell()
        reader.headers += 1
        if reader.headers > MAX_EXTENSION_HEADERS + 1:
            raise TarHeaderError(f"tar header at byte {reader.offset}: more than {MAX_EXTENSION_HEADERS} "
                                 "extension headers in front of one entry")
        block = reader.read(tarfile.BLOCKSIZE)
        if 0 < len(block) < tarfile.BLOCKSIZE:
            raise TarHeaderError(f"tar header at byte {offset} is truncated: the stream ends after "
                                 f"{len(block)} of its {tarfile.BLOCKSIZE} bytes")
        info = cls.frombuf(block, tarfile_.encoding, tarfile_.errors)
        info.offset = offset
        _check_header(info)
        return info._proc_member(tarfile_)


def _describe(info: tarfile.TarInfo, offset: int) -> str:
    return f"entry {info.name!r} (tar header at byte {offset})"


def _check_header(info: tarfile.TarInfo) -> None:
    """Check the fields of one header block before tarfile reads what it declares."""
    if info.size < 0:
        raise TarHeaderError(f"{_describe(info, info.offset)}: size {info.size} is negative")
    kind = _EXTENSION_TYPES.get(info.type)
    if kind is not None and info.size > MAX_EXTENSION_DATA_BYTES:
        raise TarHeaderError(f"{kind} at byte {info.offset} declares {info.size} bytes of data, "
                             f"more than the {MAX_EXTENSION_DATA_BYTES} allowed")
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if not (0 <= info.devmajor <= MAX_DEVICE_MAJOR and 0 <= info.devminor <= MAX_DEVICE_MINOR):
            raise TarHeaderError(
                f"{_describe(info, info.offset)}: device number {info.devmajor}:{info.devminor} is "
                f"out of range (Linux majors go up to {MAX_DEVICE_MAJOR}, minors up to {MAX_DEVICE_MINOR})")


def _check_entry(info: tarfile.TarInfo, offset: int) -> None:
    """Check an entry after tarfile applied its extension headers."""
    for record in _PAX_INTEGER_RECORDS:
        value = info.pax_headers.get(record)
        if value is not None and not _DECIMAL.fullmatch(value):
            raise TarHeaderError(f"{_describe(info, offset)}: PAX record {record}={value!r} is not "
                                 "a decimal integer of at most 20 digits")
    if info.size < 0:
        raise TarHeaderError(f"{_describe(info, offset)}: size {info.size} is negative")
    if info.sparse is not None:
        _check_sparse_map(info, offset)


def _check_sparse_map(info: tarfile.TarInfo, offset: int) -> None:
    end = 0
    for region_offset, region_bytes in info.sparse:
        if region_bytes == 0:
            # GNU tar ends a map with an empty region at the file size; the
            # old GNU format pads with (0, 0).
            continue
        if region_offset < end or region_bytes < 0 or region_offset + region_bytes > info.size:
            raise TarHeaderError(
                f"{_describe(info, offset)}: sparse region of {region_bytes} bytes at {region_offset} is "
                f"negative, overlaps the one before or ends beyond the file size {info.size}")
        end = region_offset + region_bytes
