"""Text/binary tables nanoBragg reads: HKL structure factors, Fdump cache, MOSFLM matrix, source list.

C behaviour and where this module is stricter (errors name the file and the 1-based line):

* ``-hkl``: C reads whitespace-separated ``h k l F`` quadruples with ``fscanf`` (first pass ``%lg`` for
  the ranges, second pass ``%d%d%d%lg`` for the values); it stops silently at the first token that
  does not parse, and a non-integer index only prints a WARNING and then desynchronises the second
  pass.  Here every non-blank line must be exactly ``h k l F`` with integral h, k, l (``3`` or
  ``3.0``), else ``ValueError``.  Later duplicates overwrite earlier ones, as in C.
* Dense table: indices ``h_min..h_max`` etc.; entries not listed = ``default_F`` (C fills with
  default_F only when it is non-zero, otherwise leaves calloc zeros: the same numbers).
* ``Fdump.bin``: text ``"%d %d %d %d %d %d\\n\\f"`` (h_min h_max k_min k_max l_min l_max), then
  ``(h_range+1)*(k_range+1)*(l_range+1)`` native float64 values, l fastest.  The ``+1`` padding rows
  are zeros (C's calloc).  (C reads the header back with ``fscanf("%d...\\n\\f")``, which would also
  swallow leading binary bytes that happen to be whitespace; this reader does not.)
* ``-mat``: the first 9 numbers, row by row (``fscanf("%lg%lg%lg")`` three times, into
  ``a_star[1], b_star[1], c_star[1]`` for the first row ...): the returned (3, 3) matrix has
  **columns a*, b*, c*** (MOSFLM A matrix, reciprocal vectors times the wavelength, 1/A x A).
* ``-sourcefile``: lines split on any of `` \\t,;:!``; columns X Y Z I lambda (m, m, m, -, m);
  missing trailing columns are NaN (the engine applies C's defaults: -10 m * beam, I=1, lambda0);
  blank lines are skipped.  C ``atof``-s garbage to 0 and, on a last line without a newline (or with
  CRLF endings), fills missing columns with 0 instead of NaN; here garbage raises ``ValueError`` and
  missing columns are always NaN.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .inputs import MAX_TABLE_BYTES, InputFileError, read_input_bytes

__all__ = [
    "fdump_bytes",
    "hkl_table",
    "read_fdump",
    "read_hkl",
    "read_matrix",
    "read_sourcefile",
    "write_fdump",
]


def _text_lines(path) -> tuple[Path, list[str]]:
    """Lines of a text input (a regular file of bounded size; ``InputFileError`` otherwise).
    A file with NUL bytes is binary, not text: refused naming the first line holding one."""
    path = Path(path)
    raw = read_input_bytes(path, MAX_TABLE_BYTES)
    if b"\0" in raw:
        lineno = raw[:raw.index(b"\0")].count(b"\n") + 1
        raise InputFileError(f"{path}:{lineno}: binary data (NUL byte) in a text file")
    return path, raw.decode("latin-1").splitlines()


#: |h|, |k|, |l| above this are refused (C reads them into an int; no real table comes close)
MAX_MILLER_INDEX = 2 ** 20


def _int_index(tok: str) -> int | None:
    try:
        return int(tok)
    except ValueError:
        pass
    try:
        v = float(tok)
    except ValueError:
        return None
    if math.isfinite(v) and v == math.floor(v):
        return int(v)
    return None


_HKL_CACHE: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray]]" = OrderedDict()
_HKL_CACHE_SIZE = 4


def read_hkl(path) -> tuple[np.ndarray, np.ndarray]:
    """``parse_hkl``, remembered per file (path, inode, size, modification time) for the last few files,
    so a process that simulates many images (a sweep, a refinement loop) parses a table once.
    The arrays returned are read-only."""
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    except (OSError, TypeError):
        return parse_hkl(path)
    hit = _HKL_CACHE.get(key)
    if hit is None:
        hkl, F = parse_hkl(path)
        hkl.flags.writeable = False
        F.flags.writeable = False
        hit = _HKL_CACHE[key] = (hkl, F)
        while len(_HKL_CACHE) > _HKL_CACHE_SIZE:
            _HKL_CACHE.popitem(last=False)
    else:
        _HKL_CACHE.move_to_end(key)
    return hit


def parse_hkl(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a text HKL file of ``h k l F`` lines.

    Returns
    -------
    hkl : int64 (n, 3)
        Miller indices in file order.
    F : float64 (n,)
        Structure-factor amplitudes (electrons).

    Raises ``ValueError`` naming file and line for a line that is not 4 numbers with integral
    h, k, l, and for a file without any reflection (C exits with "not enough HKL indices").
    """
    path, lines = _text_lines(path)
    hkl: list[tuple[int, int, int]] = []
    F: list[float] = []
    for lineno, line in enumerate(lines, 1):
        toks = line.split()
        if not toks:
            continue
        if len(toks) != 4:
            raise InputFileError(f"{path}:{lineno}: expected 'h k l F' (4 numbers), got {len(toks)} fields: "
                                 f"{line.strip()[:80]!r}")
        idx = [_int_index(t) for t in toks[:3]]
        if any(i is None for i in idx):
            raise InputFileError(f"{path}:{lineno}: h, k, l must be integers: {line.strip()!r}")
        if any(abs(i) > MAX_MILLER_INDEX for i in idx):  # type: ignore[arg-type]
            raise InputFileError(f"{path}:{lineno}: Miller index out of range (|h|, |k|, |l| <= "
                                 f"{MAX_MILLER_INDEX}): {line.strip()!r}")
        try:
            f = float(toks[3])
        except ValueError:
            raise InputFileError(f"{path}:{lineno}: F is not a number: {toks[3]!r}") from None
        if not math.isfinite(f):
            raise InputFileError(f"{path}:{lineno}: F must be a finite number, got {toks[3]!r}")
        hkl.append((idx[0], idx[1], idx[2]))  # type: ignore[arg-type]
        F.append(f)
    if not hkl:
        raise InputFileError(f"{path}: no 'h k l F' entries found")
    return np.asarray(hkl, dtype=np.int64).reshape(-1, 3), np.asarray(F, dtype=np.float64)


def hkl_table(hkl, F, default_F: float = 0.0):
    """Dense structure-factor table over the bounding box of ``hkl``.

    Parameters
    ----------
    hkl : int (n, 3); F : float (n,); default_F : float
        Entries not listed get ``default_F``; duplicates: the last one wins (C order).

    Returns
    -------
    ranges : tuple (h_min, h_max, k_min, k_max, l_min, l_max) of ints
    table : float64 (h_max-h_min+1, k_max-k_min+1, l_max-l_min+1); ``table[h-h_min, k-k_min, l-l_min]``.
    """
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    F = np.asarray(F, dtype=np.float64).reshape(-1)
    if hkl.shape[0] != F.shape[0]:
        raise ValueError(f"hkl_table: {hkl.shape[0]} indices but {F.shape[0]} amplitudes")
    if hkl.shape[0] == 0:
        raise ValueError("hkl_table: no reflections")
    lo = hkl.min(axis=0)
    hi = hkl.max(axis=0)
    ranges = (int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2]))
    table = np.full(tuple(int(v) for v in (hi - lo + 1)), float(default_F), dtype=np.float64)
    lin = np.ravel_multi_index(tuple((hkl - lo).T), table.shape)
    # duplicates: keep the last occurrence (numpy does not define the order of repeated assignments)
    _, first_in_reversed = np.unique(lin[::-1], return_index=True)
    keep = lin.size - 1 - first_in_reversed
    table.reshape(-1)[lin[keep]] = F[keep]
    return ranges, table


def _check_ranges(ranges) -> tuple[int, int, int, int, int, int]:
    r = tuple(int(v) for v in ranges)
    if len(r) != 6:
        raise ValueError(f"ranges must be (h_min, h_max, k_min, k_max, l_min, l_max), got {ranges!r}")
    return r  # type: ignore[return-value]


def fdump_bytes(ranges, table) -> bytes:
    """Bytes of nanoBragg's ``Fdump.bin`` for a dense ``table`` (shape (hr, kr, lr)) and its ranges."""
    hmin, hmax, kmin, kmax, lmin, lmax = _check_ranges(ranges)
    shape = (hmax - hmin + 1, kmax - kmin + 1, lmax - lmin + 1)
    t = np.asarray(table, dtype=np.float64)
    if t.shape != shape:
        raise ValueError(f"fdump: table shape {t.shape} does not match ranges {ranges} (expected {shape})")
    padded = np.zeros((shape[0] + 1, shape[1] + 1, shape[2] + 1), dtype="<f8")
    padded[:shape[0], :shape[1], :shape[2]] = t
    head = f"{hmin} {hmax} {kmin} {kmax} {lmin} {lmax}\n\f".encode("ascii")
    return head + padded.tobytes()


def write_fdump(path, ranges, table) -> Path:
    """Write ``Fdump.bin`` (see module docstring) atomically."""
    return atomic_write_bytes(path, fdump_bytes(ranges, table))


_FDUMP_HEAD = re.compile(rb"\s*([-+]?\d+)\s+([-+]?\d+)\s+([-+]?\d+)\s+([-+]?\d+)\s+([-+]?\d+)\s+([-+]?\d+)\n\f")


def read_fdump(path):
    """Read ``Fdump.bin`` -> (ranges, table float64 (hr, kr, lr)) without the +1 padding."""
    path = Path(path)
    raw = read_input_bytes(path, MAX_TABLE_BYTES)
    m = _FDUMP_HEAD.match(raw[:512])
    if m is None:
        raise InputFileError(f"{path}: not an Fdump file (expected a '%d %d %d %d %d %d\\n\\f' header)")
    ranges = tuple(int(v) for v in m.groups())
    hmin, hmax, kmin, kmax, lmin, lmax = ranges
    shape = (hmax - hmin + 1, kmax - kmin + 1, lmax - lmin + 1)
    if min(shape) < 1:
        raise InputFileError(f"{path}: empty index ranges {ranges}")
    n = (shape[0] + 1) * (shape[1] + 1) * (shape[2] + 1)
    off = m.end()
    if len(raw) - off < 8 * n:
        raise InputFileError(f"{path}: truncated: need {8 * n} data bytes for ranges {ranges}, "
                             f"have {len(raw) - off}")
    padded = np.frombuffer(raw, dtype="<f8", count=n, offset=off).reshape(shape[0] + 1, shape[1] + 1, shape[2] + 1)
    table = padded[:shape[0], :shape[1], :shape[2]].astype(np.float64)
    bad = ~np.isfinite(table)
    if bad.any():
        h, k, l = (int(v) for v in np.argwhere(bad)[0])
        raise InputFileError(f"{path}: F({h + hmin} {k + kmin} {l + lmin}) = {float(table[h, k, l])!r}: every "
                             "structure factor must be a finite number")
    return ranges, table


def read_matrix(path) -> np.ndarray:
    """First 9 numbers of a MOSFLM-style matrix file -> float64 (3, 3), rows as in the file.

    Columns are a*, b*, c* (``M[:, 0]`` = a*), still multiplied by the wavelength (nanoBragg divides
    by lambda0 in A).  Trailing lines (MOSFLM's U matrix, cell, ...) are ignored.
    """
    path, lines = _text_lines(path)
    vals: list[float] = []
    for lineno, line in enumerate(lines, 1):
        for tok in line.split():
            try:
                vals.append(float(tok))
            except ValueError:
                raise InputFileError(f"{path}:{lineno}: expected a number in the matrix, got {tok[:40]!r}") from None
            if not math.isfinite(vals[-1]):
                raise InputFileError(f"{path}:{lineno}: orientation matrix entries must be finite, got {tok!r}")
            if len(vals) == 9:
                return np.asarray(vals, dtype=np.float64).reshape(3, 3)
    raise InputFileError(f"{path}: need 9 numbers for the orientation matrix, found {len(vals)}")


_SRC_SPLIT = re.compile(r"[ \t,;:!]+")


def read_sourcefile(path) -> np.ndarray:
    """Read a ``-sourcefile`` -> float64 (n, 5): X Y Z I lambda per non-blank line, NaN where missing.

    Units as written (nanoBragg: m, m, m, arbitrary, m).  Columns beyond 5 are ignored (as C).
    """
    return read_sourcefile_lines(path)[0]


def read_sourcefile_lines(path) -> tuple[np.ndarray, list[int]]:
    """``read_sourcefile`` and the 1-based file line of each row (for messages).
    ``inf`` is refused; ``nan`` (as a missing value) is kept."""
    path, lines = _text_lines(path)
    rows: list[list[float]] = []
    linenos: list[int] = []
    for lineno, line in enumerate(lines, 1):
        toks = [t for t in _SRC_SPLIT.split(line.strip(" \t,;:!\r\n")) if t]
        if not toks:
            continue
        row = [math.nan] * 5
        for i, tok in enumerate(toks[:5]):
            try:
                row[i] = float(tok)
            except ValueError:
                raise InputFileError(f"{path}:{lineno}: column {i + 1} is not a number: {tok[:40]!r}") from None
            if math.isinf(row[i]):
                raise InputFileError(f"{path}:{lineno}: column {i + 1} must be finite, got {tok!r}")
        rows.append(row)
        linenos.append(lineno)
    if not rows:
        raise InputFileError(f"{path}: no sources (C exits: 'reading source definition file')")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5), linenos
