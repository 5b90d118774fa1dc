"""Detector geometry: conventions, pivots, rotations, beam centres (nanoBragg §4.1).

``detector_geometry`` turns a ``DetectorSpec`` (+ beam/spindle vectors) into a ``DetectorGeometry``
holding lab-frame unit vectors and the detector origin ``pix0`` as torch tensors (metres), plus the
derived values nanoBragg prints and writes into SMV headers.

Frames: lab (x, y, z); f̂/ŝ/ô are the fast/slow/normal detector axes; pixel (s, f) sub-pixel centre is
``pix0 + Fdet·f̂ + Sdet·ŝ`` with Fdet, Sdet in metres from the detector origin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nbsim.params import value
from nbsim.rotation import cross, dot, rotate_axis, rotate_xyz, unitize
from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec
from nbsim.quirks import QuirkSet
from nbsim.report import DetectorReport
from nbsim.units import deg_to_rad, mm_to_m

DBL_MIN = 2.2250738585072014e-308

# convention table: beam, fdet, sdet, odet, twotheta axis, polar, spindle, forced pivot
_CONV = {
    "mosflm": ((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1), "beam"),
    "denzo": ((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1), "beam"),
    "adxv": ((0, 0, 1), (1, 0, 0), (0, -1, 0), (0, 0, 1), (-1, 0, 0), (1, 0, 0), (1, 0, 0), "beam"),
    "xds": ((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0), "sample"),
    "dials": ((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0), "sample"),
    "custom": ((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), None),
}


@dataclass
class DetectorGeometry:
    """Resolved detector. Tensors are (3,) lab vectors or 0-d scalars, SI units (m, rad)."""
    fpixels: int
    spixels: int
    pixel_m: torch.Tensor
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    pix0: torch.Tensor
    beam: torch.Tensor            # unit vector along the beam (towards the detector)
    polar: torch.Tensor           # unit E-vector axis
    vert: torch.Tensor            # unit(beam × polar)
    spindle: torch.Tensor
    twotheta_axis: torch.Tensor
    distance_m: torch.Tensor      # recomputed distance (close_distance/ratio)
    close_distance_m: torch.Tensor
    ratio: torch.Tensor
    convention: str
    pivot: str
    point_pixel: bool
    curved: bool
    report: DetectorReport        # plain numbers for headers / stdout (nbsim.report)
    warnings: list = field(default_factory=list)


def _t(x, dtype, device):
    """A number or tensor as a tensor of ``dtype`` on ``device`` (a tensor keeps its graph)."""
    return torch.as_tensor(x, dtype=dtype, device=device)


def _vec(v, dtype, device):
    return torch.tensor([float(x) for x in v], dtype=dtype, device=device)


def resolve_pixels(d: DetectorSpec, px=None):
    """(fpixels, spixels, detsize_f_m, detsize_s_m) with C's rules. ``px``: pixel size (m), a
    number or 0-d tensor (default from the spec); a size given as a pixel count follows it."""
    px = mm_to_m(d.pixel_mm) if px is None else px
    out = []
    for npix, size_mm in ((d.fpixels, d.detsize_f_mm), (d.spixels, d.detsize_s_mm)):
        if npix is not None:
            size = px * npix
        else:
            size = mm_to_m(size_mm if size_mm is not None else 102.4)
            npix = int(math.ceil(size / value(px) - 0.5))
        out += [npix, size]
    return out[0], out[2], out[1], out[3]


def _spec_values(d: DetectorSpec) -> dict:
    """The continuous detector keys of a spec as plain numbers (what ``param_tree`` holds)."""
    keys = ("distance_mm", "close_distance_mm", "pixel_mm", "xbeam_mm", "ybeam_mm", "xclose_mm",
            "yclose_mm", "orgx_px", "orgy_px", "rotx_deg", "roty_deg", "rotz_deg", "twotheta_deg")
    return {f"detector.{k}": getattr(d, k) for k in keys if getattr(d, k) is not None}


def detector_geometry(d: DetectorSpec, b: BeamSpec, c: CrystalSpec, *, quirks: QuirkSet = QuirkSet(),
                      p=None, dtype=torch.float64, device="cpu") -> DetectorGeometry:
    """Resolve the detector. ``p``: the continuous keys (``detector.distance_mm`` ...) as numbers or
    0-d tensors (``nbsim.params``); a key absent from ``p`` takes nanoBragg's default. Default:
    the spec's values."""
    p = _spec_values(d) if p is None else p
    warnings = []
    conv = d.convention
    tv = lambda v: _vec(v, dtype, device)  # noqa: E731
    px = mm_to_m(p["detector.pixel_mm"])
    fpixels, spixels, detsize_f, detsize_s = resolve_pixels(d, px)
    if fpixels < 1 or spixels < 1:
        from nbsim.spec import SpecError
        raise SpecError("detector.fpixels", f"detector has {fpixels}x{spixels} pixels; need >= 1 each")

    beam_d, fdet_d, sdet_d, odet_d, tth_d, polar_d, spindle_d, forced = _CONV[conv]
    if conv == "custom":
        pivot = d.pivot or "beam"
        beam_v = b.beam_vector or beam_d
        fdet_v = d.fdet_vector or fdet_d
        sdet_v = d.sdet_vector or sdet_d
        odet_v = d.odet_vector or odet_d
        tth_v = d.twotheta_axis or tth_d
        polar_v = b.polar_vector or polar_d
        spindle_v = c.spindle_axis or spindle_d
    else:
        # non-custom conventions set every vector; the C program switches to custom when a vector is given
        if not quirks.fixed("convention_pivot") or d.pivot is None:
            if d.pivot is not None and d.pivot != forced:
                warnings.append(f"quirk convention_pivot: {conv} convention forces pivot={forced} "
                                f"(detector.pivot={d.pivot} ignored; fixing the quirk honours it)")
            pivot = forced
        else:
            pivot = d.pivot
        beam_v, fdet_v, sdet_v, odet_v, tth_v, polar_v, spindle_v = (
            beam_d, fdet_d, sdet_d, odet_d, tth_d, polar_d, spindle_d)
        given = [k for k, v in (
            ("beam.beam_vector", b.beam_vector), ("beam.polar_vector", b.polar_vector),
            ("crystal.spindle_axis", c.spindle_axis), ("detector.fdet_vector", d.fdet_vector),
            ("detector.sdet_vector", d.sdet_vector), ("detector.odet_vector", d.odet_vector),
            ("detector.twotheta_axis", d.twotheta_axis)) if v is not None]
        if given and not quirks.fixed("convention_vectors"):
            warnings.append(f"quirk convention_vectors: the {conv} convention ignores {', '.join(given)} "
                            "(fixing the quirk honours them)")
        if quirks.fixed("convention_vectors"):
            beam_v = b.beam_vector or beam_v
            polar_v = b.polar_vector or polar_v
            spindle_v = c.spindle_axis or spindle_v
            fdet_v = d.fdet_vector or fdet_v
            sdet_v = d.sdet_vector or sdet_v
            odet_v = d.odet_vector or odet_v
            tth_v = d.twotheta_axis or tth_v

    # beam centre defaults (metres); None = not given
    def given(key):
        v = p.get(f"detector.{key}")
        return None if v is None else mm_to_m(v)

    Xbeam, Ybeam = given("xbeam_mm"), given("ybeam_mm")
    Xclose, Yclose = given("xclose_mm"), given("yclose_mm")
    orgx, orgy = p.get("detector.orgx_px"), p.get("detector.orgy_px")
    Fclose = (orgx - 0.5) * px if orgx is not None else detsize_f / 2.0
    Sclose = (orgy - 0.5) * px if orgy is not None else detsize_s / 2.0
    if Xclose is None:
        Xclose = Fclose
    if Yclose is None:
        Yclose = Sclose
    if conv == "adxv":
        Xbeam = (detsize_f + px) / 2.0 if Xbeam is None else Xbeam
        Ybeam = (detsize_s - px) / 2.0 if Ybeam is None else Ybeam
        Fbeam, Sbeam = Xbeam, detsize_s - Ybeam
    elif conv in ("mosflm", "denzo"):
        Xbeam = (detsize_s + px) / 2.0 if Xbeam is None else Xbeam
        Ybeam = (detsize_f + px) / 2.0 if Ybeam is None else Ybeam
        shift = 0.5 * px if conv == "mosflm" else 0.0
        Fbeam, Sbeam = Ybeam + shift, Xbeam + shift
    else:  # xds, dials, custom
        Xbeam = Xclose if Xbeam is None else Xbeam
        Ybeam = Yclose if Ybeam is None else Ybeam
        Fbeam, Sbeam = Xbeam, Ybeam
        if conv == "custom":
            Fclose, Sclose = Xbeam, Ybeam

    beam, _ = unitize(tv(beam_v))
    fdet, _ = unitize(tv(fdet_v))
    sdet, _ = unitize(tv(sdet_v))
    odet, omag = unitize(tv(odet_v))
    if float(omag) != 1.0 and conv == "custom" and d.odet_vector is not None:
        # C regenerates odet as f x s when the given one is not a unit vector
        warnings.append("auto-generating odet_vector = fdet x sdet (given odet_vector is not a unit vector)")
        odet, _ = unitize(cross(fdet, sdet))
    polar, _ = unitize(tv(polar_v))
    spindle, _ = unitize(tv(spindle_v))
    tth_axis = tv(tth_v)   # C does not unitize the two-theta axis
    vert, _ = unitize(cross(beam, polar))

    rx, ry, rz = (deg_to_rad(p["detector.rotx_deg"]), deg_to_rad(p["detector.roty_deg"]),
                  deg_to_rad(p["detector.rotz_deg"]))
    tth = deg_to_rad(p["detector.twotheta_deg"])
    distance = _t(mm_to_m(p["detector.distance_mm"]), dtype, device)

    def place(v):
        return rotate_axis(rotate_xyz(v, rx, ry, rz), tth_axis, tth)

    if not quirks.fixed("ratio_ignores_twotheta"):
        ratio = dot(beam, rotate_xyz(odet, rx, ry, rz))     # two-theta not included
    else:
        ratio = dot(beam, place(odet))
    ratio = torch.where(ratio == 0, torch.full_like(ratio, DBL_MIN), ratio)
    if p.get("detector.close_distance_mm") is not None:
        close_distance = _t(mm_to_m(p["detector.close_distance_mm"]), dtype, device)
    else:
        close_distance = torch.abs(ratio * distance)
    distance = close_distance / ratio

    pix0 = None
    if pivot == "sample":
        pix0 = -Fclose * fdet - Sclose * sdet + close_distance * odet
        pix0 = place(pix0)
    fdet, sdet, odet = place(fdet), place(sdet), place(odet)
    if pivot == "beam":
        pix0 = -Fbeam * fdet - Sbeam * sdet + distance * beam
    if d.pix0_vector_mm is not None:
        if not quirks.fixed("pix0_overwritten"):
            warnings.append("quirk pix0_overwritten: pix0_vector is overwritten by the pivot formula "
                            "(C behaviour); fixing the quirk honours it")
        else:
            pix0 = tv([mm_to_m(x) for x in d.pix0_vector_mm])

    Fclose_t = -dot(pix0, fdet)
    Sclose_t = -dot(pix0, sdet)
    close_distance = dot(pix0, odet)
    newv = close_distance / ratio * beam - pix0
    Fbeam_t = dot(fdet, newv)
    Sbeam_t = dot(sdet, newv)
    distance = close_distance / ratio
    orgx = Fclose_t / px + 0.5
    orgy = Sclose_t / px + 0.5
    dials = 1000.0 * torch.stack((pix0[2], pix0[1], -pix0[0]))

    g = value  # (report only)

    def v3(v):
        return tuple(g(x) for x in v)
    report = DetectorReport(
        convention=conv, pivot=pivot, fpixels=fpixels, spixels=spixels,
        pixel_mm=g(px) * 1e3, detsize_f_mm=g(detsize_f) * 1e3, detsize_s_mm=g(detsize_s) * 1e3,
        distance_mm=g(distance) * 1e3, close_distance_mm=g(close_distance) * 1e3,
        xbeam_mm=g(Xbeam) * 1e3, ybeam_mm=g(Ybeam) * 1e3, xclose_mm=g(Xclose) * 1e3,
        yclose_mm=g(Yclose) * 1e3,
        fbeam_mm=g(Fbeam_t) * 1e3, sbeam_mm=g(Sbeam_t) * 1e3,
        fclose_mm=g(Fclose_t) * 1e3, sclose_mm=g(Sclose_t) * 1e3,
        orgx_px=g(orgx), orgy_px=g(orgy), dials_origin_mm=v3(dials),
        twotheta_deg=g(p["detector.twotheta_deg"]), ratio=g(ratio),
        fdet=v3(fdet), sdet=v3(sdet), odet=v3(odet), pix0_m=v3(pix0), beam=v3(beam), spindle=v3(spindle),
        polar_vector=v3(polar), twotheta_axis=v3(tth_axis), polarization_plane_normal=v3(cross(beam, polar)),
        adxv_center_y_mm=(g(detsize_s) - g(Sbeam_t)) * 1000,
        mosflm_center_x_mm=(g(Sbeam_t) - 0.5 * g(px)) * 1000.0,
        mosflm_center_y_mm=(g(Fbeam_t) - 0.5 * g(px)) * 1000,
        echo_m=tuple(g(x) for x in (distance, detsize_f, detsize_s, px, Xbeam, Ybeam, Fbeam_t, Sbeam_t,
                                    Xclose, Yclose, Fclose_t, Sclose_t)),
    )
    return DetectorGeometry(
        fpixels=fpixels, spixels=spixels, pixel_m=_t(px, dtype, device),
        fdet=fdet, sdet=sdet, odet=odet, pix0=pix0, beam=beam, polar=polar, vert=vert, spindle=spindle,
        twotheta_axis=tth_axis, distance_m=distance, close_distance_m=close_distance, ratio=ratio,
        convention=conv, pivot=pivot, point_pixel=d.point_pixel, curved=d.curved, report=report,
        warnings=warnings)
