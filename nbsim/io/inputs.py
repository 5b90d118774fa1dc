"""Reading an input file safely: a regular file of bounded size, or one line saying why not.

Every reader of user-named input files (HKL, Fdump, matrix, source list, SMV ``-mask``/``-img``)
goes through :func:`read_input_bytes`, so that

* a FIFO, a device such as ``/dev/zero``, a socket or a directory is refused from its ``stat``
  before it is opened (opening a FIFO would block, reading ``/dev/zero`` would never end);
* a file larger than the reader's limit is refused before it is read;
* a missing or unreadable file gives :class:`InputFileError` naming the path.

:class:`InputFileError` is a ``ValueError`` whose message is one line starting with the path (and
``:line`` where a line is at fault), so callers can prefix the key or flag that named the file.
"""
from __future__ import annotations

import gzip
import io
import os
import stat

__all__ = ["InputFileError", "MAX_TABLE_BYTES", "MAX_IMAGE_BYTES", "read_input_bytes", "gunzip_bounded"]

#: text tables (HKL, matrix, source list) and the Fdump cache: far above any real table
MAX_TABLE_BYTES = 2 * 2 ** 30
#: SMV mask / image files (a 6k x 6k uint16 image is 72 MB)
MAX_IMAGE_BYTES = 2 * 2 ** 30


class InputFileError(ValueError):
    """An input file cannot be used; the message (one line) starts with its path."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular(path, max_bytes: int) -> int:
    """``stat`` ``path``: return its size, or raise ``InputFileError`` (missing, not a regular file,
    larger than ``max_bytes``). Never opens the file."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputFileError(f"{p}: no such file") from None
    except OSError as e:
        raise InputFileError(f"{p}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{p}: is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise InputFileError(f"{p}: {st.st_size} bytes, larger than the {max_bytes} bytes accepted "
                             "for this kind of input")
    return st.st_size


def read_input_bytes(path, max_bytes: int = MAX_TABLE_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``; see :func:`check_regular`)."""
    check_regular(path, max_bytes)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > max_bytes:                       # grew while we read it
        raise InputFileError(f"{path}: larger than the {max_bytes} bytes accepted for this kind of input")
    return raw


def gunzip_bounded(raw: bytes, name, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Decompress gzip bytes, refusing output beyond ``max_bytes`` (a gzip bomb) or a corrupt stream."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
            out = gz.read(max_bytes + 1)
    except (OSError, EOFError) as e:
        raise InputFileError(f"{name}: corrupt gzip data ({e})") from None
    if len(out) > max_bytes:
        raise InputFileError(f"{name}: decompresses to more than {max_bytes} bytes")
    return out
