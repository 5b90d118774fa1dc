"""The typed setup report: what the setup resolved and what nanoBragg prints about it.

``DetectorReport`` is built by ``nbsim.geometry.detector_geometry``; ``SetupReport`` (a
``DetectorReport`` plus the crystal, beam, sampling and sensor) by ``nbsim.experiment.build_model``.
Both are frozen: the setup builds them once, every reader (front end, store, trace, refinement,
benchmarks) reads named fields. ``SetupReport.echo()`` formats the setup lines the C program prints
(same wording, same ``%g``/``%f`` numbers); ``to_dict()`` gives the plain dictionary ``run.json``
stores under ``info`` (the keys it always had); ``from_dict`` reads it back.

Units are in the names (``_mm``, ``_m``, ``_deg``, ``_rad``, ``_A``, ``_px``); vectors are lab-frame
3-tuples (unit vectors unless the name says otherwise).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from nbsim.units import angstrom_to_m

Vec3 = Tuple[float, float, float]


def _echo_only(default):
    """A field only the echo reads: not written to ``run.json`` (so stored entries keep their
    bytes), defaulted when an entry is read back."""
    return field(default=default, metadata={"stored": False})


@dataclass(frozen=True)
class DetectorReport:
    """The resolved detector, as nanoBragg prints it and writes SMV headers from it."""
    convention: str                 # mosflm | denzo | adxv | xds | dials | custom
    pivot: str                      # beam | sample
    fpixels: int
    spixels: int
    pixel_mm: float
    detsize_f_mm: float
    detsize_s_mm: float
    distance_mm: float              # recomputed: close distance / ratio
    close_distance_mm: float
    xbeam_mm: float
    ybeam_mm: float
    xclose_mm: float
    yclose_mm: float
    fbeam_mm: float
    sbeam_mm: float
    fclose_mm: float
    sclose_mm: float
    orgx_px: float
    orgy_px: float
    dials_origin_mm: Vec3
    twotheta_deg: float
    ratio: float                    # beam · detector normal (C's "ratio")
    fdet: Vec3
    sdet: Vec3
    odet: Vec3
    pix0_m: Vec3                    # sample → first pixel's corner, metres
    beam: Vec3
    spindle: Vec3
    polar_vector: Vec3
    twotheta_axis: Vec3             # not unitized (as C)
    polarization_plane_normal: Vec3  # beam × polar_vector
    # the SMV header's derived centres as C computes them from metres, (detsize_s − Sbeam)·1000 and
    # (Sbeam|Fbeam − pixel/2)·1000: the same numbers from the mm fields above can round differently
    # at a %g boundary (None in an entry stored before they were: derived from the mm fields then)
    adxv_center_y_mm: Optional[float] = field(default=None, kw_only=True)
    mosflm_center_x_mm: Optional[float] = field(default=None, kw_only=True)
    mosflm_center_y_mm: Optional[float] = field(default=None, kw_only=True)
    # the echo's lengths in metres as C holds them (distance, detsize f/s, pixel, Xbeam, Ybeam, Fbeam,
    # Sbeam, Xclose, Yclose, Fclose, Sclose): the mm fields times 1e-3 can print another %g at a tie
    echo_m: Optional[Tuple[float, ...]] = field(default=None, kw_only=True, metadata={"stored": False})

    def to_dict(self) -> dict:
        """Plain numbers and lists, the keys ``run.json`` stores under ``info``."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("stored", True):
                out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict):
        """The report back from ``to_dict``'s dictionary (unknown keys ignored, echo-only fields
        defaulted). ``KeyError`` names a stored field the dictionary lacks."""
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = _frozen(d[f.name])
            elif f.metadata.get("stored", True) and f.default is dataclasses.MISSING:
                raise KeyError(f.name)
        return cls(**kw)


@dataclass(frozen=True)
class SetupReport(DetectorReport):
    """Everything the setup resolved that a person (or ``run.json``) reads: detector (inherited),
    beam, crystal, sampling and sensor, plus the quirk warnings of this run."""
    wavelength_A: float
    phi_deg: float
    osc_deg: float
    phistep_deg: float
    phisteps: int
    mosaic_domains: int
    mosaic_deg: float
    sources: int
    divsteps: int
    dispsteps: int
    oversample: int
    recommended_oversample: int
    thicksteps: int
    thick_m: float
    mu_per_m: float                 # sensor attenuation (1/m); -1: no sensor
    steps: int                      # sources × mosaic domains × phi steps × oversample²
    Na: float
    Nb: float
    Nc: float
    fluence: float                  # photons/m²
    interpolate: bool
    hkls: int                       # structure factors the file gave ("initialized hkls")
    roi: Tuple[int, int, int, int]  # xmin xmax ymin ymax, inclusive pixels
    unit_cell: Tuple[float, ...]    # a b c (Å) α β γ (deg)
    recp_cell: Tuple[float, ...]    # a* b* c* (1/Å) α* β* γ* (deg)
    V_cell_A3: float
    a_A: Vec3
    b_A: Vec3
    c_A: Vec3
    a_star: Vec3                    # 1/Å
    b_star: Vec3
    c_star: Vec3
    source_listing: Tuple[str, ...]  # C's "X Y Z   I lambda" lines
    hdiv: Tuple[float, float, float]  # steps, range (rad), step (rad)
    vdiv: Tuple[float, float, float]
    dispersion: Tuple[float, float, float]  # steps, fraction, step
    quirks: str
    differentiable: bool
    # ---- stored; defaulted when an entry written before them is read back
    spectrum_A: Tuple[Tuple[float, float], ...] = field(default=())   # (λ Å, weight) over distinct λ, sum 1
    exposure_s: float = 0.0                                          # for the NeXus/CBF writers
    # ---- read only by the echo (not stored in run.json)
    warnings: Tuple[str, ...] = _echo_only(())
    interpolate_auto: Optional[bool] = _echo_only(None)  # C's own choice (None: -interpolate given)
    oversample_auto: bool = _echo_only(False)
    matrix_file: Optional[str] = _echo_only(None)
    hkl_file: Optional[str] = _echo_only(None)
    fdump_read: Optional[str] = _echo_only(None)     # structure factors read from this Fdump file
    fdump_written: Optional[str] = _echo_only(None)  # the Fdump cache the front end writes
    misset_random_deg: Optional[Vec3] = _echo_only(None)
    xtal_size_m: Vec3 = _echo_only((0.0, 0.0, 0.0))
    molecular_weight: float = _echo_only(0.0)        # C's "approximate MW" (density 1.2 g/cm³)
    thickstep_m: float = _echo_only(0.0)
    phi_values_deg: Tuple[float, ...] = _echo_only(())
    phi_end_deg: float = _echo_only(0.0)
    divergence_deviations_rad: Tuple[Tuple[float, float], ...] = _echo_only(())
    lambdas_m: Tuple[float, ...] = _echo_only(())
    source_file: Optional[str] = _echo_only(None)
    default_F: float = _echo_only(0.0)
    shape: str = _echo_only("square")
    kahn_factor: float = _echo_only(0.0)
    nopolar: bool = _echo_only(False)
    curved: bool = _echo_only(False)
    point_pixel: bool = _echo_only(False)
    oversample_flags: Tuple[str, ...] = _echo_only(())  # of "thick", "polar", "omega"
    mask_file: Optional[str] = _echo_only(None)
    noise: bool = _echo_only(False)                  # a noise image is computed (C: calculate_noise)
    noise_seed: Optional[int] = _echo_only(None)     # C's internal seed (-N for -seed N)
    water_m: float = _echo_only(0.0)

    def echo(self) -> list:
        """The setup lines nanoBragg prints, from "<convention> convention selected." to the noise
        parameters, in C's order, wording and number formats (``%g`` as Python's ``:g``).
        Warnings are not among them (the front end prints ``self.warnings``)."""
        return echo_lines(self)


_SHAPES = {"round": "ellipsoidal", "square": "parallelpiped", "gauss": "gaussian", "tophat": "tophat-spot"}


def _g(x) -> str:
    return f"{x:g}"


def _vec(v) -> str:
    return " ".join(_g(x) for x in v)


def echo_lines(r: SetupReport) -> list:
    """C's setup lines of ``r`` (see ``SetupReport.echo``)."""
    out = [f"{r.convention} convention selected."]
    out.append("pivoting detector around " + ("sample" if r.pivot == "sample" else "direct beam spot"))
    beam_in_det = tuple(sum(b * e for b, e in zip(r.beam, ax)) for ax in (r.fdet, r.sdet, r.odet))
    out.append(f"XDS incident beam: {_vec(beam_in_det)}")
    if r.interpolate_auto is not None:
        out.append("auto-selected " + ("tricubic interpolation of structure factors" if r.interpolate_auto
                                       else "no interpolation"))
    if r.matrix_file is not None:
        out.append(f"reading {r.matrix_file}")
    if r.misset_random_deg is not None:
        out.append("random orientation misset angles: %f %f %f deg" % tuple(r.misset_random_deg))
    out.append("Unit Cell: " + _vec(r.unit_cell))
    out.append("Recp Cell: " + _vec(r.recp_cell))
    out.append(f"volume = {r.V_cell_A3:g} A^3")
    out.append("real-space cell vectors (Angstrom):")
    out.append("     %-10s  %-10s  %-10s" % ("a", "b", "c"))
    for i, axis in enumerate("XYZ"):
        out.append(f"{axis}: %11.8f %11.8f %11.8f" % (r.a_A[i], r.b_A[i], r.c_A[i]))
    out.append("reciprocal-space cell vectors (Angstrom^-1):")
    out.append("     %-10s  %-10s  %-10s" % ("a_star", "b_star", "c_star"))
    for i, axis in enumerate("XYZ"):
        out.append(f"{axis}: %11.8f %11.8f %11.8f" % (r.a_star[i], r.b_star[i], r.c_star[i]))
    out.append("crystal is %s x %s x %s microns" % tuple(_g(x * 1e6) for x in r.xtal_size_m))
    if r.oversample_auto:
        out.append(f"auto-selected {r.oversample}-fold oversampling")
    out.append(f"approximate MW = {r.molecular_weight:g}")
    if r.hkl_file is not None:
        out += [f"counting entries in {r.hkl_file}", f"re-reading {r.hkl_file}"]
        if r.fdump_written is not None:
            out.append(f"writing dump file for next time: {r.fdump_written}")
    elif r.fdump_read is not None:
        out.append(f"reading Fs from {r.fdump_read}")
    out += [f"thick{i} = {r.thickstep_m * i * 1e6:g} um" for i in range(r.thicksteps)]
    out += [f"phi{i} = {p:g}" for i, p in enumerate(r.phi_values_deg)]
    if r.source_file is None:
        out += [f"divergence deviation: {h:g} {v:g}" for h, v in r.divergence_deviations_rad]
        out += [f"lambda{i} = {lam:.15g}" for i, lam in enumerate(r.lambdas_m)]
    out.append(f"  created a total of {r.sources} sources:")
    out += list(r.source_listing)
    out.append(f"  created a total of {r.mosaic_domains} mosaic domains")
    out.append(f"  {r.hkls} initialized hkls (all others ={r.default_F:g})")
    out.append(f"  {_SHAPES.get(r.shape, r.shape)} xtal: %.0fx%.0fx%.0f cells" % (r.Na, r.Nb, r.Nc))
    out.append(f"  wave={angstrom_to_m(r.wavelength_A):g} meters +/- {r.dispersion[1] * 100:g}% in "
               f"{r.dispsteps} steps")
    out.append("  polarization effect disabled" if r.nopolar else f"  Kahn polarization factor: {r.kahn_factor:f}")
    if r.curved:
        out.append("  curved detector: all pixels same distance from origin")
    if r.point_pixel:
        out.append("  pixel obliquity effect disabled")
    out.append(f"  incident fluence: {r.fluence:g} photons/m^2")
    m = r.echo_m or tuple(x * 1e-3 for x in (
        r.distance_mm, r.detsize_f_mm, r.detsize_s_mm, r.pixel_mm, r.xbeam_mm, r.ybeam_mm, r.fbeam_mm,
        r.sbeam_mm, r.xclose_mm, r.yclose_mm, r.fclose_mm, r.sclose_mm))
    out.append(f"  distance={m[0]:g} detsize={m[1]:g}x{m[2]:g}  pixel={m[3]:g} meters "
               f"({r.fpixels}x{r.spixels} pixels)")
    out.append(f"  sensor is {r.thick_m:g} m thick in {r.thicksteps} layers with mu= {r.mu_per_m:g}")
    out.append(f"  Xbeam={m[4]:g} Ybeam={m[5]:g}")
    out.append(f"  Fbeam={m[6]:g} Sbeam={m[7]:g}")
    out.append(f"  Xclose={m[8]:g} Yclose={m[9]:g}")
    out.append(f"  Fclose={m[10]:g} Sclose={m[11]:g}")
    out.append(f"  DIRECTION_OF_DETECTOR_X-AXIS= {_vec(r.fdet)}")
    out.append(f"  DIRECTION_OF_DETECTOR_Y-AXIS= {_vec(r.sdet)}")
    out.append(f"  DIRECTION_OF_DETECTOR_Z-AXIS= {_vec(r.odet)}")
    out.append(f"  INCIDENT_BEAM_DIRECTION= {_vec(r.beam)}")
    out.append(f"  spindle ROTATION_AXIS= {_vec(r.spindle)}")
    out.append(f"  POLARIZATION_PLANE_NORMAL= {_vec(r.polarization_plane_normal)}")
    out.append(f"  dials origin= {_vec(r.dials_origin_mm)}")
    xmin, xmax, ymin, ymax = r.roi
    out.append(f"  roi: {xmin} < x < {xmax} && {ymin} < y < {ymax}")
    out.append(f"  hdivrange={r.hdiv[1]:g} hdivstep={r.hdiv[2]:g}  radians")
    out.append(f"  vdivrange={r.vdiv[1]:g} vdivstep={r.vdiv[2]:g}  radians")
    out.append(f"  {-1 if r.source_file else r.divsteps} divergence steps")   # C leaves it at -1
    out.append(f"  {r.sources} sources")
    out.append(f"  {r.mosaic_domains} mosaic domains over mosaic spread of {r.mosaic_deg:g} degrees")
    out.append(f"  {r.phisteps} phi steps from {r.phi_deg:g} to {r.phi_end_deg:g} degrees")
    out.append(f"  {r.oversample}x{r.oversample} pixel oversample steps"
               + "".join(f" +{x}" for x in r.oversample_flags))
    if r.mask_file is not None:
        out.append(f"  skipping zero-flagged pixels in {r.mask_file}")
    if r.noise:
        out += ["", "  noise image paramters:", f"  seed: {r.noise_seed}",
                f"  water droplet size: {r.water_m:g} m"]
    return out


def solid_angle_lines(omega_sum_sr: Optional[float]) -> list:
    """C's lines after the pixel loop: a blank line, then the detector's solid angle (steradian and
    share of the sphere); none when the run did not measure it."""
    if omega_sum_sr is None:
        return []
    om = omega_sum_sr
    return ["", f"solid angle subtended by detector = {om:g} steradian ( {100 * om / 4 / math.pi:g}% sphere)"]


@dataclass(frozen=True)
class PanelReport:
    """One panel of a multi-panel detector as resolved (``nbsim.panels``): counts, pixel size (mm),
    unit fast/slow/normal axes (lab frame), the frame origin (``pix0``, mm) and the panel's first
    pixel corner (mm), its offset in that frame (fast, slow pixels) and its close distance (mm)."""
    name: str
    fpixels: int
    spixels: int
    offset_px: Tuple[int, int]
    pixel_mm: float
    fast: Vec3
    slow: Vec3
    normal: Vec3
    origin_mm: Vec3
    corner_mm: Vec3
    close_distance_mm: float

    def to_dict(self) -> dict:
        """Plain numbers and lists (``run.json`` ``info["panels"]`` entries)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


#: keys of ``SetupReport.to_dict()`` that describe the single-panel frame a multi-panel run shares,
#: not its panels' geometry: left out of a multi-panel run's ``info`` (the panels are under "panels")
FRAME_ONLY_KEYS = ("pix0_m", "fdet", "sdet", "odet", "xbeam_mm", "ybeam_mm", "fbeam_mm", "sbeam_mm",
                   "adxv_center_y_mm", "mosflm_center_x_mm", "mosflm_center_y_mm",
                   "fclose_mm", "sclose_mm", "orgx_px", "orgy_px", "dials_origin_mm", "roi",
                   "detsize_f_mm", "detsize_s_mm", "fpixels", "spixels")


def _plain(v: Any):
    """Tuples (nested) as lists, as JSON stores them."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _frozen(v: Any):
    """Lists (nested) as tuples, so a report read back stays hashable and immutable."""
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    return v
