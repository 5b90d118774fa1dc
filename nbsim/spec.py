"""Experiment description: plain dataclasses, no Hydra, no torch.

These dataclasses are the single description of a simulation. The Hydra app uses them as
structured-config schemas (``pipeline.compose`` registers them), the nanoBragg front end fills
them from argv (``nbsim.frontend``), and the engine (``nbsim.experiment``) turns them into tensors.

Conventions
-----------
* Units are in the key names: ``_mm``, ``_deg``, ``_A`` (Ångström), ``_um``, ``_mrad``, ``_eV``...
* ``None`` means "not given": the engine applies nanoBragg's default for it, which often depends on
  other keys (e.g. the beam centre on the detector convention).
* Vectors are lab-frame ``[x, y, z]`` lists; they are unitized by the engine.
* ``quirks`` is ``"faithful"`` (reproduce the C program bit for bit, quirks included) or
  ``"physical"`` (fix every quirk listed in ``nbsim.quirks``); ``fix`` names quirks to fix on top
  of that preset (``nbsim.quirks.of(spec)`` is the effective set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

from nbsim import quirks as _quirks

CONVENTIONS = ("mosflm", "xds", "dials", "adxv", "denzo", "custom")
PIVOTS = ("beam", "sample")
SHAPES = ("square", "round", "gauss", "tophat")
QUIRK_MODES = _quirks.PRESET_NAMES
DTYPES = ("float64", "float32")


class SpecError(ValueError):
    """A value in the experiment description is invalid. ``key`` names the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class PanelSpec:
    """One panel of a multi-panel detector (``detector.panels``; README: Multi-panel detectors).
    Vectors are nbsim lab-frame ``[x, y, z]``; a key left ``None`` takes the single-panel detector's
    value (its convention, pivot, beam centre and rotations resolved as usual): the panel's frame."""
    name: Optional[str] = None             # label (geometry files: the panel's name); None: p<index>
    fpixels: Optional[int] = None          # pixels along the panel's fast axis; None: the detector's
    spixels: Optional[int] = None          # pixels along the panel's slow axis; None: the detector's
    pixel_mm: Optional[float] = None       # pixel size; None: detector.pixel_mm
    fast: Optional[List[float]] = None     # fast axis [x, y, z]; None: the detector's fdet
    slow: Optional[List[float]] = None     # slow axis [x, y, z]; None: the detector's sdet
    origin_mm: Optional[List[float]] = None  # corner of pixel (0, 0) of the frame [x, y, z]; None: the detector's pix0
    offset_px: List[int] = field(default_factory=lambda: [0, 0])  # first [fast, slow] pixel index in the frame of origin_mm
    rot_deg: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # rotation of the panel about lab x, y, z through origin_mm
    roi: Optional[List[int]] = None        # [xmin, xmax, ymin, ymax] inclusive panel pixels to simulate; None: all
    bad: Optional[List[List[int]]] = None  # bad regions [fmin, fmax, smin, smax] (inclusive): not simulated


@dataclass
class DetectorSpec:
    convention: str = "mosflm"             # mosflm | xds | dials | adxv | denzo | custom: axes, beam centre and pivot rules
    pivot: Optional[str] = None            # beam | sample; None: forced by convention; custom: beam
    distance_mm: float = 100.0             # sample -> beam spot along the beam
    close_distance_mm: Optional[float] = None  # sample -> detector plane along its normal
    pixel_mm: float = 0.1                  # pixel size (square pixels)
    fpixels: Optional[int] = None          # pixels along the fast axis; None: ceil(detsize_f_mm/pixel_mm - 0.5)
    spixels: Optional[int] = None          # pixels along the slow axis; None: ceil(detsize_s_mm/pixel_mm - 0.5)
    detsize_f_mm: Optional[float] = None   # detector size along the fast axis; None: 102.4 mm, or fpixels*pixel_mm
    detsize_s_mm: Optional[float] = None   # detector size along the slow axis; None: 102.4 mm, or spixels*pixel_mm
    xbeam_mm: Optional[float] = None       # beam centre X of the convention (BEAM pivot); None: the convention's default
    ybeam_mm: Optional[float] = None       # beam centre Y of the convention (BEAM pivot); None: the convention's default
    xclose_mm: Optional[float] = None      # near point X (SAMPLE pivot)
    yclose_mm: Optional[float] = None      # near point Y (SAMPLE pivot)
    orgx_px: Optional[float] = None        # XDS ORGX (SAMPLE pivot)
    orgy_px: Optional[float] = None        # XDS ORGY (SAMPLE pivot)
    rotx_deg: float = 0.0                  # detector rotation about the lab x axis
    roty_deg: float = 0.0                  # detector rotation about the lab y axis
    rotz_deg: float = 0.0                  # detector rotation about the lab z axis
    twotheta_deg: float = 0.0              # detector swing about twotheta_axis (SAMPLE pivot)
    fdet_vector: Optional[List[float]] = None  # fast axis [x, y, z] (custom convention); None: the convention's
    sdet_vector: Optional[List[float]] = None  # slow axis [x, y, z] (custom convention); None: the convention's
    odet_vector: Optional[List[float]] = None  # detector normal [x, y, z] (custom convention); None: the convention's
    twotheta_axis: Optional[List[float]] = None  # axis of the two-theta swing [x, y, z]; None: the convention's
    pix0_vector_mm: Optional[List[float]] = None  # first pixel [x, y, z]; custom only; ignored by C (quirk), honoured when physical
    point_pixel: bool = False              # true: solid angle 1/R^2 of the pixel centre (no obliquity)
    curved: bool = False                   # true: spherical detector (every pixel at the same distance)
    thick_um: float = 0.0                  # sensor thickness
    attenuation_um: Optional[float] = None  # sensor attenuation length (C -detector_abs); None: = thickness
    thicksteps: Optional[int] = None       # layers the sensor thickness is sampled in; None: 1
    oversample: Optional[int] = None       # sub-pixels per pixel axis; None: auto (from the spot size)
    oversample_thick: bool = False         # true: sensor capture fraction per sub-pixel
    oversample_polar: bool = False         # true: polarization factor per sub-pixel
    oversample_omega: bool = False         # true: solid angle per sub-pixel
    roi: Optional[List[int]] = None        # [xmin, xmax, ymin, ymax] inclusive pixel indices (fast, slow)
    mask_file: Optional[str] = None        # SMV image; pixels equal to 0 are skipped
    panels: Optional[List[PanelSpec]] = None  # multi-panel detector (list of panels); None: one panel
    geometry_file: Optional[str] = None    # CrystFEL .geom or DIALS .expt: the panels (and an .expt's beam)


@dataclass
class BeamSpec:
    wavelength_A: float = 1.0              # X-ray wavelength (the centre of the spectrum)
    dispersion_pct: float = 0.0            # full range of dlambda/lambda, percent
    dispsteps: Optional[int] = None        # wavelengths sampled across dispersion_pct; None: auto
    hdivrange_mrad: Optional[float] = None  # horizontal divergence, full range
    vdivrange_mrad: Optional[float] = None  # vertical divergence, full range
    hdivstep_mrad: Optional[float] = None  # angle between horizontal divergence samples
    vdivstep_mrad: Optional[float] = None  # angle between vertical divergence samples
    hdivsteps: Optional[int] = None        # horizontal divergence samples
    vdivsteps: Optional[int] = None        # vertical divergence samples
    round_div: bool = True                 # true: elliptical cut of the divergence grid (C default); false: full grid
    source_file: Optional[str] = None      # columns X Y Z I lambda (m, m, m, -, m)
    fluence_ph_per_m2: Optional[float] = None  # photons per area; None: 1/r_e^2, or flux*exposure/beamsize^2 when flux given
    flux_ph_per_s: float = 0.0             # beam flux; > 0: fluence = flux*exposure_s/beamsize_mm^2
    exposure_s: float = 1.0                # exposure time (with flux_ph_per_s)
    beamsize_mm: float = 0.1               # beam size, square (with flux_ph_per_s)
    kahn_factor: float = 0.0               # Kahn polarization factor; C's default is 0 (unpolarised)
    nopolar: bool = False                  # polarization factor = 1
    beam_vector: Optional[List[float]] = None   # direction of the beam (None: convention)
    polar_vector: Optional[List[float]] = None  # E-vector axis (None: convention)
    dmin_A: float = 0.0                    # resolution cut-off: no scattering beyond it; 0: none


@dataclass
class CrystalSpec:
    cell_A_deg: Optional[List[float]] = None   # a b c (A) alpha beta gamma (deg)
    matrix_file: Optional[str] = None          # MOSFLM A matrix (includes lambda)
    misset_deg: Optional[List[float]] = None   # rotations about x, y, z
    misset_random: bool = False            # true: random misset orientation (seeded by misset_seed)
    misset_seed: Optional[int] = None          # seed for misset_random (C: -misset_seed)
    N: int = 1                                 # cells along every axis unless Na/Nb/Nc given
    Na: Optional[int] = None               # cells along a (None: N)
    Nb: Optional[int] = None               # cells along b (None: N)
    Nc: Optional[int] = None               # cells along c (None: N)
    size_x_mm: Optional[float] = None          # crystal size along a (overrides Na)
    size_y_mm: Optional[float] = None      # crystal size along b (overrides Nb)
    size_z_mm: Optional[float] = None      # crystal size along c (overrides Nc)
    shape: str = "square"                  # spot shape: square (parallelepiped, sincg) | round | gauss | tophat
    fudge: float = 1.0                     # scales radius^2 of round/gauss/tophat spots
    default_F: float = 0.0                 # structure factor of every hkl not in the table
    hkl_file: Optional[str] = None         # text table, lines h k l F; or an MTZ file (expanded to P1 with its symmetry)
    mtz_column: Optional[str] = None       # column of an MTZ hkl_file: F, J (sqrt), or a pair 'F(+),F(-)' (G/K); None: its only F column
    model_file: Optional[str] = None       # PDB or mmCIF model: F computed with gemmi (instead of hkl_file)
    model_dmin_A: Optional[float] = None   # resolution of the F computed from model_file; None: the detector's edge
    model_anomalous: bool = False          # true: f' and f'' at beam.wavelength_A in the F of model_file
    fdump_file: Optional[str] = None           # binary F cache: read when hkl_file is absent (the front end writes it)
    interpolate: Optional[bool] = None         # None: auto (on when any N <= 2 and a table is loaded)
    mosaic_deg: float = 0.0                # isotropic mosaic spread
    mosaic_domains: Optional[int] = None   # number of mosaic domains; None: nanoBragg's default
    mosaic_seed: int = 12345678            # seed of the mosaic domain orientations
    phi_deg: float = 0.0                   # spindle start angle
    osc_deg: Optional[float] = None            # oscillation range; None: not given (C: 0 and 1 phi step)
    phisteps: Optional[int] = None         # phi samples over osc_deg; None: nanoBragg's default
    phistep_deg: Optional[float] = None    # phi step; None: osc_deg/phisteps
    spindle_axis: Optional[List[float]] = None  # phi rotation axis [x, y, z]; None: the convention's
    water_um: float = 0.0                      # water droplet for the background


@dataclass
class ImageSpec:
    """How the float image becomes integer images (does not change the float image)."""
    adc: float = 40.0                      # offset added to every integer pixel (int.img, noise.img)
    int_scale: Optional[float] = None          # int.img = float image x int_scale + adc; None: 55000/max
    pgm_scale: Optional[float] = None          # image.pgm = float image x pgm_scale; None: 250/(5 rmsd)
    noise: bool = True                     # true: a Poisson noise image can be written (store.write_noise, front end)
    noise_seed: Optional[int] = None           # seed of the noise image; None: the clock (not reproducible)


@dataclass
class DeviceSpec:
    device: str = "cpu"                    # cpu | cuda | cuda:N | mps
    dtype: str = "float64"                 # float64 | float32: precision of the kernel (the setup is always float64)
    memory_budget_mb: Optional[float] = None   # working set of one chunk; None: derived from available memory
    compile: Any = "auto"                      # true | false | auto: torch.compile the kernel (auto: where it repays)
    time_limit_s: Optional[float] = None       # refuse a run whose estimated time exceeds this (None: no limit)


def compile_mode(value, key: str = "device.compile") -> Optional[bool]:
    """``device.compile`` as the engine takes it: True (always torch.compile where supported),
    False (never) or None ("auto": where one image repays the compilation, see
    ``nbsim.engine.compile_pays_off``). Accepts booleans and the strings true/false/auto/on/off."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower() if isinstance(value, str) else None
    if v in ("true", "on", "yes", "1"):
        return True
    if v in ("false", "off", "no", "0"):
        return False
    if v == "auto":
        return None
    raise SpecError(key, f"must be true, false or auto; got {value!r}")


@dataclass
class ExperimentSpec:
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    beam: BeamSpec = field(default_factory=BeamSpec)
    crystal: CrystalSpec = field(default_factory=CrystalSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    quirks: str = "faithful"
    fix: List[str] = field(default_factory=list)   # quirk names fixed on top of the preset

    def validate(self) -> "ExperimentSpec":
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# validation: one clear message naming the key and the accepted range
# ---------------------------------------------------------------------------------------------

def _finite(key, v):
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpecError(key, f"must be a finite number, got {v!r}")


def _positive(key, v, allow_none=True):
    if v is None and allow_none:
        return
    _finite(key, v)
    if not v > 0:
        raise SpecError(key, f"must be > 0, got {v!r}")


def _nonneg(key, v):
    if v is None:
        return
    _finite(key, v)
    if v < 0:
        raise SpecError(key, f"must be >= 0, got {v!r}")


def _choice(key, v, choices, allow_none=False):
    if v is None and allow_none:
        return
    if v not in choices:
        raise SpecError(key, f"must be one of {', '.join(choices)}; got {v!r}")


def _vector(key, v, n=3, nonzero=True):
    if v is None:
        return
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise SpecError(key, f"must be a list of {n} numbers, got {v!r}")
    for x in v:
        _finite(key, x)
    if nonzero and all(x == 0 for x in v):
        raise SpecError(key, "must not be the zero vector")


def _int_ge(key, v, lo, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(key, f"must be an integer >= {lo}, got {v!r}")
    if v < lo:
        raise SpecError(key, f"must be an integer >= {lo}, got {v!r}")


def _fix_names(key, v):
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise SpecError(key, f"must be a list of quirk names; got {v!r}")
    bad = _quirks.unknown(v)
    if bad is not None:
        raise SpecError(key, f"unknown quirk {bad!r}; accepted: {_quirks.accepted_text()}")


def validate(spec: ExperimentSpec) -> None:
    """Raise ``SpecError`` for the first non-physical value found."""
    d, b, c, im = spec.detector, spec.beam, spec.crystal, spec.image
    _choice("quirks", spec.quirks, QUIRK_MODES)
    _fix_names("fix", spec.fix)
    # detector
    _choice("detector.convention", d.convention, CONVENTIONS)
    _choice("detector.pivot", d.pivot, PIVOTS, allow_none=True)
    _positive("detector.distance_mm", d.distance_mm, allow_none=False)
    _positive("detector.close_distance_mm", d.close_distance_mm)
    _positive("detector.pixel_mm", d.pixel_mm, allow_none=False)
    _int_ge("detector.fpixels", d.fpixels, 1)
    _int_ge("detector.spixels", d.spixels, 1)
    _positive("detector.detsize_f_mm", d.detsize_f_mm)
    _positive("detector.detsize_s_mm", d.detsize_s_mm)
    for k in ("xbeam_mm", "ybeam_mm", "xclose_mm", "yclose_mm", "orgx_px", "orgy_px",
              "rotx_deg", "roty_deg", "rotz_deg", "twotheta_deg"):
        _finite(f"detector.{k}", getattr(d, k))
    for k in ("fdet_vector", "sdet_vector", "odet_vector", "twotheta_axis"):
        _vector(f"detector.{k}", getattr(d, k))
    _vector("detector.pix0_vector_mm", d.pix0_vector_mm, nonzero=False)
    if d.panels is not None:
        if not isinstance(d.panels, (list, tuple)) or len(d.panels) == 0:
            raise SpecError("detector.panels", f"must be a non-empty list of panels, got {d.panels!r}")
        for i, pn in enumerate(d.panels):
            if not isinstance(pn, PanelSpec):
                raise SpecError(f"detector.panels.{i}", f"must be a panel (PanelSpec), got {pn!r}")
            validate_panel(i, pn)
    if d.panels is not None and d.geometry_file is not None:
        raise SpecError("detector.geometry_file", "give detector.panels or detector.geometry_file, not both")
    _nonneg("detector.thick_um", d.thick_um)
    _nonneg("detector.attenuation_um", d.attenuation_um)
    _int_ge("detector.thicksteps", d.thicksteps, 1)
    _int_ge("detector.oversample", d.oversample, 1)
    if d.roi is not None:
        if not isinstance(d.roi, (list, tuple)) or len(d.roi) != 4 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in d.roi):
            raise SpecError("detector.roi", f"must be 4 integers [xmin, xmax, ymin, ymax], got {d.roi!r}")
        # a negative bound means "not given" (C: min -> 0, max -> the detector edge; see
        # nbsim.checks.normalize_roi), so only two given bounds can be out of order
        if (0 <= d.roi[1] < d.roi[0]) or (0 <= d.roi[3] < d.roi[2]):
            raise SpecError("detector.roi", f"needs xmin <= xmax and ymin <= ymax, got {list(d.roi)}")
    # beam
    _positive("beam.wavelength_A", b.wavelength_A, allow_none=False)
    _nonneg("beam.dispersion_pct", b.dispersion_pct)
    _int_ge("beam.dispsteps", b.dispsteps, 1)
    for k in ("hdivrange_mrad", "vdivrange_mrad", "hdivstep_mrad", "vdivstep_mrad"):
        _nonneg(f"beam.{k}", getattr(b, k))
    _int_ge("beam.hdivsteps", b.hdivsteps, 1)
    _int_ge("beam.vdivsteps", b.vdivsteps, 1)
    _positive("beam.fluence_ph_per_m2", b.fluence_ph_per_m2)
    _nonneg("beam.flux_ph_per_s", b.flux_ph_per_s)
    _positive("beam.exposure_s", b.exposure_s, allow_none=False)
    _positive("beam.beamsize_mm", b.beamsize_mm, allow_none=False)
    _finite("beam.kahn_factor", b.kahn_factor)
    if not -1.0 <= b.kahn_factor <= 1.0:
        raise SpecError("beam.kahn_factor", f"must be in [-1, 1], got {b.kahn_factor!r}")
    _vector("beam.beam_vector", b.beam_vector)
    _vector("beam.polar_vector", b.polar_vector)
    _nonneg("beam.dmin_A", b.dmin_A)
    # crystal
    if c.cell_A_deg is None and c.matrix_file is None and d.geometry_file is None:
        # (with a geometry file, an .expt's crystal may be the cell: nbsim.inputs.geometry_crystal)
        raise SpecError("crystal.cell_A_deg", "a unit cell is required: give crystal.cell_A_deg "
                        "[a b c alpha beta gamma] or crystal.matrix_file (or an .expt with a crystal "
                        "as detector.geometry_file)")
    if c.cell_A_deg is not None:
        cell = c.cell_A_deg
        if not isinstance(cell, (list, tuple)) or len(cell) != 6:
            raise SpecError("crystal.cell_A_deg", f"must be 6 numbers [a b c alpha beta gamma], got {cell!r}")
        for x in cell:
            _finite("crystal.cell_A_deg", x)
        if min(cell[:3]) <= 0:
            raise SpecError("crystal.cell_A_deg", f"cell edges must be > 0 A, got {list(cell[:3])}")
        al, be, ga = cell[3:]
        if not all(0 < x < 180 for x in (al, be, ga)):
            raise SpecError("crystal.cell_A_deg", f"cell angles must be in (0, 180) deg, got {list(cell[3:])}")
        if not (al + be + ga < 360 and al + be > ga and be + ga > al and ga + al > be):
            raise SpecError("crystal.cell_A_deg",
                            f"degenerate cell: angles {list(cell[3:])} enclose no volume "
                            "(need each angle < sum of the other two and the sum < 360)")
    _vector("crystal.misset_deg", c.misset_deg, nonzero=False)
    # C clamps N <= 1 to 1 silently; a crystal of 0 cells is refused here instead
    _int_ge("crystal.N", c.N, 1, allow_none=False)
    for k in ("Na", "Nb", "Nc"):
        _int_ge(f"crystal.{k}", getattr(c, k), 1)
    for k in ("size_x_mm", "size_y_mm", "size_z_mm"):
        _nonneg(f"crystal.{k}", getattr(c, k))
    _choice("crystal.shape", c.shape, SHAPES)
    _positive("crystal.fudge", c.fudge, allow_none=False)
    _finite("crystal.default_F", c.default_F)
    for k in ("mtz_column", "model_file"):
        v = getattr(c, k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise SpecError(f"crystal.{k}", f"must be a non-empty string, got {v!r}")
    if c.model_file is not None and c.hkl_file is not None:
        raise SpecError("crystal.model_file", "give either crystal.model_file or crystal.hkl_file, not both "
                        f"(got {c.model_file!r} and {c.hkl_file!r})")
    _positive("crystal.model_dmin_A", c.model_dmin_A)
    if not isinstance(c.model_anomalous, bool):
        raise SpecError("crystal.model_anomalous", f"must be true or false, got {c.model_anomalous!r}")
    if c.model_file is None:
        for k, v in (("model_dmin_A", c.model_dmin_A), ("model_anomalous", c.model_anomalous or None)):
            if v is not None:
                raise SpecError(f"crystal.{k}", "applies to crystal.model_file, which is not given")
    if c.mtz_column is not None and c.hkl_file is None:
        raise SpecError("crystal.mtz_column", "applies to an MTZ crystal.hkl_file, which is not given")
    _nonneg("crystal.mosaic_deg", c.mosaic_deg)
    _int_ge("crystal.mosaic_domains", c.mosaic_domains, 1)
    _finite("crystal.phi_deg", c.phi_deg)
    _finite("crystal.osc_deg", c.osc_deg)
    _int_ge("crystal.phisteps", c.phisteps, 1)
    _finite("crystal.phistep_deg", c.phistep_deg)
    _vector("crystal.spindle_axis", c.spindle_axis)
    _nonneg("crystal.water_um", c.water_um)
    # image
    _finite("image.adc", im.adc)
    _positive("image.int_scale", im.int_scale)
    _positive("image.pgm_scale", im.pgm_scale)


def spec_to_dict(obj) -> dict:
    """Nested plain dict of a spec dataclass (lists copied)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            v = spec_to_dict(v)
        elif isinstance(v, (list, tuple)):
            v = [spec_to_dict(x) if is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


def _panels_from_list(items) -> list:
    """``detector.panels`` as ``PanelSpec``s (from dicts, e.g. a Hydra list); unknown keys raise."""
    if not isinstance(items, (list, tuple)):
        raise SpecError("detector.panels", f"must be a list of panels, got {type(items).__name__}")
    names = {f.name for f in fields(PanelSpec)}
    out = []
    for i, item in enumerate(items):
        if isinstance(item, PanelSpec):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise SpecError(f"detector.panels.{i}", f"must be a mapping of panel keys, got {item!r}")
        for kk in item:
            if kk not in names:
                raise SpecError(f"detector.panels.{i}.{kk}", f"unknown key; accepted: {', '.join(sorted(names))}")
        out.append(PanelSpec(**{kk: (list(vv) if isinstance(vv, (list, tuple)) else vv)
                                for kk, vv in item.items()}))
    return out


def validate_panel(i: int, pn: PanelSpec) -> None:
    """Raise ``SpecError`` (key ``detector.panels.<i>.<name>``) for a non-physical panel value."""
    k = f"detector.panels.{i}"
    _int_ge(f"{k}.fpixels", pn.fpixels, 1)
    _int_ge(f"{k}.spixels", pn.spixels, 1)
    _positive(f"{k}.pixel_mm", pn.pixel_mm)
    _vector(f"{k}.fast", pn.fast)
    _vector(f"{k}.slow", pn.slow)
    _vector(f"{k}.origin_mm", pn.origin_mm, nonzero=False)
    _vector(f"{k}.rot_deg", pn.rot_deg, nonzero=False)
    off = pn.offset_px
    if (not isinstance(off, (list, tuple)) or len(off) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in off)):
        raise SpecError(f"{k}.offset_px", f"must be 2 integers >= 0 [fast, slow], got {off!r}")
    for key, box in ([("roi", pn.roi)] + [(f"bad.{j}", b) for j, b in enumerate(pn.bad or [])]):
        if box is None:
            continue
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in box)
                or box[1] < box[0] or box[3] < box[2]):
            raise SpecError(f"{k}.{key}", "must be 4 integers >= 0 [fmin, fmax, smin, smax] with "
                            f"min <= max, got {box!r}")


def spec_from_dict(d: dict) -> ExperimentSpec:
    """Inverse of ``spec_to_dict`` for ``ExperimentSpec`` (unknown keys raise ``SpecError``)."""
    groups = {"detector": DetectorSpec, "beam": BeamSpec, "crystal": CrystalSpec, "image": ImageSpec}
    kw = {}
    for k, v in d.items():
        if k in groups:
            cls = groups[k]
            names = {f.name for f in fields(cls)}
            for kk in v:
                if kk not in names:
                    raise SpecError(f"{k}.{kk}", f"unknown key; accepted: {', '.join(sorted(names))}")
            vals = {kk: (list(vv) if isinstance(vv, (list, tuple)) else vv) for kk, vv in v.items()}
            if k == "detector" and vals.get("panels") is not None:
                vals["panels"] = _panels_from_list(vals["panels"])
            kw[k] = cls(**vals)
        elif k == "quirks":
            kw[k] = v
        elif k == "fix":
            kw[k] = list(v) if isinstance(v, (list, tuple)) else v
        else:
            raise SpecError(k, "unknown key; accepted: detector, beam, crystal, image, quirks, fix")
    return ExperimentSpec(**kw)


def has_panels(spec: ExperimentSpec) -> bool:
    """True when the detector is a list of panels (``detector.panels`` or ``detector.geometry_file``)."""
    return spec.detector.panels is not None or spec.detector.geometry_file is not None
