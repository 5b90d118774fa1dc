"""Structure factors from an MTZ file or an atomic model (PDB / mmCIF), read with gemmi.

Both give what a text ``-hkl`` table gives (``nbsim.io.tables.read_hkl``): Miller indices ``hkl``
int64 (n, 3) and amplitudes ``F`` float64 (n,) in electrons, one row per P1 reflection (no index
twice), which ``nbsim.inputs.load_inputs`` turns into nanoBragg's dense table.

MTZ (:func:`read_mtz`)
    * The file is recognised by its content (it starts with ``MTZ ``), whatever its name.
    * The column: ``crystal.mtz_column``, one of
        - an ``F`` column (mean amplitudes) or a ``J`` column (mean intensities);
        - an anomalous pair ``PLUS,MINUS`` (two labels, comma-separated): two ``G`` columns
          (F(+), F(-)) or two ``K`` columns (I(+), I(-)); one CCP4-style label ``X(+)`` or ``X(-)``
          of type G or K stands for the pair ``X(+),X(-)``.
      When not given, the only ``F``-type column of the file; several (``FP`` and ``FC`` ...) are
      refused, naming them. Any other type is refused, naming the usable columns.
    * Intensities: F = sqrt(I), as the decimal with the fewest significant digits whose square rounds
      to the stored float32 I (:func:`shortest_root`; within the file's precision of sqrt(I)), so an
      MTZ of float32(F**2) written from a text table gives the table's F. A negative intensity is read
      as F = 0 (a weak reflection; no French-Wilson estimate, which needs the error model of the data),
      and the note counts them.
    * Missing values (MTZ stores NaN) are not listed; nanoBragg then uses ``default_F`` there unless
      a symmetry mate is listed. The note counts them.
    * Expansion to P1 (:func:`expand_to_p1`): every listed reflection is mapped through the rotation
      parts of the MTZ's space-group operations. A mean (F or J) also gives its Friedel mates
      (F(-h) = F(h)). An anomalous pair lists F(+) at h and F(-) at -h, and both are mapped through
      the operations only (a space-group operation keeps a Bijvoet partner's sign: F(+)(h R) = F(+)(h),
      as gemmi's ``Mtz.expand_to_p1`` keeps the columns); a Friedel mate is never filled from its
      partner. A reflection the file lists keeps its own value; an unlisted one takes the
      value of the first listed reflection (file order, F(+) before F(-), then operation order;
      Friedel mates after all symmetry mates) that generates it. A reflection listed twice takes its
      later row (as in a text table). A P1 file that lists every reflection is therefore read as is.
    * MTZ stores 32-bit floats. Each is read as the shortest decimal that rounds to it (what a text
      dump of the file prints, and what ``float32(x)`` came from when ``x`` had at most 7 significant
      digits), then as a float64: an MTZ written from a text table gives the text table's numbers.

Model (:func:`model_structure_factors`)
    * |F(h)| by gemmi's direct summation (the arithmetic of ``gemmi.StructureFactorCalculatorX``:
      IT92 form factors, isotropic/anisotropic B, occupancies, the cell images of every atom of the
      first model), vectorised over atoms x reflections by :func:`model_sf_complex` (a compiled
      kernel, :mod:`nbsim.io.sf_kernel`), for every reflection h != 0 0 0 with d >= ``d_min_A`` in
      the model's cell, systematic absences included (their computed F is ~0). F(0 0 0) is not
      listed (the forward beam; nanoBragg uses ``default_F`` there). gemmi evaluates the form factor
      and the isotropic Debye-Waller factor in float32; so does this (the form factor by gemmi's own
      ``it92.calculate_sf``, the Debye-Waller factor with the C library's ``expf``), so F equals
      gemmi's to float64 rounding (~1e-15 of the largest F), not only to float32's.
    * ``anomalous``: f' and f'' of every element at ``wavelength_A`` (Cromer-Liberman,
      ``gemmi.cromer_liberman``, float64) are added to the form factors: F = sum (f0 + f' + i f'') ...,
      computed as A + i B with A the sum with f0 + f' and B the sum with f'', and
      F(-h) = conj(A) + i conj(B), so F(h) and F(-h) differ (Bijvoet pairs). Without it, F uses f0
      only and F(-h) = F(h).
    * The calculation runs on the reflections of gemmi's reciprocal asymmetric unit (and their
      Friedel mates when anomalous) and is expanded to P1 by :func:`expand_to_p1`; symmetry-equivalent
      reflections have equal |F| (also with anomalous scattering), so this equals the direct
      calculation at every P1 reflection to float rounding.

Every problem is an ``InputFileError`` (a ``ValueError``) whose one-line message starts with the path.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np

from nbsim.frontend.argv import HC_EV_A   # h c in eV A (the energy of a wavelength, for f'/f'')

from .inputs import MAX_TABLE_BYTES, InputFileError, check_regular, gunzip_bounded, read_input_bytes

__all__ = ["MTZ_MAGIC", "MTZ_TYPES", "HC_EV_A", "is_mtz", "expand_to_p1", "read_mtz", "mtz_note", "MtzTable",
           "model_structure_factors", "shortest_float64", "shortest_root", "ColumnError"]

MTZ_MAGIC = b"MTZ "
#: gemmi's denominator of the rotation matrices of its symmetry operations
_DEN = 24


class ColumnError(InputFileError):
    """The MTZ file has no usable amplitude column (the one named, or a single unnamed one)."""


def is_mtz(path) -> bool:
    """Whether the file ``path`` is an MTZ file (its first 4 bytes are ``MTZ ``); False when unreadable
    (the text reader then names the problem). A FIFO, device or directory is never opened."""
    try:
        check_regular(path, MAX_TABLE_BYTES)
        with open(path, "rb") as fh:
            return fh.read(4) == MTZ_MAGIC
    except (OSError, InputFileError):
        return False


def _gemmi():
    try:
        import gemmi
    except ImportError as e:                                    # pragma: no cover - a dependency
        raise InputFileError(f"gemmi is needed to read MTZ and model files ({e}); pip install gemmi") from None
    return gemmi


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _stat_key(path, *extra):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns) + tuple(extra)


class _Cache:
    """The results of the last few reads, per (file identity, arguments); arrays made read-only."""

    def __init__(self, size: int = 4):
        self.size, self.data = size, OrderedDict()

    def get(self, fn, path, *args):
        try:
            key = _stat_key(path, *args)
        except (OSError, TypeError):
            return fn(path, *args)
        hit = self.data.get(key)
        if hit is None:
            hit = fn(path, *args)
            for a in hit:
                if isinstance(a, np.ndarray):
                    a.flags.writeable = False
            self.data[key] = hit
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        else:
            self.data.move_to_end(key)
        return hit


_MTZ_CACHE = _Cache()
_MODEL_CACHE = _Cache()


# ---------------------------------------------------------------------------------------------
# P1 expansion
# ---------------------------------------------------------------------------------------------

def expand_to_p1(hkl, F, rotations, friedel: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Expand reflections to P1 (see the module docstring for the rule on overlaps).

    hkl: int (n, 3); F: float (n,); rotations: int (m, 3, 3), the rotation parts of the space-group
    operations as gemmi gives them (``Op.rot``, integers in units of 1/24; the identity among them),
    acting on row vectors: h' = h R / 24. ``friedel``: also generate -h'.
    Returns (hkl int64 (p, 3), F float64 (p,)): every distinct reflection once, the listed ones first
    in file order, then the symmetry mates (row by row, each in operation order), then the Friedel
    mates of all these."""
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    F = np.asarray(F, dtype=np.float64).reshape(-1)
    R = np.asarray(rotations, dtype=np.int64).reshape(-1, 3, 3)
    others = [r for r in R if not (r == _DEN * np.eye(3, dtype=np.int64)).all()]
    if others:
        mates = np.stack([(hkl @ r) // _DEN for r in others], axis=1)      # (n, m-1, 3): row by row
        gen_hkl = np.concatenate([hkl, mates.reshape(-1, 3)])
        gen_F = np.concatenate([F, np.repeat(F, len(others))])
    else:
        gen_hkl, gen_F = hkl, F
    if friedel:
        all_hkl, all_F = np.concatenate([gen_hkl, -gen_hkl]), np.concatenate([gen_F, gen_F])
    else:
        all_hkl, all_F = gen_hkl, gen_F
    # first occurrence wins: the listed rows come first, in file order
    _, first = np.unique(all_hkl, axis=0, return_index=True)
    first.sort()
    return all_hkl[first], all_F[first]


def _rotations(spacegroup) -> np.ndarray:
    """(m, 3, 3) int rotation parts of a gemmi SpaceGroup's operations."""
    return np.array([op.rot for op in spacegroup.operations().sym_ops], dtype=np.int64)


def shortest_root(i32) -> np.ndarray:
    """sqrt of float32 intensities (>= 0) as float64: per value, the decimal F with the fewest
    significant digits (1 to 17) whose float64 square rounds to the float32 I, then read as a float64.
    This is within the file's precision of sqrt(I) (every such F squares to the stored I), and it is
    the F an intensity was made from as float32(F**2) when F had few digits."""
    i32 = np.asarray(i32, dtype=np.float32)
    root = np.sqrt(i32.astype(np.float64))
    out = root.copy()
    todo = root > 0
    exp10 = np.floor(np.log10(np.where(todo, root, 1.0)))
    for digits in range(1, 18):
        if not todo.any():
            break
        k = exp10 - (digits - 1)                      # round to a multiple of 10**k
        with np.errstate(over="ignore", invalid="ignore"):
            up = np.round(root * 10.0 ** -np.minimum(k, 0)) / 10.0 ** -np.minimum(k, 0)
            down = np.round(root / 10.0 ** np.maximum(k, 0)) * 10.0 ** np.maximum(k, 0)
        cand = np.where(k < 0, up, down)
        hit = todo & ((cand * cand).astype(np.float32) == i32)
        out[hit] = cand[hit]
        todo &= ~hit
    return out


def shortest_float64(x32) -> np.ndarray:
    """float32 values as float64 of their shortest round-tripping decimals (see the module docstring)."""
    a = np.asarray(x32, dtype=np.float32)
    return a.astype(str).astype(np.float64) if a.size else a.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# MTZ
# ---------------------------------------------------------------------------------------------

def _mtz_header_problem(path) -> Optional[str]:
    """Why ``path`` cannot be an MTZ file, judged from its first 20 bytes, or None. The header's
    position (in 4-byte words, in the byte order of the machine stamp; −1: a 64-bit position
    follows) must lie inside the file: gemmi trusts it, and a damaged one made it fill gigabytes
    of memory before failing (14 s for a 184-byte file)."""
    import struct
    if str(path).endswith(".gz"):
        return None                             # (gemmi reads it decompressed; not checked here)
    with open(path, "rb") as f:
        head = f.read(20)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 20 or head[:4] != b"MTZ ":
        return "no MTZ header"
    order = {1: ">", 4: "<"}.get(head[9] >> 4)
    for o in ([order] if order else ["<", ">"]):
        loc = struct.unpack(o + "i", head[4:8])[0]
        if loc == -1:
            loc = struct.unpack(o + "q", head[12:20])[0]
        if 21 <= loc and (loc - 1) * 4 + 80 <= size:
            return None
    return "its header position lies beyond the end of the file"


def _read_mtz_file(path):
    gemmi = _gemmi()
    check_regular(path, MAX_TABLE_BYTES)
    why = _mtz_header_problem(path)
    if why is not None:
        raise InputFileError(f"{path}: not a readable MTZ file ({why})")
    try:
        return gemmi.read_mtz_file(str(path))
    except (RuntimeError, ValueError, OSError, IndexError) as e:
        raise InputFileError(f"{path}: not a readable MTZ file ({_first_line(e)})") from None


#: MTZ column types nbsim reads: mean amplitudes and intensities (one column), and anomalous
#: amplitudes and intensities (a pair F(+), F(-) / I(+), I(-)); intensities become F = sqrt(I)
MTZ_TYPES = {"F": "amplitudes", "J": "intensities", "G": "anomalous amplitudes", "K": "anomalous intensities"}
_PAIRED, _INTENSITY = ("G", "K"), ("J", "K")


class MtzTable(NamedTuple):
    """The P1 table of an MTZ file (:func:`read_mtz`)."""
    hkl: np.ndarray          #: int64 (p, 3)
    F: np.ndarray            #: float64 (p,) amplitudes
    cell: tuple              #: (a, b, c, alpha, beta, gamma) A/deg
    spacegroup: str          #: Hermann-Mauguin name
    label: str               #: the column read, or the pair ``PLUS,MINUS``
    kind: str                #: its MTZ type: F, J, G or K
    missing: int             #: values skipped because missing (NaN)
    negative: int            #: negative intensities read as F = 0


def _usable(mtz) -> str:
    """The columns nbsim can read, as 'LABEL (type)' list, for messages."""
    return ", ".join(f"{c.label} ({c.type})" for c in mtz.columns if c.type in MTZ_TYPES) or "none"


def _partner(label: str) -> Optional[Tuple[str, str]]:
    """The CCP4 anomalous pair of a label: ``X(+)`` / ``X(-)`` -> (``X(+)``, ``X(-)``); else None."""
    for a, b in (("(+)", "(-)"), ("(-)", "(+)")):
        if label.endswith(a):
            pair = (label, label[:-3] + b)
            return pair if a == "(+)" else pair[::-1]
    return None


def _pick_columns(path, mtz, column: Optional[str]):
    """The column(s) named by ``crystal.mtz_column``: one label of type F or J, a pair
    ``PLUS,MINUS`` of type G or K (both the same type), or one ``X(+)``/``X(-)`` label of type G or K
    whose partner the CCP4 name gives. None: the file's only F column. Returns a list of 1 or 2 columns."""
    labels = [c.label for c in mtz.columns]
    amps = [c.label for c in mtz.columns if c.type == "F"]
    accepted = ("accepted: an F (amplitude) or J (intensity) column, or an anomalous pair PLUS,MINUS of "
                "G (F(+),F(-)) or K (I(+),I(-)) columns")
    if column is None:
        if len(amps) == 1:
            return [mtz.column_with_label(amps[0])]
        if not amps:
            raise ColumnError(f"{path}: no amplitude (type F) column among {', '.join(labels) or 'none'}; "
                              f"name one with crystal.mtz_column (-mtz_column); usable: {_usable(mtz)}")
        raise ColumnError(f"{path}: several amplitude (type F) columns ({', '.join(amps)}): choose one "
                          "with crystal.mtz_column (-mtz_column)")
    names = [n.strip() for n in column.split(",")] if "," in column else [column]
    if len(names) > 2 or not all(names):
        raise ColumnError(f"{path}: crystal.mtz_column {column!r} names {len(names)} columns; {accepted}")
    if len(names) == 1:
        col = mtz.column_with_label(names[0])
        if col is not None and col.type in _PAIRED:
            pair = _partner(col.label)
            if pair is None:
                raise ColumnError(f"{path}: column {col.label!r} (crystal.mtz_column) has MTZ type "
                                  f"{col.type!r} ({MTZ_TYPES[col.type]}), one of a pair: name both as "
                                  f"PLUS,MINUS (usable: {_usable(mtz)})")
            names = list(pair)
    cols = []
    for name in names:
        col = mtz.column_with_label(name)
        if col is None:
            raise ColumnError(f"{path}: no column {name!r} (crystal.mtz_column); the file has "
                              f"{', '.join(labels) or 'no columns'}; usable: {_usable(mtz)}")
        cols.append(col)
    types = [c.type for c in cols]
    if len(cols) == 1 and types[0] not in ("F", "J"):
        raise ColumnError(f"{path}: column {cols[0].label!r} (crystal.mtz_column) has MTZ type "
                          f"{types[0]!r}, not F or J; {accepted}; usable: {_usable(mtz)}")
    if len(cols) == 2 and (types[0] != types[1] or types[0] not in _PAIRED or cols[0].label == cols[1].label):
        raise ColumnError(f"{path}: columns {cols[0].label!r}, {cols[1].label!r} (crystal.mtz_column) have "
                          f"MTZ types {types[0]!r}, {types[1]!r}; an anomalous pair is two distinct columns "
                          f"of type G or both of type K; usable: {_usable(mtz)}")
    return cols


def _column_values(path, col, hkl):
    """(listed mask (n,), float64 amplitudes (n,), missing count, negative count) of one column.
    Missing values (NaN) are not listed; an intensity becomes F = sqrt(I) (:func:`shortest_root`);
    a negative intensity gives F = 0."""
    x32 = np.asarray(col.array, dtype=np.float32)
    keep = ~np.isnan(x32)
    bad = keep & ~np.isfinite(x32)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputFileError(f"{path}: column {col.label!r}: {' '.join(str(v) for v in hkl[i])}: "
                             f"{float(x32[i])!r}; values must be finite")
    if col.type in _INTENSITY:
        neg = keep & (x32 < 0)
        F = shortest_root(np.where(keep & ~neg, x32, np.float32(0)))
        return keep, F, int((~keep).sum()), int(neg.sum())
    return keep, shortest_float64(np.where(keep, x32, 0)), int((~keep).sum()), 0


def _last_of_each(hkl, F):
    """The rows of the last occurrence of every hkl (a reflection listed twice: the later row wins, as
    in a text table), in file order."""
    _, last_rev = np.unique(hkl[::-1], axis=0, return_index=True)
    last = np.sort(len(hkl) - 1 - last_rev)
    return hkl[last], F[last]


def _read_mtz(path, column):
    mtz = _read_mtz_file(path)
    cols = _pick_columns(path, mtz, column)
    if mtz.nreflections == 0:
        raise InputFileError(f"{path}: no reflections")
    data = np.asarray(mtz.array)
    hkl = data[:, :3]
    if not np.all(np.isfinite(hkl)) or not np.all(hkl == np.round(hkl)):
        raise InputFileError(f"{path}: Miller indices H, K, L are not all integers")
    hkl = hkl.astype(np.int64)
    sg = mtz.spacegroup
    if sg is None:
        raise InputFileError(f"{path}: no space group in the header")
    values = [_column_values(path, c, hkl) for c in cols]
    label = ",".join(c.label for c in cols)
    if not any(v[0].any() for v in values):
        raise ColumnError(f"{path}: column {label!r} holds no values (all missing)")
    missing, negative = sum(v[2] for v in values), sum(v[3] for v in values)
    if len(cols) == 1:               # a mean: F(-h) = F(h), Friedel's law
        keep, F = values[0][:2]
        rows = _last_of_each(hkl[keep], F[keep])
        hkl_p1, F_p1 = expand_to_p1(*rows, _rotations(sg), friedel=True)
    else:                            # F(+) at h, F(-) at -h; the space group's operations keep the sign
        (kp, Fp), (km, Fm) = values[0][:2], values[1][:2]
        rows = _last_of_each(np.concatenate([hkl[kp], -hkl[km]]), np.concatenate([Fp[kp], Fm[km]]))
        hkl_p1, F_p1 = expand_to_p1(*rows, _rotations(sg), friedel=False)
    cell = mtz.cell
    return MtzTable(hkl_p1, F_p1, (cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma), sg.hm, label,
                    cols[0].type, missing, negative)


def read_mtz(path, column: Optional[str] = None) -> MtzTable:
    """An MTZ column (or anomalous pair) expanded to P1 (see the module docstring), remembered per file."""
    return _MTZ_CACHE.get(_read_mtz, Path(path), column)


def mtz_note(table: MtzTable, name: str) -> str:
    """The one-line note of an MTZ read: what was read from ``name``, how many values were missing and
    how many negative intensities became F = 0."""
    what = {"F": "", "J": " (intensities, F = sqrt(I))", "G": " (anomalous pair F(+), F(-))",
            "K": " (anomalous intensities, F = sqrt(I))"}[table.kind]
    extra = ""
    if table.missing:
        extra += f"; {table.missing} missing values skipped (default_F unless a symmetry mate is given)"
    if table.negative:
        extra += f"; {table.negative} negative intensities read as F = 0"
    return (f"{len(table.F)} structure factors from column {table.label}{what} of {name} "
            f"({table.spacegroup}, expanded to P1{extra})")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def _read_structure(path):
    """A gemmi Structure from a PDB or mmCIF file (by content; gzip allowed)."""
    gemmi = _gemmi()
    raw = read_input_bytes(path, MAX_TABLE_BYTES)
    if raw[:2] == b"\x1f\x8b":
        raw = gunzip_bounded(raw, path, MAX_TABLE_BYTES)
    if b"\0" in raw:
        raise InputFileError(f"{path}: binary data, not a PDB or mmCIF model")
    text = raw.decode("latin-1")
    try:
        if text.lstrip().startswith("data_"):
            st = gemmi.make_structure_from_block(gemmi.cif.read_string(text).sole_block())
        else:
            st = gemmi.read_pdb_string(text)
    except (RuntimeError, ValueError, IndexError) as e:
        raise InputFileError(f"{path}: not a readable PDB or mmCIF model ({_first_line(e)})") from None
    return st


def _model_atoms(path, st):
    if len(st) == 0 or not any(True for _ in st[0].all()):
        raise InputFileError(f"{path}: no atoms in the model")
    if not st.cell.is_crystal():
        raise InputFileError(f"{path}: the model has no unit cell (PDB CRYST1 / mmCIF _cell)")
    if st.find_spacegroup() is None:
        raise InputFileError(f"{path}: unknown space group {st.spacegroup_hm!r}")
    return st[0]


def _model_sf(path, wavelength_A, d_min_A, anomalous):
    gemmi = _gemmi()
    st = _read_structure(path)
    model = _model_atoms(path, st)
    st.setup_cell_images()
    sg = st.find_spacegroup()
    # the reciprocal ASU of the space group, systematic absences included (their F is ~0, not
    # default_F): P1's half sphere (gemmi) filtered by the space group's ASU condition
    half = gemmi.make_miller_array(st.cell, gemmi.SpaceGroup("P 1"), float(d_min_A), 0.0, True)
    half = np.asarray(half, dtype=np.int64).reshape(-1, 3)
    in_asu = gemmi.ReciprocalAsu(sg)
    asu = half[[in_asu.is_in(h) for h in half.tolist()]] if len(half) else half
    asu = asu[np.any(asu != 0, axis=1)]
    if len(asu) == 0:
        raise InputFileError(f"{path}: no reflection with d >= {d_min_A:g} A in the model's cell")
    elements = sorted({cra.atom.element.name for cra in model.all()})
    for name in elements:
        el = gemmi.Element(name)
        if el.atomic_number == 0 or el.it92 is None:
            raise InputFileError(f"{path}: no X-ray form factor for element {name!r} (an atom without a "
                                 "known element)")
    fp = np.zeros(len(elements))
    fdp = np.zeros(len(elements))
    if anomalous:
        energy_eV = HC_EV_A / float(wavelength_A)
        for i, name in enumerate(elements):
            fp[i], fdp[i] = gemmi.cromer_liberman(gemmi.Element(name).atomic_number, energy_eV)
    A, B = model_sf_complex(st, model, elements, asu, fp, fdp)
    if not anomalous:
        hkl_p1, F_p1 = expand_to_p1(asu, np.abs(A), _rotations(sg), friedel=True)
        return hkl_p1, F_p1, st.cell.parameters, sg.hm
    # F(h) = A + iB, F(-h) = conj(A) + i conj(B) (the phases of -h are the conjugates)
    both = np.concatenate([asu, -asu])
    F = np.concatenate([np.abs(A + 1j * B), np.abs(np.conj(A) + 1j * np.conj(B))])
    hkl_p1, F_p1 = expand_to_p1(both, F, _rotations(sg), friedel=False)
    return hkl_p1, F_p1, st.cell.parameters, sg.hm


def _atom_arrays(st, model, elements):
    """Per atom of ``model`` (gemmi's order): element index int64 (na,), occupancy float64 (na,),
    B float32 (na,), anisotropic flag (na,), U* = F U F^T float64 (na, 6), and the fractional
    positions of the atom and its images float64 (na * (1 + ni), 3) with their atom index and rotation,
    computed as gemmi does (``cell.fractionalize``, then ``image.apply``)."""
    index = {name: i for i, name in enumerate(elements)}
    rows = [(index[a.element.name], a.occ, a.b_iso, a.aniso.nonzero(),
             (a.aniso.u11, a.aniso.u22, a.aniso.u33, a.aniso.u12, a.aniso.u13, a.aniso.u23),
             (a.pos.x, a.pos.y, a.pos.z)) for a in (cra.atom for cra in model.all())]
    el = np.array([r[0] for r in rows], np.int64)
    occ = np.array([r[1] for r in rows], np.float32).astype(np.float64)
    b_iso = np.array([r[2] for r in rows], np.float32)
    aniso = np.array([r[3] for r in rows], bool)
    u = np.array([r[4] for r in rows], np.float32).astype(np.float64)
    xyz = np.array([r[5] for r in rows], np.float64)

    def apply(mat, vec, p):
        m = np.asarray(mat.tolist(), np.float64)
        v = np.asarray(vec.tolist(), np.float64)
        return np.stack([m[i, 0] * p[:, 0] + m[i, 1] * p[:, 1] + m[i, 2] * p[:, 2] + v[i] for i in range(3)], 1)

    frac = apply(st.cell.frac.mat, st.cell.frac.vec, xyz)
    F = np.asarray(st.cell.frac.mat.tolist(), np.float64)
    U = np.empty((len(u), 3, 3))
    U[:, 0, 0], U[:, 1, 1], U[:, 2, 2] = u[:, 0], u[:, 1], u[:, 2]
    U[:, 0, 1] = U[:, 1, 0] = u[:, 3]
    U[:, 0, 2] = U[:, 2, 0] = u[:, 4]
    U[:, 1, 2] = U[:, 2, 1] = u[:, 5]
    Us = F @ U @ F.T
    ustar = np.stack([Us[:, 0, 0], Us[:, 1, 1], Us[:, 2, 2], Us[:, 0, 1], Us[:, 0, 2], Us[:, 1, 2]], 1)
    images = list(st.cell.images)
    pos = np.stack([frac] + [apply(im.mat, im.vec, frac) for im in images], 1)          # (na, 1 + ni, 3)
    rot = np.stack([np.eye(3)] + [np.asarray(im.mat.tolist(), np.float64) for im in images])
    na, nimg = len(rows), 1 + len(images)
    return (el, occ, b_iso, aniso, ustar, pos.reshape(-1, 3), np.repeat(np.arange(na), nimg),
            np.tile(rot, (na, 1, 1)))


def model_sf_complex(st, model, elements, hkl, fp, fdp):
    """The complex sums A(h) (form factors f0 + f') and B(h) (f'') of a gemmi Structure ``st`` (its
    cell images set up) and its ``model`` at the reflections ``hkl`` int (n, 3); ``elements`` the
    element names (index of ``fp``/``fdp``, float (ne,)). F(h) = A + i B.

    gemmi's arithmetic (``StructureFactorCalculatorX.calculate_sf_from_model``), vectorised by
    :func:`nbsim.io.sf_kernel.direct_sum`: (sin theta / lambda)^2 rounded to float32, the IT92 form
    factor evaluated by gemmi itself (``Element.it92.calculate_sf``, float32, once per element and
    distinct s), the isotropic Debye-Waller factor in float32 with the C library's expf, charges
    ignored (gemmi's default). Returns (A, B) complex128 (n,)."""
    gemmi = _gemmi()
    from .sf_kernel import direct_sum
    hkl = np.asarray(hkl, np.int64).reshape(-1, 3)
    stol2 = (0.25 * st.cell.calculate_1_d2_array(hkl.astype(np.int32))).astype(np.float32)
    distinct, where = np.unique(stol2, return_inverse=True)
    f0 = np.empty((len(distinct), len(elements)))
    for i, name in enumerate(elements):
        it92 = gemmi.Element(name).it92
        f0[:, i] = [it92.calculate_sf(float(x)) for x in distinct]
    f_el = f0[where.reshape(-1)] + np.asarray(fp, np.float64)
    el, occ, b_iso, aniso, ustar, img_pos, img_atom, img_rot = _atom_arrays(st, model, elements)
    return direct_sum(hkl, stol2, f_el, fdp, img_pos, img_atom, img_rot, el, occ, b_iso, aniso, ustar)


def model_structure_factors(path, wavelength_A: float, d_min_A: float, anomalous: bool = False):
    """|F| of a PDB/mmCIF model for every P1 reflection with d >= ``d_min_A`` (see the module docstring),
    remembered per file and arguments.

    Returns (hkl int64 (p, 3), F float64 (p,) electrons, cell (a, b, c, alpha, beta, gamma), space group)."""
    if not (math.isfinite(d_min_A) and d_min_A > 0):
        raise ValueError(f"d_min must be > 0 A, got {d_min_A!r}")
    return _MODEL_CACHE.get(_model_sf, Path(path), float(wavelength_A), float(d_min_A), bool(anomalous))
