"""All file reading of an experiment, in one place: ``load_inputs(spec, base_dir) -> Inputs``.

The setup (``nbsim.experiment.build_model``) reads no file itself: it takes the ``Inputs`` (loaded here
when not given), so a fitting loop or a sweep loads its HKL table, matrix, source list and mask once
and resolves many experiments from them. Writing the ``Fdump`` cache is the nanoBragg front end's
business (``write_fdump_cache``), not the engine's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from nbsim.spec import ExperimentSpec, SpecError


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


def _structure_factors(spec: ExperimentSpec, base_dir) -> Tuple[Optional[StructureFactors], tuple]:
    c = spec.crystal
    if c.hkl_file is not None:
        from nbsim.io.tables import hkl_table, read_hkl
        path = _path(base_dir, c.hkl_file, "crystal.hkl_file")
        hkl, F = read_hkl(path)
        ranges, dense = hkl_table(hkl, F, 0.0)
        listed = hkl_table(hkl, np.ones(len(F)), 0.0)[1] != 0
        return StructureFactors(ranges, dense, listed, len(F), path), ()
    if c.fdump_file is not None and (Path(base_dir) / c.fdump_file).exists():
        from nbsim.io.tables import read_fdump
        path = Path(base_dir) / c.fdump_file
        ranges, dense = read_fdump(path)
        hr, kr, lr = ranges[1] - ranges[0] + 1, ranges[3] - ranges[2] + 1, ranges[5] - ranges[4] + 1
        dense = np.asarray(dense)[:hr, :kr, :lr]
        return (StructureFactors(ranges, dense, None, hr * kr * lr, path, from_fdump=True),
                (f"reading structure factors from {c.fdump_file} (no hkl file given)",))
    return None, ()


def load_inputs(spec: ExperimentSpec, base_dir=".") -> Inputs:
    """Read every file ``spec`` names (relative paths from ``base_dir``); ``SpecError`` names the key
    of a missing file, the readers' errors name the file and line."""
    c, b, d = spec.crystal, spec.beam, spec.detector
    matrix = None
    if c.matrix_file is not None:
        from nbsim.io.tables import read_matrix
        matrix = np.asarray(read_matrix(_path(base_dir, c.matrix_file, "crystal.matrix_file")), float)
    sf, notes = _structure_factors(spec, base_dir)
    sources = None
    if b.source_file is not None:
        from nbsim.io.tables import read_sourcefile
        sources = np.asarray(read_sourcefile(_path(base_dir, b.source_file, "beam.source_file")), float)
        if len(sources) == 0:
            raise SpecError("beam.source_file", f"no sources in {b.source_file}")
    mask = None
    if d.mask_file is not None:
        from nbsim.io.smv import read_smv
        _, mask = read_smv(_path(base_dir, d.mask_file, "detector.mask_file"))
    geometry = None
    if d.geometry_file is not None:
        from nbsim.io.geom import read_geometry
        from nbsim.io.inputs import InputFileError
        try:
            geometry = read_geometry(_path(base_dir, d.geometry_file, "detector.geometry_file"))
        except InputFileError as e:
            raise SpecError("detector.geometry_file", str(e)) from None
    return Inputs(matrix=matrix, structure_factors=sf, sources=sources, mask=mask, geometry=geometry,
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
