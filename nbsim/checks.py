"""Checks around a simulation: what cannot be simulated is refused in one line before anything runs,
and an image that overflowed is refused before it is written.

Both entry points (the nanoBragg front end ``nbsim.nanobragg`` and the Hydra app's store
``pipeline.store``) call :func:`preflight` on a validated ``ExperimentSpec`` before they hash,
simulate or write anything, and :func:`check_image` on the result before writing it. Every problem
is a ``SpecError(key, message)`` naming the spec key (the front end maps keys back to its flags):

* **input files** (:func:`check_inputs`): each file the run reads (HKL table, Fdump cache, MOSFLM
  matrix, source list, SMV mask) is read through the bounded readers of ``nbsim.io`` (regular files
  only: a FIFO or ``/dev/zero`` is refused from its ``stat``), then its values are checked: finite
  numbers, a dense HKL table that fits, a non-singular orientation matrix, positive source
  wavelengths, no source at the sample position, a mask of the detector's size;
* **geometry** (:func:`check_geometry`): the beam must cross the detector plane, the plane must not
  pass through the sample, dispersion must keep every wavelength > 0, the divergence grid must
  select a source, the ROI must select pixels (negative ROI bounds mean "the whole detector", as in
  C; :func:`normalize_roi`);
* **size** (:func:`estimate`, :func:`check_size`): memory and time are estimated from the resolved
  sample counts (pixels x sensor layers x sub-pixels x sources x phi steps x mosaic domains) and the
  run is refused, with the estimate, when it needs more memory than the machine has, when one
  pixel's working set exceeds ``device.memory_budget_mb``, or when the time exceeds
  ``device.time_limit_s``;
* **overflow** (:func:`check_image`): an image holding NaN or inf (``-fluence 1e300``) is refused.

The checks read the spec and the same resolution functions the model builder uses
(``nbsim.geometry.detector_geometry``, ``nbsim.sampling.resolve_*``); none of this is on the
differentiable path.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from nbsim import quirks
from nbsim.spec import DeviceSpec, ExperimentSpec, SpecError
from nbsim.units import angstrom_to_m, deg_to_rad, mm_to_m

__all__ = ["Estimate", "check_geometry", "check_image", "check_inputs", "check_size", "estimate",
           "normalize_roi", "preflight"]

#: largest dense structure-factor table accepted (bytes of float64); a +-100 cube is 64 MB
MAX_HKL_TABLE_BYTES = 2 * 2 ** 30
#: |cos| between the beam and the detector normal below which the beam misses the detector plane
MIN_BEAM_NORMAL_COS = 1e-6
#: sample-to-detector-plane distance (m) below which the plane passes through the sample
MIN_CLOSE_DISTANCE_M = 1e-12
#: samples (pixel x layer x sub-pixel x source x phi x domain) per second assumed for time estimates;
#: CPU measured: 1e8 samples (32x32 pixels x 1e5 mosaic domains) in 36 s on 2 loaded cores
SAMPLES_PER_S = {"cpu": 3.0e6, "cuda": 1.0e9, "mps": 1.0e8}
#: seconds per mosaic domain of the (Python) domain generator (measured 8.6 us)
SETUP_S_PER_DOMAIN = 1.0e-5
#: memory per crystal orientation (phi step x mosaic domain), measured as the growth of the peak RSS
#: of ``nbsim.nanobragg`` on 32x32 pixels, float64, CPU: 3.2 KB per domain (1e5 domains), 2.6 KB per
#: phi step (2e4 steps); and 100 KB per phi step when the faithful phi carry-over (quirk 4) renders a
#: separate first iteration (phi starting at exactly 0: 1e4 and 2e4 steps)
ORIENT_BYTES = 3.5e3
ORIENT_BYTES_FIRST_ITERATION = 1.0e5


def _first_given(obj_key_pairs, default: str) -> str:
    """The first spec key whose value is set (not None, not 0/False), else ``default``."""
    for value, key in obj_key_pairs:
        if value not in (None, 0, 0.0, False):
            return key
    return default


# ---------------------------------------------------------------------------------------------
# input files
# ---------------------------------------------------------------------------------------------

def _resolve(base_dir, name) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def check_hkl_ranges(key: str, name: str, hkl: np.ndarray) -> None:
    """Refuse Miller indices whose dense table would exceed ``MAX_HKL_TABLE_BYTES``."""
    lo, hi = hkl.min(axis=0), hkl.max(axis=0)
    cells = int(np.prod((hi - lo + 1).astype(object)))
    if 8 * cells > MAX_HKL_TABLE_BYTES:
        raise SpecError(key, f"{name}: Miller indices span h {lo[0]}..{hi[0]}, k {lo[1]}..{hi[1]}, "
                        f"l {lo[2]}..{hi[2]}: a dense table of {_bytes(8 * cells)}, more than the "
                        f"{_bytes(MAX_HKL_TABLE_BYTES)} accepted")


def check_matrix(key: str, name: str, M: np.ndarray) -> None:
    """Refuse a singular (or numerically singular) MOSFLM matrix; columns are a*, b*, c* (x lambda)."""
    norms = np.linalg.norm(M, axis=0)
    det = float(np.linalg.det(M))
    if not (norms > 0).all() or abs(det) <= 1e-9 * float(np.prod(norms)):
        raise SpecError(key, f"{name}: the orientation matrix is singular (det = {det:g}): its columns "
                        "a*, b*, c* must be linearly independent")


def check_inputs(spec: ExperimentSpec, base_dir=".", beam_dir=None, inputs=None) -> dict:
    """Check every input file ``spec`` names (see the module docstring).

    ``inputs``: the files already read (``nbsim.inputs.load_inputs``, the one reader of input files;
    read here when not given). ``beam_dir``: unit vector of the beam (lab frame, from the geometry)
    used to place the default source positions of a source file; None skips the "source at the
    sample" test. Returns ``{'sources': n or None, 'hkl_cells': n or None, 'F_max': ...,
    'inputs': Inputs}`` for the size estimate and the run."""
    from nbsim.inputs import load_inputs
    d, b, c = spec.detector, spec.beam, spec.crystal
    if inputs is None:
        inputs = load_inputs(spec, base_dir)
    out = {"sources": None, "hkl_cells": None, "F_max": None, "inputs": inputs}
    sf = inputs.structure_factors
    if sf is not None:
        r = sf.ranges
        out["hkl_cells"] = (r[1] - r[0] + 1) * (r[3] - r[2] + 1) * (r[5] - r[4] + 1)
        out["F_max"] = float(np.abs(sf.dense).max()) if sf.dense.size else 0.0
    if inputs.matrix is not None:
        check_matrix("crystal.matrix_file", c.matrix_file, inputs.matrix)
    if inputs.sources is not None:
        name = b.source_file
        for (X, Y, Z, _I, lam), ln in zip(inputs.sources, inputs.source_lines):
            if not math.isnan(lam) and not lam > 0:
                raise SpecError("beam.source_file", f"{name}:{ln}: wavelength {lam:g} m must be > 0")
            if beam_dir is not None:
                pos = [-10.0 * float(beam_dir[i]) if math.isnan(v) else v for i, v in enumerate((X, Y, Z))]
                if all(v == 0.0 for v in pos):
                    raise SpecError("beam.source_file", f"{name}:{ln}: source at the sample position "
                                    "(0, 0, 0) has no direction")
        out["sources"] = len(inputs.sources)
    if inputs.mask is not None:
        from nbsim.geometry import resolve_pixels
        fpix, spix = resolve_pixels(d)[:2]
        if inputs.mask.shape != (spix, fpix):
            raise SpecError("detector.mask_file", f"{d.mask_file}: mask is {inputs.mask.shape[1]}x"
                            f"{inputs.mask.shape[0]} pixels, detector is {fpix}x{spix}")
    return out


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------

def resolve_roi(d) -> Optional[list]:
    """C's ROI rule for ``DetectorSpec`` ``d``: a negative bound means "not given" (xmin, ymin -> 0;
    xmax -> fpixels, ymax -> spixels, as C sets them); None without an ROI. Refuses an ROI that
    selects no pixel of the detector."""
    if d.roi is None:
        return None
    from nbsim.geometry import resolve_pixels
    fpix, spix = resolve_pixels(d)[:2]
    xmin, xmax, ymin, ymax = (int(v) for v in d.roi)
    xmin, ymin = max(xmin, 0), max(ymin, 0)
    xmax = fpix if xmax < 0 else xmax
    ymax = spix if ymax < 0 else ymax
    if xmin > fpix - 1 or ymin > spix - 1:
        raise SpecError("detector.roi", f"{list(d.roi)} selects no pixel of the {fpix}x{spix} detector "
                        f"(fast 0..{fpix - 1}, slow 0..{spix - 1})")
    if xmin > xmax or ymin > ymax:
        raise SpecError("detector.roi", f"needs xmin <= xmax and ymin <= ymax, got {list(d.roi)}")
    return [xmin, xmax, ymin, ymax]


def normalize_roi(spec: ExperimentSpec) -> None:
    """``resolve_roi`` in place (the entry points store the resolved ROI in the spec they hash)."""
    spec.detector.roi = resolve_roi(spec.detector)


def _count_divergence(hdiv, vdiv, round_div: bool) -> int:
    """Divergence points ``make_sources`` keeps (its round_div test), counted without tensors;
    beyond 4M candidate points the unfiltered count (an upper bound) is returned."""
    from nbsim.sampling import _div2
    hsteps, hrange, hstep = hdiv
    vsteps, vrange, vstep = vdiv
    if not round_div or hsteps * vsteps > 4_000_000:
        return hsteps * vsteps
    n = 0
    for i in range(hsteps):
        h = hstep * i - hrange / 2.0
        th = _div2(h * h - hstep * hstep / 4.0 * (1 - hsteps % 2), hrange)
        for j in range(vsteps):
            v = vstep * j - vrange / 2.0
            test = th + _div2(v * v - vstep * vstep / 4.0 * (1 - vsteps % 2), vrange)
            if not test * 4.0 > 1.1:
                n += 1
    return n


def _sampling(spec: ExperimentSpec):
    """(hdiv, vdiv, disp) as ``nbsim.sampling`` resolves them (rad, rad, fraction)."""
    from nbsim.sampling import resolve_dispersion, resolve_divergence
    b = spec.beam
    mrad = lambda v: None if v is None else v * 1e-3  # noqa: E731
    hdiv = resolve_divergence(mrad(b.hdivrange_mrad), mrad(b.hdivstep_mrad), b.hdivsteps)
    vdiv = resolve_divergence(mrad(b.vdivrange_mrad), mrad(b.vdivstep_mrad), b.vdivsteps)
    disp = resolve_dispersion(b.dispersion_pct / 100.0, b.dispsteps)
    return hdiv, vdiv, disp


_CHECKED_GEOMETRY: dict = {}     # repr of (detector, beam, spindle axis, quirks) -> report
_CHECKED_GEOMETRY_MAX = 256


def check_geometry(spec: ExperimentSpec):
    """Refuse geometry that cannot be simulated; return the resolved geometry's report
    (``nbsim.report.DetectorReport``). A spec whose geometry was checked before (same detector,
    beam, spindle axis and quirks, compared by value; the spindle axis is ``detector_geometry``'s
    one crystal setting) gets the same report without resolving it again: a sweep point is checked
    by the preflight, its group key and its compile decision, and the points of a grid over the
    crystal share their detector."""
    key = repr((spec.detector, spec.beam, spec.crystal.spindle_axis, quirks.of(spec)))
    rep = _CHECKED_GEOMETRY.get(key)
    if rep is None:
        rep = _check_geometry(spec)
        if len(_CHECKED_GEOMETRY) >= _CHECKED_GEOMETRY_MAX:
            _CHECKED_GEOMETRY.clear()                   # (a sweep's few geometries at a time)
        _CHECKED_GEOMETRY[key] = rep
    return rep


def _check_geometry(spec: ExperimentSpec):
    from nbsim.geometry import detector_geometry
    d, b, c = spec.detector, spec.beam, spec.crystal
    try:
        geo = detector_geometry(d, b, c, quirks=quirks.of(spec))
    except (ZeroDivisionError, OverflowError, ValueError) as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError("detector.convention", f"the detector geometry cannot be resolved ({e})") from None
    rep = geo.report
    orient_key = _first_given(
        [(b.beam_vector, "beam.beam_vector"), (d.odet_vector, "detector.odet_vector"),
         (d.twotheta_deg, "detector.twotheta_deg"), (d.rotx_deg, "detector.rotx_deg"),
         (d.roty_deg, "detector.roty_deg"), (d.rotz_deg, "detector.rotz_deg"),
         (d.fdet_vector, "detector.fdet_vector"), (d.sdet_vector, "detector.sdet_vector")],
        "detector.convention")
    vecs = [rep.fdet, rep.sdet, rep.odet, rep.beam, rep.pix0_m]
    if not all(math.isfinite(x) for v in vecs for x in v):
        raise SpecError(orient_key, "the detector geometry is undefined (NaN): fdet and sdet must not be "
                        "parallel")
    cos = sum(x * y for x, y in zip(rep.beam, rep.odet))
    if abs(cos) < MIN_BEAM_NORMAL_COS:
        raise SpecError(orient_key, "the beam is parallel to the detector plane (beam . detector normal = "
                        f"{cos:.3g}): it never reaches the detector")
    close_m = sum(x * y for x, y in zip(rep.pix0_m, rep.odet))
    if not abs(close_m) > MIN_CLOSE_DISTANCE_M:
        key = _first_given([(d.close_distance_mm, "detector.close_distance_mm"),
                            (d.pix0_vector_mm, "detector.pix0_vector_mm")], "detector.distance_mm")
        raise SpecError(key, f"the detector plane passes through the sample (sample-to-plane distance "
                        f"{close_m * 1e3:.3g} mm)")
    hdiv, vdiv, disp = _sampling(spec)
    dsteps, dfrac, dstep = disp
    lam_min = b.wavelength_A * min(1.0 + dstep * k - dfrac / 2.0 for k in (0, dsteps - 1))
    if not lam_min > 0:
        raise SpecError("beam.dispersion_pct", f"a dispersion of {b.dispersion_pct:g}% makes the shortest "
                        f"wavelength {lam_min:g} A; every wavelength must be > 0 (dispersion < 200%)")
    if b.source_file is None and _count_divergence(hdiv, vdiv, b.round_div) == 0:
        key = _first_given([(b.hdivsteps, "beam.hdivsteps"), (b.vdivsteps, "beam.vdivsteps"),
                            (b.hdivstep_mrad, "beam.hdivstep_mrad")], "beam.hdivrange_mrad")
        raise SpecError(key, f"the divergence grid ({hdiv[0]} x {vdiv[0]} steps over {hdiv[1] * 1e3:g} x "
                        f"{vdiv[1] * 1e3:g} mrad, round) selects no source; give a divergence range "
                        "with more steps")
    return rep


# ---------------------------------------------------------------------------------------------
# size
# ---------------------------------------------------------------------------------------------

def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.3g} EiB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    if s < 172800:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


@dataclass
class Estimate:
    """Resolved sample counts and the memory/time they need (an estimate, not a measurement)."""
    fpixels: int
    spixels: int
    pixels: int            # simulated (ROI)
    thicksteps: int
    oversample: int
    sources: int
    phisteps: int
    mosaic_domains: int
    samples_per_pixel: int
    fixed_bytes: float     # image buffers, orientation tables, structure-factor table
    chunk_min_bytes: float  # working set of one pixel (the smallest chunk)
    seconds: float
    inputs: object = None   # nbsim.inputs.Inputs: the files as the preflight read them

    def describe(self) -> str:
        return (f"{self.fpixels}x{self.spixels} pixels x {self.thicksteps} layers x {self.oversample}^2 "
                f"sub-pixels x {self.sources} sources x {self.phisteps} phi steps x "
                f"{self.mosaic_domains} mosaic domains: ~{_bytes(self.fixed_bytes + self.chunk_min_bytes)} "
                f"memory, ~{_duration(self.seconds)}")


def _lattice_lengths_A(spec: ExperimentSpec, base_dir=".", matrix=None) -> tuple:
    """Real-space cell edge lengths (A) from the cell or the matrix (``matrix``: the matrix file as
    read; read here when not given), for the oversample rule."""
    c = spec.crystal
    if c.cell_A_deg is not None:
        return tuple(float(x) for x in c.cell_A_deg[:3])
    if matrix is None:
        from nbsim.inputs import load_matrix
        matrix = load_matrix(spec, base_dir)
    M = np.asarray(matrix, float) / spec.beam.wavelength_A                          # columns a*, b*, c*
    real = np.linalg.inv(M).T                                                     # columns a, b, c
    return tuple(float(x) for x in np.linalg.norm(real, axis=0))


def estimate(spec: ExperimentSpec, device: Optional[DeviceSpec] = None, base_dir=".", *,
             geo=None, sources: Optional[int] = None,
             hkl_cells: Optional[int] = None, matrix=None) -> Estimate:
    """Sample counts, memory and time of ``spec`` on ``device`` (see the module docstring).

    The oversampling rule is nanoBragg's (``nbsim.experiment``): ceil(3 * crystal size /
    (lambda * distance / pixel)) unless ``detector.oversample`` is given."""
    from nbsim.geometry import resolve_pixels
    from nbsim.sampling import resolve_mosaic, resolve_phi, resolve_thickness
    device = device or DeviceSpec()
    d, b, c = spec.detector, spec.beam, spec.crystal
    fpix, spix = resolve_pixels(d)[:2]
    npix = fpix * spix
    if d.roi is not None:
        xmin, xmax, ymin, ymax = d.roi
        npix = max(0, min(xmax, fpix - 1) - max(xmin, 0) + 1) * max(0, min(ymax, spix - 1) - max(ymin, 0) + 1)
    if geo is None:
        geo = check_geometry(spec)
    q = quirks.of(spec)
    thicksteps = resolve_thickness(d.thick_um * 1e-6, d.thicksteps,
                                   c_layers=not q.fixed("thickness_layers"))[0]
    if d.oversample:
        oversample = int(d.oversample)
    else:
        lengths = _lattice_lengths_A(spec, base_dir, matrix)
        counts = [c.N if n is None else n for n in (c.Na, c.Nb, c.Nc)]
        sizes = [s for s in (c.size_x_mm, c.size_y_mm, c.size_z_mm)]
        xtal_m = max((mm_to_m(sz) if sz else max(1, n) * L * 1e-10) for L, n, sz in zip(lengths, counts, sizes))
        dist_m = mm_to_m(abs(geo.distance_mm))
        px_m = mm_to_m(d.pixel_mm)
        ratio = 3.0 * xtal_m / (angstrom_to_m(b.wavelength_A) * dist_m / px_m) if dist_m > 0 else math.inf
        oversample = max(1, math.ceil(ratio)) if math.isfinite(ratio) else 2 ** 62
    if sources is None:
        hdiv, vdiv, disp = _sampling(spec)
        sources = _count_divergence(hdiv, vdiv, b.round_div) * disp[0]
    phisteps, _, phistep = resolve_phi(deg_to_rad(c.phi_deg),
                                       None if c.osc_deg is None else deg_to_rad(c.osc_deg),
                                       None if c.phistep_deg is None else deg_to_rad(c.phistep_deg), c.phisteps)
    # faithful phi carry-over (quirk 4, nbsim.experiment.effective_phi): a first step at exactly 0
    first_iteration = (not q.fixed("phi0_carryover") and c.phi_deg == 0.0 and phisteps > 1
                       and phistep != 0.0)
    domains = resolve_mosaic(deg_to_rad(c.mosaic_deg), c.mosaic_domains)[0]
    itemsize = 4 if device.dtype == "float32" else 8
    sub = thicksteps * oversample ** 2
    samples = sub * max(1, sources) * phisteps * domains
    orient = phisteps * domains
    fixed = (fpix * spix * (itemsize + 8 + 4 + 1 + 1 + 2)           # image, stats, float32, masks, int
             + orient * (ORIENT_BYTES_FIRST_ITERATION if first_iteration else ORIENT_BYTES)
             + (hkl_cells or 0) * (8 + itemsize) * 2                # dense F table (+ padded copy)
             + max(1, sources) * 300)                               # source tensors and listing
    chunk_min = samples * 3 * itemsize + sub * (16 + 12 * max(1, sources)) * itemsize
    rate = SAMPLES_PER_S.get(device.device.split(":")[0], SAMPLES_PER_S["cpu"])
    seconds = npix * samples / rate + domains * SETUP_S_PER_DOMAIN
    return Estimate(fpix, spix, npix, thicksteps, oversample, max(1, sources), phisteps, domains, samples,
                    float(fixed), float(chunk_min), float(seconds))


def available_memory_bytes(device: Optional[DeviceSpec] = None) -> Optional[float]:
    """Memory available to this run: free device memory for CUDA, ``MemAvailable`` (or free pages)
    for the CPU; None when unknown."""
    device = device or DeviceSpec()
    if device.device.startswith("cuda"):
        try:
            import torch
            return float(torch.cuda.mem_get_info(torch.device(device.device))[0])
        except Exception:                       # noqa: BLE001 - no CUDA: checked elsewhere
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_size(est: Estimate, device: Optional[DeviceSpec] = None, spec: Optional[ExperimentSpec] = None) -> None:
    """Refuse a run whose estimated memory exceeds the machine or ``device.memory_budget_mb``, or whose
    estimated time exceeds ``device.time_limit_s``; the message carries the estimate."""
    device = device or DeviceSpec()
    key = _size_key(est, spec)
    need = est.fixed_bytes + est.chunk_min_bytes
    avail = available_memory_bytes(device)
    if avail is not None and need > avail:
        raise SpecError(key, f"the run cannot fit: {est.describe()}; {device.device} has "
                        f"{_bytes(avail)} available")
    if device.memory_budget_mb is not None and est.chunk_min_bytes > device.memory_budget_mb * 2 ** 20:
        raise SpecError("device.memory_budget_mb", f"one pixel needs {_bytes(est.chunk_min_bytes)} of working "
                        f"memory ({est.samples_per_pixel} samples), more than the budget of "
                        f"{device.memory_budget_mb:g} MB ({est.describe()})")
    limit = getattr(device, "time_limit_s", None)
    if limit is not None and est.seconds > limit:
        raise SpecError("device.time_limit_s", f"estimated {_duration(est.seconds)}, over the limit of "
                        f"{_duration(limit)} ({est.describe()})")


def _size_key(est: Estimate, spec: Optional[ExperimentSpec]) -> str:
    """The key most responsible for a size: the largest factor of the sample count or the pixels."""
    if spec is None:
        return "detector.fpixels"
    d, b = spec.detector, spec.beam
    if b.source_file:
        src_key = "beam.source_file"
    else:
        hdiv, vdiv, disp = _sampling(spec)
        src_key = max([(hdiv[0], "beam.hdivsteps"), (vdiv[0], "beam.vdivsteps"), (disp[0], "beam.dispsteps")],
                      key=lambda f: f[0])[1]
    factors = [(est.fpixels * est.spixels, "detector.fpixels" if d.fpixels else "detector.detsize_f_mm"),
               (est.oversample ** 2, "detector.oversample" if d.oversample else "detector.distance_mm"),
               (est.thicksteps, "detector.thicksteps"),
               (est.sources, src_key),
               (est.phisteps, "crystal.phisteps"), (est.mosaic_domains, "crystal.mosaic_domains")]
    return max(factors, key=lambda f: f[0])[1]


# ---------------------------------------------------------------------------------------------
# all of it, and the result
# ---------------------------------------------------------------------------------------------

def preflight(spec: ExperimentSpec, device: Optional[DeviceSpec] = None, base_dir=".") -> Estimate:
    """Validate ``spec`` and refuse, with one ``SpecError``, anything above. Normalizes a negative
    ROI bound in place (C's "whole detector"). Reads each input file once (``load_inputs``); the
    files as read are ``est.inputs``, for the run (``simulate(..., inputs=est.inputs)``), so a run
    reads nothing again. Writes nothing."""
    spec.validate()
    from nbsim.spec import has_panels
    if has_panels(spec):
        return _preflight_panels(spec, device, base_dir)
    normalize_roi(spec)
    geo = check_geometry(spec)
    files = check_inputs(spec, base_dir, beam_dir=geo.beam)
    est = estimate(spec, device, base_dir, geo=geo, sources=files["sources"],
                   hkl_cells=files["hkl_cells"], matrix=files["inputs"].matrix)
    check_size(est, device, spec)
    return dataclasses.replace(est, inputs=files["inputs"])


def _preflight_panels(spec: ExperimentSpec, device, base_dir) -> Estimate:
    """``preflight`` of a multi-panel detector: the input files, the geometry file among them, are
    read once (``load_inputs``: one line naming the file, line and key), the shared frame
    (``nbsim.panels.frame_spec``) is checked as a single panel, and the estimate counts every
    panel's pixels (each panel's frame block is allocated). ``est.inputs``: the files as read."""
    from nbsim.geometry import resolve_pixels
    from nbsim.inputs import load_inputs
    from nbsim.panels import frame_spec, panel_list
    inputs = load_inputs(spec, base_dir)
    frame = frame_spec(spec, inputs.geometry)
    panels = panel_list(spec, inputs.geometry)
    geo = check_geometry(frame)
    files = check_inputs(frame, base_dir, beam_dir=geo.beam, inputs=inputs)
    est = estimate(frame, device, base_dir, geo=geo, sources=files["sources"],
                   hkl_cells=files["hkl_cells"], matrix=inputs.matrix)
    fpix0, spix0 = resolve_pixels(frame.detector)[:2]
    counts = [((pn.fpixels or fpix0), (pn.spixels or spix0), pn.offset_px) for pn in panels]
    npix = sum(f * s for f, s, _ in counts)
    block = max((f + o[0]) * (s + o[1]) for f, s, o in counts)
    itemsize = 4 if (device or DeviceSpec()).dtype == "float32" else 8
    rate = SAMPLES_PER_S.get((device or DeviceSpec()).device.split(":")[0], SAMPLES_PER_S["cpu"])
    est = dataclasses.replace(
        est, fpixels=npix, spixels=1, pixels=npix,
        fixed_bytes=est.fixed_bytes + (npix + block) * (itemsize + 8),   # images + one panel's block
        seconds=npix * est.samples_per_pixel / rate + est.mosaic_domains * SETUP_S_PER_DOMAIN)
    check_size(est, device, spec)
    return dataclasses.replace(est, inputs=inputs)


def check_image(img, spec: Optional[ExperimentSpec] = None) -> None:
    """Refuse an image (array-like (S, F), as it will be written: float32) holding NaN or inf."""
    a = np.asarray(img)
    finite = np.isfinite(a)
    if finite.all():
        return
    n_nan = int(np.isnan(a).sum())
    n_inf = int(a.size - finite.sum() - n_nan)
    pos = [int(v) for v in np.argwhere(~finite)[0]]
    where = f"slow {pos[0]}, fast {pos[1]}" if a.ndim == 2 else f"pixel {pos[0]} of the panels in order"
    hint = ""
    if spec is not None:
        fl = spec.beam.fluence_ph_per_m2
        hint = (f" (fluence {fl:g} ph/m^2, default_F {spec.crystal.default_F:g}"
                + (f", table {spec.crystal.hkl_file}" if spec.crystal.hkl_file else "") + ")") if fl else \
               f" (default_F {spec.crystal.default_F:g})"
    raise SpecError("image", f"the simulated image holds {n_nan} NaN and {n_inf} infinite pixels (first at "
                    f"{where}): the intensity overflows float32 (> 3.4e38 photons){hint}; "
                    "lower the fluence or the structure factors. Nothing was written")
