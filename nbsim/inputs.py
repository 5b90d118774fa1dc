"""All file reading of an experiment, in one place: ``load_inputs(spec, base_dir) -> Inputs``.

The setup (``nbsim.experiment.build_model``) reads no file itself: it takes the ``Inputs`` (loaded here
when not given), so a fitting loop or a sweep loads its HKL table (text or MTZ, or the structure
factors of a model: ``nbsim.io.structure_factors``), matrix, source list and mask once and resolves
many experiments from them. Writing the ``Fdump`` cache is the nanoBragg front end's
business (``write_fdump_cache``), not the engine's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from nbsim.spec import ExperimentSpec, SpecError
from nbsim.units import mm_to_m


@dataclass(frozen=True)
class StructureFactors:
    """A dense structure-factor table as read from a file.

    ranges: (h_min, h_max, k_min, k_max, l_min, l_max); dense: float64 (h, k, l) amplitudes with
    unlisted entries 0; listed: bool (h, k, l), the entries the file gives (None for an Fdump cache,
    which lists every entry); count: nanoBragg's "initialized hkls"; source: the file's path."""
    ranges: Tuple[int, int, int, int, int, int]
    dense: np.ndarray
    listed: Optional[np.ndarray]
    count: int
    source: Path
    from_fdump: bool = False

    def filled(self, default_F: float) -> np.ndarray:
        """The table with unlisted entries set to ``default_F`` (what C fills them with)."""
        if self.listed is None:
            return self.dense
        return np.where(self.listed, self.dense, default_F)


@dataclass(frozen=True)
class Inputs:
    """Everything an experiment reads from files (None where the spec names no file)."""
    matrix: Optional[np.ndarray] = None                  # (3, 3) MOSFLM A matrix (columns a*, b*, c* × λ)
    structure_factors: Optional[StructureFactors] = None
    sources: Optional[np.ndarray] = None                 # (n, 5) X Y Z I λ, NaN for missing values
    source_lines: Tuple[int, ...] = ()                   # the file line of each source (for messages)
    mask: Optional[np.ndarray] = None                    # (slow, fast) SMV mask image
    geometry: Optional[object] = None                    # nbsim.io.geom.GeometryFile (detector.geometry_file)
    notes: Tuple[str, ...] = field(default_factory=tuple)   # one-line remarks for the run's warnings


def _path(base_dir, name, key) -> Path:
    p = Path(name)
    if not p.is_absolute():
        p = Path(base_dir) / p
    if not p.exists():
        raise SpecError(key, f"file not found: {p}")
    return p


def _read(key: str, reader, path: Path, given: str, column_key: Optional[str] = None):
    """``reader(path)``; a reader's one-line error (bad number, binary, FIFO, too large, ...) or an
    unreadable file becomes ``SpecError(key, ...)`` naming the file as the user gave it (an MTZ
    column problem, ``ColumnError``, names ``column_key`` when given)."""
    from nbsim.io.inputs import InputFileError
    try:
        return reader(path)
    except (InputFileError, ValueError, OverflowError) as e:
        if isinstance(e, SpecError):
            raise
        if column_key is not None:
            from nbsim.io.structure_factors import ColumnError
            if isinstance(e, ColumnError):
                key = column_key
        msg = str(e)
        raise SpecError(key, msg.replace(str(path), given) if str(path) != given else msg) from None
    except OSError as e:
        raise SpecError(key, f"{given}: cannot read ({e.strerror or e})") from None


#: relative difference of cell edges (and degrees of angles) above which a note says that the cell of
#: an MTZ or model file differs from the simulated one
CELL_NOTE_TOLERANCE = 0.01
#: the reflections computed from a model reach this many reciprocal-cell edges beyond the detector's
#: edge (the tricubic interpolation reads 2 neighbours; rounding to the nearest hkl reaches 1/2)
MODEL_DMIN_MARGIN_CELLS = 2.0


def _sf_from_table(hkl, F, path) -> StructureFactors:
    """The dense table of (n, 3) ``hkl`` and (n,) ``F`` (``nbsim.io.tables.hkl_table``); the count
    of "initialized hkls" is n (the lines of a text table, the P1 reflections of an MTZ or model)."""
    from nbsim.io.tables import hkl_table
    ranges, dense = hkl_table(hkl, F, 0.0)
    listed = hkl_table(hkl, np.ones(len(F)), 0.0)[1] != 0
    return StructureFactors(ranges, dense, listed, len(F), path)


def _recip_lengths_per_A(spec: ExperimentSpec, matrix) -> np.ndarray:
    """|a*|, |b*|, |c*| (1/A) of the simulated cell (from the cell or the MOSFLM matrix / lambda)."""
    c = spec.crystal
    if c.cell_A_deg is not None:
        import gemmi
        r = gemmi.UnitCell(*[float(x) for x in c.cell_A_deg]).reciprocal()
        return np.array([r.a, r.b, r.c])
    return np.linalg.norm(np.asarray(matrix, float) / spec.beam.wavelength_A, axis=0)


def detector_dmin_A(spec: ExperimentSpec, sources=None) -> float:
    """The smallest d spacing (A) the detector records: its largest scattering angle 2theta (over the
    corners of the detector, one pixel beyond each edge) at the shortest wavelength of the beam
    (dispersion, source file). A curved detector's 2theta is bounded by the sum of its two arc angles."""
    from nbsim import quirks
    from nbsim.geometry import detector_geometry
    b = spec.beam
    rep = detector_geometry(spec.detector, b, spec.crystal, quirks=quirks.of(spec)).report
    px = mm_to_m(rep.pixel_mm)
    pix0, fdet, sdet, beam = (np.asarray(v, float) for v in (rep.pix0_m, rep.fdet, rep.sdet, rep.beam))
    fs = (-1.0, rep.fpixels + 1.0)
    ss = (-1.0, rep.spixels + 1.0)
    corners = np.array([pix0 + f * px * fdet + s * px * sdet for f in fs for s in ss])     # (4, 3) m
    if spec.detector.curved:
        dist = mm_to_m(abs(rep.distance_mm))
        arc = (np.abs(corners @ fdet - (dist * beam) @ fdet).max()
               + np.abs(corners @ sdet - (dist * beam) @ sdet).max()) / dist
        two_theta = min(math.pi, arc)
    else:
        cos2t = (corners @ beam) / np.linalg.norm(corners, axis=1)
        two_theta = float(np.arccos(np.clip(cos2t, -1.0, 1.0)).max())
    lam = b.wavelength_A * (1.0 - b.dispersion_pct / 200.0)
    if sources is not None:
        lams = sources[:, 4][np.isfinite(sources[:, 4])] * 1e10
        if lams.size:
            lam = min(lam, float(lams.min()))
    s = math.sin(two_theta / 2.0)
    return lam / (2.0 * s) if s > 0 else math.inf


def model_dmin_A(spec: ExperimentSpec, matrix=None, sources=None) -> float:
    """d_min (A) of the reflections computed from ``crystal.model_file``: ``crystal.model_dmin_A``, or
    the detector's (``detector_dmin_A``) reached out by ``MODEL_DMIN_MARGIN_CELLS`` reciprocal-cell
    edges of the simulated cell."""
    if spec.crystal.model_dmin_A is not None:
        return float(spec.crystal.model_dmin_A)
    d = detector_dmin_A(spec, sources)
    margin = MODEL_DMIN_MARGIN_CELLS * float(_recip_lengths_per_A(spec, matrix).max())
    return 1.0 / ((0.0 if math.isinf(d) else 1.0 / d) + margin)


def _cell_note(spec: ExperimentSpec, cell, what: str) -> tuple:
    """A note when ``cell`` (a, b, c, al, be, ga) differs from ``crystal.cell_A_deg``."""
    given = spec.crystal.cell_A_deg
    if given is None:
        return ()
    lengths = all(abs(x - y) <= CELL_NOTE_TOLERANCE * y for x, y in zip(cell[:3], given[:3]))
    angles = all(abs(x - y) <= 100 * CELL_NOTE_TOLERANCE for x, y in zip(cell[3:], given[3:]))
    if lengths and angles:
        return ()
    return (f"the cell of {what} ({' '.join(f'{x:g}' for x in cell)}) differs from crystal.cell_A_deg "
            f"({' '.join(f'{float(x):g}' for x in given)}); the indices are used as they are",)


def structure_factor_rows(spec: ExperimentSpec, base_dir=".", matrix=None, sources=None):
    """The reflections of ``crystal.model_file`` or ``crystal.hkl_file`` (text table or MTZ), before
    they become a dense table: ``(key, path, hkl int64 (n, 3), F float64 (n,), notes)``, or None when
    the spec names neither. ``matrix``/``sources``: the MOSFLM matrix and source list already read
    (a model's d_min needs them). Readers' errors (``InputFileError``) name the file."""
    c = spec.crystal
    if c.model_file is not None:
        from nbsim.io.structure_factors import model_structure_factors
        path = _path(base_dir, c.model_file, "crystal.model_file")
        dmin = model_dmin_A(spec, matrix, sources)
        hkl, F, cell, sg = _read("crystal.model_file", lambda p: model_structure_factors(
            p, spec.beam.wavelength_A, dmin, c.model_anomalous), path, c.model_file)
        note = (f"{len(F)} structure factors computed from {c.model_file} ({sg}, d >= {dmin:.4g} A"
                + (f", f' f'' at {spec.beam.wavelength_A:g} A" if c.model_anomalous else "") + ")",)
        return "crystal.model_file", path, hkl, F, note + _cell_note(spec, cell, c.model_file)
    if c.hkl_file is not None:
        from nbsim.io.structure_factors import is_mtz, mtz_note, read_mtz
        path = _path(base_dir, c.hkl_file, "crystal.hkl_file")
        if is_mtz(path):
            t = _read("crystal.hkl_file", lambda p: read_mtz(p, c.mtz_column), path,
                      c.hkl_file, column_key="crystal.mtz_column" if c.mtz_column else None)
            return "crystal.hkl_file", path, t.hkl, t.F, (mtz_note(t, c.hkl_file),) + _cell_note(spec, t.cell, c.hkl_file)
        if c.mtz_column is not None:
            raise SpecError("crystal.mtz_column", f"{c.hkl_file} is not an MTZ file (a text table has no columns)")
        from nbsim.io.tables import read_hkl
        hkl, F = _read("crystal.hkl_file", read_hkl, path, c.hkl_file)
        return "crystal.hkl_file", path, hkl, F, ()
    return None


def _structure_factors(spec: ExperimentSpec, base_dir, matrix=None,
                       sources=None) -> Tuple[Optional[StructureFactors], tuple]:
    c = spec.crystal
    rows = structure_factor_rows(spec, base_dir, matrix, sources)
    if rows is not None:
        key, path, hkl, F, notes = rows
        from nbsim.checks import check_hkl_ranges
        check_hkl_ranges(key, c.model_file if c.model_file is not None else c.hkl_file, hkl)  # before the dense table
        return _sf_from_table(hkl, F, path), notes
    if c.fdump_file is not None and (Path(base_dir) / c.fdump_file).exists():
        from nbsim.io.tables import read_fdump
        path = Path(base_dir) / c.fdump_file
        ranges, dense = _read("crystal.fdump_file", read_fdump, path, c.fdump_file)
        hr, kr, lr = ranges[1] - ranges[0] + 1, ranges[3] - ranges[2] + 1, ranges[5] - ranges[4] + 1
        dense = np.asarray(dense)[:hr, :kr, :lr]
        return (StructureFactors(ranges, dense, None, hr * kr * lr, path, from_fdump=True),
                (f"reading structure factors from {c.fdump_file} (no hkl file given)",))
    return None, ()


def load_matrix(spec: ExperimentSpec, base_dir=".") -> Optional[np.ndarray]:
    """``crystal.matrix_file`` as (3, 3) float64 (None without one): the one reader of the matrix
    (``load_inputs``; the size estimate when it is not handed the matrix)."""
    c = spec.crystal
    if c.matrix_file is None:
        return None
    from nbsim.io.tables import read_matrix
    path = _path(base_dir, c.matrix_file, "crystal.matrix_file")
    return np.asarray(_read("crystal.matrix_file", read_matrix, path, c.matrix_file), float)


def crystal_from_geometry(spec: ExperimentSpec, geometry) -> bool:
    """True when the run's crystal is the one of ``geometry`` (an ``.expt``'s real_space_a/b/c): the
    file has one and the spec gives neither ``crystal.cell_A_deg`` nor ``crystal.matrix_file`` (the
    user's own cell or matrix takes precedence)."""
    c = spec.crystal
    return (geometry is not None and geometry.crystal_axes_A is not None
            and c.cell_A_deg is None and c.matrix_file is None)


def geometry_crystal(spec: ExperimentSpec, geometry, matrix):
    """(matrix, notes): the MOSFLM A matrix of the geometry file's crystal at the run's wavelength
    (the file's beam, else ``beam.wavelength_A``) when it is the run's crystal
    (``crystal_from_geometry``), else ``matrix`` unchanged, with a note when the file's crystal is
    not used. Without any crystal: ``SpecError`` naming crystal.cell_A_deg."""
    c, d = spec.crystal, spec.detector
    if crystal_from_geometry(spec, geometry):
        from nbsim.crystal import mosflm_matrix
        wavelength_A = geometry.wavelength_A if geometry.wavelength_A is not None else spec.beam.wavelength_A
        return mosflm_matrix(*geometry.crystal_axes_A, wavelength_A).numpy(), ()
    if c.cell_A_deg is None and c.matrix_file is None:
        raise SpecError("crystal.cell_A_deg", "a unit cell is required: give crystal.cell_A_deg, "
                        f"crystal.matrix_file or a .expt with a crystal ({d.geometry_file} has none)")
    if geometry.crystal_axes_A is not None:
        given = "crystal.cell_A_deg" if c.cell_A_deg is not None else "crystal.matrix_file"
        return matrix, (f"the crystal of {d.geometry_file} (real_space_a/b/c) is not used: {given} "
                        "is given and takes precedence",)
    return matrix, ()


def load_inputs(spec: ExperimentSpec, base_dir=".") -> Inputs:
    """Read every file ``spec`` names (relative paths from ``base_dir``), each once, through the
    bounded readers of ``nbsim.io``. A missing or malformed file is a one-line ``SpecError`` naming
    the key, and the file and line as the user gave them. The values are checked by
    ``nbsim.checks.check_inputs`` (the preflight), which takes the ``Inputs`` this returns."""
    b, d = spec.beam, spec.detector
    matrix = load_matrix(spec, base_dir)
    sources, source_lines = None, ()
    if b.source_file is not None:
        from nbsim.io.tables import read_sourcefile_lines
        path = _path(base_dir, b.source_file, "beam.source_file")
        rows, lines = _read("beam.source_file", read_sourcefile_lines, path, b.source_file)
        sources, source_lines = np.asarray(rows, float).reshape(-1, 5), tuple(lines)
        if len(sources) == 0:
            raise SpecError("beam.source_file", f"no sources in {b.source_file}")
    geometry, geometry_notes = None, ()
    if d.geometry_file is not None:       # first: an .expt's crystal is the matrix of the steps below
        from nbsim.io.geom import read_geometry
        path = _path(base_dir, d.geometry_file, "detector.geometry_file")
        geometry = _read("detector.geometry_file", read_geometry, path, d.geometry_file)
        matrix, geometry_notes = geometry_crystal(spec, geometry, matrix)
        from nbsim.panels import sensor_from_geometry
        geometry_notes += sensor_from_geometry(spec, geometry)[1]
    sf, notes = _structure_factors(spec, base_dir, matrix, sources)
    notes = tuple(notes) + geometry_notes
    mask = None
    if d.mask_file is not None:
        from nbsim.io.smv import read_smv
        path = _path(base_dir, d.mask_file, "detector.mask_file")
        _, mask = _read("detector.mask_file", read_smv, path, d.mask_file)
    return Inputs(matrix=matrix, structure_factors=sf, sources=sources, source_lines=source_lines, mask=mask,
                  geometry=geometry,
                  notes=notes)


def write_fdump_cache(spec: ExperimentSpec, inputs: Inputs, base_dir=".") -> Optional[Path]:
    """nanoBragg's ``Fdump`` cache of a table read from an HKL file (what the C program writes
    before it simulates): ``spec.crystal.fdump_file`` under ``base_dir``, or nothing."""
    sf = inputs.structure_factors
    if spec.crystal.fdump_file is None or sf is None or sf.from_fdump:
        return None
    from nbsim.io.tables import write_fdump
    path = Path(base_dir) / spec.crystal.fdump_file
    write_fdump(path, sf.ranges, sf.filled(spec.crystal.default_F))
    return path
